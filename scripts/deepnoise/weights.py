"""The ``weights.pt`` file of a trained model: the one contract between training, fine-tuning and
prediction.

Keys: ``model_config`` (``models.build_model``), ``model`` (the state dict that predicts and that a
fine-tune starts from: the EMA teacher with the mean teacher, else the student), ``student``,
``teacher`` (``None`` without the mean teacher), ``selected`` (``net``: teacher | student, ``epoch``,
``val_acc``, ``rule``: best validation | last epoch), ``hparams``, ``classes``, ``scope``, ``epochs``,
``val_experiments``.
"""

from __future__ import annotations

import os

import torch

from deepnoise.atomic import atomic_path
from deepnoise.errors import InputError

REQUIRED = ("model_config", "model", "student", "selected", "hparams", "scope")


def save_weights(path: str | os.PathLike, record: dict) -> None:
    missing = [k for k in REQUIRED if k not in record]
    if missing:
        raise ValueError(f"weights record lacks {missing}")
    with atomic_path(path) as tmp:
        torch.save(record, tmp)


def load_weights(path: str | os.PathLike) -> dict:
    """A ``weights.pt`` record; ``InputError`` naming the file when it is unreadable or incomplete."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise InputError(
            f"{path}: cannot read weights (truncated or corrupt: {exc}); delete it and rerun: "
            "Snakemake retrains it"
        ) from exc
    if not isinstance(state, dict):
        raise InputError(f"{path}: not a deepnoise weights file")
    for key in REQUIRED:
        if key not in state:
            raise InputError(
                f"{path}: weights lack {key!r} (written by an older deepnoise? rerun its training)"
            )
    return state
