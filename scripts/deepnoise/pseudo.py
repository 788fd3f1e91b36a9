"""Pseudo labels for the next round, from this round's balanced ensemble (``deepnoise pseudo-labels``).

Every predicted well gets a row: the test experiments' wells and the validation experiments' wells
(their truth is never read here). ``sirna_id`` is the balanced ensemble's class; ``margin`` is the
unbalanced ensemble's top-1 minus top-2 probability; ``selected`` marks, per plate, the
``--fraction`` of wells with the largest margin (the 1st-place schedule grows it over the rounds:
0.4 -> 1.0). Training with hard targets learns the selected rows only; training with soft targets
(the paper's L_pSoftmax) reads the ensemble files instead (``read_soft_targets``).

Output CSV columns: ``well_id, experiment, plate, well, dataset, sirna_id, confidence, margin,
selected``, sorted by ``well_id``. ``confidence`` is the balanced probability of ``sirna_id`` (for
``balance --method exact`` or ``groups`` that is ``(1 + q) / 2`` with ``q`` the model's probability
of the assigned class, restricted to the plate's group and renormalised for ``groups``).
No torch here.
"""

from __future__ import annotations

import argparse
import logging
import math
import os

import numpy as np
import pandas as pd

from deepnoise.atomic import atomic_path
from deepnoise.ensemble import Predictions, concat_predictions, load_predictions
from deepnoise.errors import InputError

log = logging.getLogger(__name__)

COLUMNS = (
    "well_id",
    "experiment",
    "plate",
    "well",
    "dataset",
    "sirna_id",
    "confidence",
    "margin",
    "selected",
)


def _unique(pred: Predictions, what: str) -> Predictions:
    dup = pd.Index(pred.well_id).duplicated()
    if dup.any():
        raise InputError(f"well {pred.well_id[dup][0]} occurs in several {what} files")
    return pred


def margins(probs: np.ndarray) -> np.ndarray:
    """Top-1 minus top-2 probability per row (1.0 for a single class)."""
    if probs.shape[1] < 2:
        return np.ones(len(probs))
    top = np.partition(probs, -2, axis=1)[:, -2:]
    return (top[:, 1] - top[:, 0]).astype(np.float64)


def select_by_margin(plate_keys: pd.DataFrame, margin: np.ndarray, fraction: float) -> np.ndarray:
    """Per plate, the ``ceil(fraction * n)`` wells with the largest margin (ties by row order)."""
    if not 0.0 < fraction <= 1.0:
        raise InputError(f"--fraction {fraction}: expected a value in (0, 1]")
    keep = np.zeros(len(margin), bool)
    for _, rows in plate_keys.groupby(["experiment", "plate"], sort=False).indices.items():
        k = math.ceil(fraction * len(rows))
        order = rows[np.argsort(-margin[rows], kind="stable")]
        keep[order[:k]] = True
    return keep


def pseudo_labels(
    balanced: Predictions, ensemble: Predictions | None = None, fraction: float = 1.0
) -> pd.DataFrame:
    """The pseudo-label table of every well of ``balanced`` (see the module doc)."""
    balanced = _unique(balanced, "balanced prediction")
    labels = balanced.labels()
    if ensemble is not None:
        ensemble = _unique(ensemble, "ensemble")
        pos = pd.Index(ensemble.well_id).get_indexer(balanced.well_id)
        if (pos < 0).any():
            raise InputError(f"well {balanced.well_id[pos < 0][0]} has a balanced but no ensemble prediction")
        margin = margins(ensemble.probs[pos])
    else:
        margin = margins(balanced.probs)
    df = pd.DataFrame(
        {
            "well_id": balanced.well_id,
            "experiment": balanced.experiment,
            "plate": balanced.plate.astype(np.int64),
            "well": balanced.well,
            "dataset": balanced.dataset,
            "sirna_id": labels.astype(np.int64),
            "confidence": balanced.probs[np.arange(len(balanced)), labels].astype(np.float64),
            "margin": margin,
        },
    )
    df["selected"] = select_by_margin(df, margin, fraction).astype(np.int64)
    return df.sort_values("well_id").reset_index(drop=True)[list(COLUMNS)]


def write_pseudo_labels(df: pd.DataFrame, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False, float_format="%.6f")


def read_pseudo_table(path: str | os.PathLike) -> pd.DataFrame:
    try:
        df = pd.read_csv(path, dtype={"well_id": str})
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise InputError(f"{path}: cannot read pseudo labels: {exc}") from exc
    for col in ("well_id", "sirna_id", "selected"):
        if col not in df.columns:
            raise InputError(f"{path}: pseudo labels lack column {col!r}")
    return df


def read_hard_labels(path: str | os.PathLike) -> dict[str, int]:
    """``well_id -> sirna_id`` of the selected rows (the targets of hard-label training)."""
    df = read_pseudo_table(path)
    df = df[df["selected"].astype(int) == 1]
    return dict(zip(df["well_id"].astype(str), df["sirna_id"].astype(int), strict=True))


def read_soft_targets(paths: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """``(well ids, probabilities)`` of ensemble npz files: the soft targets of the next round."""
    pred = _unique(concat_predictions([load_predictions(p) for p in paths]), "ensemble")
    return pred.well_id, pred.probs.astype(np.float32)


def changed_labels(current: pd.DataFrame, previous: pd.DataFrame) -> dict:
    """How many wells present in both tables changed label (all rows, selected or not)."""
    both = current.merge(previous, on="well_id", suffixes=("", "_prev"))
    return {"compared": int(len(both)), "changed": int((both["sirna_id"] != both["sirna_id_prev"]).sum())}


def _run(args: argparse.Namespace) -> int:
    if args.ensemble and len(args.ensemble) != len(args.inputs):
        raise InputError("--ensemble: give one file per --inputs file (the same cell types)")
    balanced = concat_predictions([load_predictions(p) for p in args.inputs])
    ensemble = concat_predictions([load_predictions(p) for p in args.ensemble]) if args.ensemble else None
    df = pseudo_labels(balanced, ensemble, args.fraction)
    if df.empty:
        log.warning("no predicted wells in %s: writing an empty pseudo-label file", args.inputs)
    write_pseudo_labels(df, args.out)
    log.info(
        "pseudo labels: %d wells (%d selected, fraction %.2f) -> %s",
        len(df), int(df["selected"].sum()), args.fraction, args.out,
    )  # fmt: skip
    if args.previous:
        log.info("changed since the previous round: %s", changed_labels(df, read_pseudo_table(args.previous)))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "pseudo-labels",
        help="pseudo labels for the next round from balanced predictions",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--inputs", nargs="+", required=True, help="balanced npz files (one per cell type)")
    p.add_argument("--ensemble", nargs="*", default=[], help="ensemble npz files (margins), same order")
    p.add_argument("--fraction", type=float, default=1.0, help="fraction of each plate's wells selected")
    p.add_argument("--previous", help="the previous round's pseudo labels (logs how many changed)")
    p.add_argument("--out", required=True, help="pseudo_labels.csv")
    p.set_defaults(func=_run)
