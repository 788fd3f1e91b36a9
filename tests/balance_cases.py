"""Synthetic screens for the balancing tests and benchmark (``synthetic_case``).

Imported by tests/test_balance.py, tests/test_ablation.py and benchmarks/bench_balance.py (which puts
this folder on ``sys.path``: ``tests`` is not a package).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from deepnoise.ensemble import Predictions
from deepnoise.layout import INNER_WELLS, well_id


def softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=1, keepdims=True)


def synthetic_case(
    n_classes: int = 1108,
    n_groups: int = 4,
    n_train: int = 2,
    n_eval: int = 1,
    signal: float = 3.5,
    noise: float = 1.0,
    drop_wells: int = 0,
    seed: int = 0,
    eval_dataset: str = "test",
    sharpness: float = 1.0,
    eval_order: tuple[int, ...] | None = None,
) -> tuple[pd.DataFrame, Predictions, pd.Series]:
    """A synthetic screen: (site table, predictions, truth).

    Classes are split at random into ``n_groups`` groups; every experiment gets a random cyclic
    rotation of the groups over its ``n_groups`` plates and a random well order. The site table has
    ``n_train`` labelled train experiments plus the ``n_eval`` predicted ones (labelled when
    ``eval_dataset == "train"``, i.e. validation). ``eval_order`` (group index per plate, in the
    order of the groups of the first train experiment's plates) replaces the rotation of every
    predicted experiment, e.g. a non-cyclic ``(0, 2, 1, 3)``. Predicted logits are ``N(0, noise)``
    with ``signal`` added to the true class, probabilities ``softmax(sharpness * logits)``
    (sharpness sets the confidence, not the argmax); ``drop_wells`` wells per predicted plate are
    left out.
    """
    rng = np.random.default_rng(seed)
    groups = np.array_split(rng.permutation(n_classes), n_groups)
    rows, pred_rows = [], []
    r0 = None
    for i in range(n_train + n_eval):
        exp = f"SYN-{i + 1:02d}"
        dataset = "train" if i < n_train else eval_dataset
        r = int(rng.integers(n_groups))
        r0 = r if r0 is None else r0
        for p in range(1, n_groups + 1):
            if i >= n_train and eval_order is not None:
                g = (eval_order[p - 1] + r0) % n_groups  # group k of the reference is (k + r0)
            else:
                g = (p - 1 + r) % n_groups
            classes = rng.permutation(groups[g])
            keep = np.ones(len(classes), bool)
            if i >= n_train and drop_wells:
                keep[rng.choice(len(classes), drop_wells, replace=False)] = False
            for w, (c, k) in enumerate(zip(classes, keep, strict=True)):
                if not k:
                    continue
                wid = well_id(exp, p, INNER_WELLS[w])
                labelled = dataset == "train"
                rows.append(
                    (f"{wid}_1", wid, "SYN", dataset, exp, p, INNER_WELLS[w], 1, "treatment")
                    + ((f"siRNA{c}" if labelled else None), (int(c) if labelled else -1), "")
                )
                if i >= n_train:
                    pred_rows.append((wid, exp, p, INNER_WELLS[w], dataset, int(c)))
    cols = [
        "site_id", "well_id", "cell_type", "dataset", "experiment", "plate", "well", "site",
        "well_type", "sirna", "sirna_id", "path",
    ]  # fmt: skip
    sites = pd.DataFrame(rows, columns=cols)
    meta = pd.DataFrame(pred_rows, columns=["well_id", "experiment", "plate", "well", "dataset", "y"])
    logits = rng.normal(0.0, noise, size=(len(meta), n_classes))
    logits[np.arange(len(meta)), meta["y"].to_numpy()] += signal
    pred = Predictions(
        well_id=meta["well_id"].to_numpy(str),
        experiment=meta["experiment"].to_numpy(str),
        plate=meta["plate"].to_numpy(np.int64),
        well=meta["well"].to_numpy(str),
        dataset=meta["dataset"].to_numpy(str),
        probs=softmax(sharpness * logits).astype(np.float32),
    )
    truth = pd.Series(meta["y"].to_numpy(np.int64), index=meta["well_id"].to_numpy(str))
    return sites, pred, truth
