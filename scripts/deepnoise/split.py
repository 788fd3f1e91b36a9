"""The labelled / validation split of a screen's experiments, decided at parse time.

``validation_experiments`` picks the held-out labelled experiments (an explicit list, or the last N
labelled experiments of each cell type); ``split_problems`` names, with their fix, the splits that
cannot run: a fine-tuned cell type left without a labelled training experiment (its fine-tuning
would fail minutes later with "no labelled training wells"), every labelled experiment held out
(the shared model has nothing to learn), or a fine-tuned cell type with no validation experiment
while others have one (it would never be scored on validation). Works on ``layout.Experiment``
records, so the rxrx1 and Kaggle layouts are split alike.
"""

from __future__ import annotations

from collections.abc import Sequence

from deepnoise.errors import InputError
from deepnoise.layout import Experiment


def labelled(experiments: Sequence[Experiment], cell_type: str | None = None) -> list[str]:
    return [
        e.experiment
        for e in experiments
        if e.dataset == "train" and (cell_type is None or e.cell_type == cell_type)
    ]


def validation_experiments(
    experiments: Sequence[Experiment], explicit: Sequence[str], per_cell_type: int
) -> list[str]:
    """The held-out labelled experiments: ``explicit`` when given (each must be labelled), else the
    last ``per_cell_type`` labelled experiments of every cell type."""
    allowed = labelled(experiments)
    for e in explicit:
        if e not in allowed:
            raise InputError(
                f"config split.validation_experiments: {e!r} is not a labelled experiment; "
                f"allowed values: {', '.join(allowed)}"
            )
    if explicit:
        return list(explicit)
    out: list[str] = []
    for ct in sorted({e.cell_type for e in experiments}):
        train = labelled(experiments, ct)
        out += train[max(len(train) - per_cell_type, 0) :] if per_cell_type > 0 else []
    return out


def split_problems(
    experiments: Sequence[Experiment],
    validation: Sequence[str],
    fine_tuned: Sequence[str],
    explicit: bool,
) -> list[str]:
    """Why the split cannot run, one line per cell type with its fix (empty when it can)."""
    held = set(validation)
    key = "split.validation_experiments" if explicit else "split.validation_per_cell_type"
    out = []
    if labelled(experiments) and all(e in held for e in labelled(experiments)):
        out.append(
            f"config {key}: every labelled experiment is held out for validation, the shared model "
            f"has nothing to learn; hold out fewer"
        )
        return out
    for ct in fine_tuned:
        train = labelled(experiments, ct)
        mine = [e for e in train if e in held]
        if not train:
            out.append(
                f"config cell_types: cell type {ct} has no labelled experiment to fine-tune on; "
                f"leave {ct} out of cell_types"
            )
        elif len(mine) == len(train):
            out.append(
                f"config {key}: cell type {ct} has {len(train)} labelled experiment(s) ({', '.join(train)}) "
                f"and all are held out for validation, leaving none to fine-tune on; fix: hold out fewer "
                f"(split.validation_per_cell_type: {len(train) - 1} or name the held-out experiments in "
                f"split.validation_experiments), or leave {ct} out of cell_types"
            )
        elif held and not mine:
            out.append(
                f"config split.validation_experiments: fine-tuned cell type {ct} has no validation "
                f"experiment and would not be scored; fix: add one of {', '.join(train)}, or leave {ct} "
                f"out of cell_types"
            )
    return out
