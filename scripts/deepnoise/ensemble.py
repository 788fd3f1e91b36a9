"""Prediction files (npz, see docs/architecture.md) and the ensemble: mean of models' probabilities.

``Predictions`` is the in-memory form of a predictions / ensemble / balanced npz; ``load_predictions``
validates a file and ``save_predictions`` writes one atomically. Both are shared by ``balance``,
``pseudo`` and ``evaluate``. No torch here.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from deepnoise.atomic import atomic_path
from deepnoise.errors import InputError

log = logging.getLogger(__name__)

META_KEYS = ("well_id", "experiment", "plate", "well", "dataset")


@dataclass
class Predictions:
    """One row per treatment well; ``probs`` is ``(n_wells, n_treatments)`` float32."""

    well_id: np.ndarray
    experiment: np.ndarray
    plate: np.ndarray  # int64
    well: np.ndarray
    dataset: np.ndarray
    probs: np.ndarray

    @classmethod
    def from_well_ids(cls, well_ids, dataset, probs) -> Predictions:
        """Experiment, plate and well parsed from the ``well_id``s; ``dataset`` a str or an array."""
        from deepnoise.layout import parse_well_id

        ids = np.asarray(well_ids, dtype=str)
        parts = [parse_well_id(w) for w in ids]
        return cls(
            well_id=ids,
            experiment=np.array([p[0] for p in parts], dtype=str),
            plate=np.array([p[1] for p in parts], dtype=np.int64),
            well=np.array([p[2] for p in parts], dtype=str),
            dataset=np.broadcast_to(np.asarray(dataset, dtype=str), ids.shape).copy(),
            probs=np.asarray(probs, dtype=np.float32),
        )

    def __len__(self) -> int:
        return len(self.well_id)

    @property
    def n_classes(self) -> int:
        return int(self.probs.shape[1])

    def take(self, index: np.ndarray) -> Predictions:
        """The rows ``index`` (an integer or boolean array), in that order."""
        return Predictions(
            *(getattr(self, k)[index] for k in META_KEYS),
            probs=self.probs[index],
        )

    def with_probs(self, probs: np.ndarray) -> Predictions:
        return Predictions(*(getattr(self, k) for k in META_KEYS), probs=probs)

    def labels(self) -> np.ndarray:
        """Predicted class per well (argmax of ``probs``)."""
        return self.probs.argmax(axis=1)


def concat_predictions(parts: Sequence[Predictions]) -> Predictions:
    if not parts:
        raise InputError("no prediction files given")
    widths = {p.n_classes for p in parts}
    if len(widths) > 1:
        raise InputError(f"prediction files disagree on the number of classes: {sorted(widths)}")
    return Predictions(
        *(np.concatenate([getattr(p, k) for p in parts]) for k in META_KEYS),
        probs=np.concatenate([p.probs for p in parts]),
    )


def load_predictions(path: str | os.PathLike) -> Predictions:
    """Read and validate a predictions npz; errors name the file (and the key or well at fault)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in (*META_KEYS, "probs") if k not in z.files]
            if missing:
                raise InputError(f"{path}: missing arrays {missing} (has {sorted(z.files)})")
            arrays = {k: z[k] for k in (*META_KEYS, "probs")}
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not a readable npz file ({exc})") from exc
    probs = arrays.pop("probs")
    if probs.ndim != 2:
        raise InputError(f"{path}: probs must be 2-D (n_wells, n_treatments), got shape {probs.shape}")
    n = probs.shape[0]
    for k, v in arrays.items():
        if v.shape != (n,):
            raise InputError(f"{path}: {k} has shape {v.shape}, expected ({n},) like probs")
    if not np.all(np.isfinite(probs)):
        bad = arrays["well_id"][~np.isfinite(probs).all(axis=1)][0]
        raise InputError(f"{path}: non-finite probabilities for well {bad}")
    try:
        plate = arrays["plate"].astype(np.int64)
    except ValueError as exc:
        raise InputError(f"{path}: plate values are not integers ({exc})") from exc
    well_id = arrays["well_id"].astype(str)
    uniq, counts = np.unique(well_id, return_counts=True)
    if len(uniq) != n:
        raise InputError(f"{path}: well {uniq[counts > 1][0]} occurs more than once")
    return Predictions(
        well_id=well_id,
        experiment=arrays["experiment"].astype(str),
        plate=plate,
        well=arrays["well"].astype(str),
        dataset=arrays["dataset"].astype(str),
        probs=probs.astype(np.float32, copy=False),
    )


def check_wells(pred: Predictions, sites, source: str, allow_missing: bool = False) -> None:
    """``pred`` holds treatment wells of the site table ``sites`` with the same experiment, plate,
    well and dataset, and (unless ``allow_missing``) every treatment well of each plate it covers.
    ``InputError`` names ``source`` (the predictions file) and the first well at fault."""
    treat = sites[sites["well_type"] == "treatment"].drop_duplicates("well_id").set_index("well_id")
    known = np.isin(pred.well_id, treat.index.to_numpy(str))
    if not known.all():
        w = pred.well_id[~known][0]
        raise InputError(f"{source}: well {w} is not a treatment well of the site table")
    ref = treat.loc[pred.well_id]
    for key in ("experiment", "plate", "well", "dataset"):
        diff = np.flatnonzero(ref[key].to_numpy().astype(str) != getattr(pred, key).astype(str))
        if len(diff):
            w = pred.well_id[diff[0]]
            raise InputError(
                f"{source}: well {w} has {key} {getattr(pred, key)[diff[0]]!r}, "
                f"the site table says {ref[key].iloc[diff[0]]!r}"
            )
    if allow_missing:
        return
    plates = set(zip(pred.experiment.astype(str), pred.plate.astype(int), strict=True))
    on_plates = treat[
        [(e, int(p)) in plates for e, p in zip(treat["experiment"], treat["plate"], strict=True)]
    ]
    absent = np.setdiff1d(on_plates.index.to_numpy(str), pred.well_id)
    if len(absent):
        raise InputError(
            f"{source}: lacks well {absent[0]} of its plates ({len(absent)} treatment well(s) missing)"
        )


def save_predictions(pred: Predictions, path: str | os.PathLike) -> None:
    """Write ``pred`` atomically in the npz format of docs/architecture.md (str metadata arrays)."""
    with atomic_path(path) as tmp:
        np.savez(
            tmp,
            well_id=pred.well_id.astype(str),
            experiment=pred.experiment.astype(str),
            plate=pred.plate.astype(str),
            well=pred.well.astype(str),
            dataset=pred.dataset.astype(str),
            probs=np.asarray(pred.probs, dtype=np.float32),
        )


def ensemble(preds: Sequence[Predictions], names: Sequence[str] | None = None) -> Predictions:
    """Mean of the models' probabilities, aligned by ``well_id`` in the first model's well order.

    All models must predict the same set of wells with the same metadata and number of classes; the
    error names the model (``names[i]``) and a well at fault.
    """
    if not preds:
        raise InputError("ensemble: no inputs")
    names = list(names) if names is not None else [f"input {i + 1}" for i in range(len(preds))]
    ref = preds[0]
    order = np.argsort(ref.well_id)
    ref_sorted = ref.well_id[order]
    total = ref.probs.astype(np.float64)
    for name, p in zip(names[1:], preds[1:], strict=True):
        if p.n_classes != ref.n_classes:
            raise InputError(f"{name}: {p.n_classes} classes, but {names[0]} has {ref.n_classes}")
        only_here = np.setdiff1d(p.well_id, ref.well_id)
        if len(only_here):
            raise InputError(f"{name}: well {only_here[0]} is not in {names[0]}")
        only_ref = np.setdiff1d(ref.well_id, p.well_id)
        if len(only_ref):
            raise InputError(f"{name}: well {only_ref[0]} of {names[0]} is missing")
        # Position in p of each ref well.
        p_order = np.argsort(p.well_id)
        pos = np.empty(len(ref), dtype=np.int64)
        pos[order] = p_order[np.searchsorted(p.well_id[p_order], ref_sorted)]
        for k in ("experiment", "plate", "well", "dataset"):
            diff = np.flatnonzero(getattr(p, k)[pos] != getattr(ref, k))
            if len(diff):
                w = ref.well_id[diff[0]]
                raise InputError(f"{name}: well {w} has a different {k} than in {names[0]}")
        total += p.probs[pos]
    return ref.with_probs((total / len(preds)).astype(np.float32))


def _run(args: argparse.Namespace) -> int:
    preds = [load_predictions(p) for p in args.inputs]
    out = ensemble(preds, names=[str(p) for p in args.inputs])
    save_predictions(out, args.out)
    log.info("ensemble of %d models, %d wells -> %s", len(preds), len(out), args.out)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "ensemble",
        help="mean of models' probabilities",
        description="Average the probabilities of several prediction npz files, aligned by well_id.",
    )
    p.add_argument("--inputs", nargs="+", required=True, help="prediction npz files (one per model)")
    p.add_argument("--out", required=True, help="output npz (same format)")
    p.set_defaults(func=_run)
