"""Pseudo labels for the test wells from balanced predictions (read by the next round's training).

Output CSV columns: ``well_id, experiment, plate, well, sirna_id, confidence`` for every well with
``dataset == test`` in the inputs, sorted by ``well_id``; ``sirna_id`` is the argmax class of the
balanced probabilities and ``confidence`` its probability (for ``balance --method exact`` or
``groups`` that is ``(1 + q) / 2`` with ``q`` the model's probability of the assigned class,
restricted to the plate's group and renormalised for ``groups``).
"""

from __future__ import annotations

import argparse
import logging
import os

import numpy as np
import pandas as pd

from deepnoise.atomic import atomic_path
from deepnoise.ensemble import Predictions, concat_predictions, load_predictions
from deepnoise.errors import InputError

log = logging.getLogger(__name__)

COLUMNS = ("well_id", "experiment", "plate", "well", "sirna_id", "confidence")


def pseudo_labels(pred: Predictions) -> pd.DataFrame:
    dup = pd.Index(pred.well_id).duplicated()
    if dup.any():
        raise InputError(f"well {pred.well_id[dup][0]} occurs in several balanced prediction files")
    t = pred.take(np.flatnonzero(pred.dataset == "test"))
    labels = t.labels()
    df = pd.DataFrame(
        {
            "well_id": t.well_id,
            "experiment": t.experiment,
            "plate": t.plate.astype(np.int64),
            "well": t.well,
            "sirna_id": labels.astype(np.int64),
            "confidence": t.probs[np.arange(len(t)), labels].astype(np.float64),
        },
        columns=list(COLUMNS),
    )
    return df.sort_values("well_id").reset_index(drop=True)


def write_pseudo_labels(df: pd.DataFrame, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False, float_format="%.6f")


def _run(args: argparse.Namespace) -> int:
    pred = concat_predictions([load_predictions(p) for p in args.inputs])
    df = pseudo_labels(pred)
    if df.empty:
        log.warning("no test wells in %s: writing an empty pseudo-label file", args.inputs)
    write_pseudo_labels(df, args.out)
    log.info("pseudo labels: %d test wells -> %s", len(df), args.out)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "pseudo-labels",
        help="pseudo labels for the test wells from balanced predictions",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--inputs", nargs="+", required=True, help="balanced npz files (one per cell type)")
    p.add_argument("--out", required=True, help="pseudo_labels.csv")
    p.set_defaults(func=_run)
