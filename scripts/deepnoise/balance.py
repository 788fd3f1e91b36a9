"""Per-plate balancing of predictions: every treatment siRNA occurs at most once per plate.

Methods (``balance_predictions``, ``--method``), applied to each experiment independently. ``q`` is a
plate's probabilities restricted to the candidate classes, renormalised and floored at ``1e-6``.

- ``paper`` (the DeepNoise paper's prior adjustment, ``iterative_plate``): the only constraint is
  "an siRNA occurs at most once per plate", over all treatment classes; no plate groups. Per plate,
  repeatedly divide the probability of every over-predicted class by ``e**step`` (a per-class bias
  in log space); the step halves when the number of distinct predicted classes has not improved for
  10 iterations. Output ``probs = softmax(log q - bias)``; argmax is the adjusted prediction. A few
  duplicates may remain (reported per plate in the log).
- ``exact``: the same constraint solved exactly: a Hungarian one-to-one assignment of each plate's
  wells to distinct classes among all treatment classes, maximising ``sum log q`` (rectangular:
  an RxRx1 plate has 277 wells for 1,108 classes); no plate groups. A plate with more wells than
  there are classes is an ``InputError``.
- ``groups`` (the Kaggle 1st-place approach; it uses the RxRx1 plate-group structure, a property of
  the competition's plate layout that the paper does not use): infer the plate groups from the
  labelled train plates (``infer_plate_groups``), choose each experiment's plate -> group order among
  all ``G!`` (RxRx1: 24) permutations (``choose_assignment``), restrict each plate to its group's
  classes and assign wells with the Hungarian algorithm as ``exact`` (a plate with more wells than its
  group has classes is an ``InputError``). When the best order's margin over the runner-up is below
  ``min_margin`` (default 3; a paired t statistic, see ``choose_assignment``) a WARNING names
  the experiment.
- ``none``: the input unchanged.

``exact`` and ``groups`` output ``probs = (q + onehot) / 2``: a distribution (rows sum to 1), 0
outside the candidate classes, whose argmax is the assigned class (strictly: ``q >= 1e-6``), and the
model's (restricted) confidence in the assigned class is ``2 * probs.max(axis=1) - 1``.

Plate groups. Each plate of an RxRx1 experiment holds the treatments of one of ``G`` (4) fixed groups
of siRNAs: every train plate's set of treatment ``sirna_id`` belongs to one group; plates whose sets
overlap are the same group (so plates with missing wells still join their group), and a group's
classes are the union of its plates' sets. Group ``k`` is the group of plate ``k + 1`` of the first
complete train experiment (sorted by name); that numbering is only a name, every order is searched.
"""

from __future__ import annotations

import argparse
import itertools
import logging
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from deepnoise.ensemble import Predictions, check_wells, load_predictions, save_predictions
from deepnoise.errors import InputError, did_you_mean

log = logging.getLogger(__name__)

METHODS = ("groups", "exact", "paper", "none")
# Old method names: what replaced them (named in the error when a config or command uses one).
RENAMED = {
    "iterative": "the old 'iterative' is now paper (the paper's prior adjustment, over all classes, no "
    "plate groups); its group-restricted default is covered by groups (plate groups + Hungarian)",
}
PROB_FLOOR = 1e-6
# groups: warn when the best plate -> group order's margin (a paired t statistic, see
# choose_assignment and docs/balancing.md) is below this.
MIN_MARGIN = 3.0
MAX_GROUPS = 8  # 8! = 40,320 orders per experiment


def renamed_hint(method: str) -> str:
    """`` (...)`` saying what replaced an old method name, or ``""``."""
    return f" ({RENAMED[method]})" if method in RENAMED else ""


def check_method(method: str) -> None:
    if method not in METHODS:
        hint = renamed_hint(method) or did_you_mean(method, METHODS)
        raise InputError(f"unknown balancing method {method!r}{hint}; choose from {', '.join(METHODS)}")


@dataclass
class PlateGroups:
    """``groups[k]``: sorted class ids of group ``k``; ``train_orders``: experiment -> plate -> group
    order seen in the train plates (entry ``p - 1`` for plate ``p``; for the log only)."""

    groups: list[np.ndarray]
    train_orders: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def n_groups(self) -> int:
        return len(self.groups)

    @property
    def assignments(self) -> list[tuple[int, ...]]:
        """Every candidate plate -> group order (entry ``p - 1`` for plate ``p``): all permutations."""
        return list(itertools.permutations(range(self.n_groups)))


def _train_plate_sets(sites: pd.DataFrame, source: str) -> dict[tuple[str, int], np.ndarray]:
    """(experiment, plate) -> sorted ``sirna_id`` of the labelled train treatment wells of a site table."""
    need = {"dataset", "well_type", "experiment", "plate", "sirna_id"}
    missing = need - set(sites.columns)
    if missing:
        raise InputError(f"{source}: missing columns {sorted(missing)}")
    t = sites[(sites["dataset"] == "train") & (sites["well_type"] == "treatment") & (sites["sirna_id"] >= 0)]
    if t.empty:
        raise InputError(f"{source}: no labelled train treatment wells to infer the plate groups from")
    return {
        (str(e), int(p)): np.unique(g["sirna_id"].to_numpy(np.int64))
        for (e, p), g in t.groupby(["experiment", "plate"], sort=True)
    }


def _plate_components(plate_sets: dict[tuple[str, int], np.ndarray]) -> dict[tuple[str, int], int]:
    """Plate -> component id (a plate index), by union-find: two plates sharing a siRNA hold the same
    group."""
    keys = list(plate_sets)
    parent = list(range(len(keys)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict[int, int] = {}
    for i, k in enumerate(keys):
        for s in plate_sets[k].tolist():
            j = owner.setdefault(s, i)
            if j != i:
                parent[find(i)] = find(j)
    return {k: find(i) for i, k in enumerate(keys)}


def _complete_train_orders(comp: dict[tuple[str, int], int], source: str) -> dict[str, tuple[int, ...]]:
    """Experiment -> component per plate (plate order) of the complete train experiments (as many plates
    as there are components, all distinct), sorted by name; ``InputError`` when the components do not
    match the number of plates or no experiment is complete."""
    n_roots = len(set(comp.values()))
    by_exp: dict[str, dict[int, int]] = {}
    for (e, p), c in comp.items():
        by_exp.setdefault(e, {})[p] = c
    n_plates = max(len(v) for v in by_exp.values())
    if n_roots != n_plates:
        raise InputError(
            f"{source}: the train plates form {n_roots} disjoint siRNA groups, but experiments have "
            f"{n_plates} plates; cannot infer the plate groups"
        )
    complete = {
        e: tuple(m[p] for p in sorted(m))
        for e, m in sorted(by_exp.items())
        if len(m) == n_plates and len(set(m.values())) == n_plates
    }
    if not complete:
        raise InputError(f"{source}: no train experiment with {n_plates} plates of distinct groups")
    return complete


def infer_plate_groups(sites: pd.DataFrame, source: str = "site table") -> PlateGroups:
    """The plate groups (classes per group) from the labelled train plates of a site table."""
    plate_sets = _train_plate_sets(sites, source)
    comp = _plate_components(plate_sets)
    complete = _complete_train_orders(comp, source)
    ref_exp, ref_seq = next(iter(complete.items()))
    index = {root: k for k, root in enumerate(ref_seq)}
    groups = [
        np.unique(np.concatenate([plate_sets[key] for key, c in comp.items() if c == root]))
        for root in ref_seq
    ]
    if len(groups) > MAX_GROUPS:
        raise InputError(
            f"{source}: {len(groups)} plate groups; the groups method searches all plate -> group "
            f"orders, which is limited to {MAX_GROUPS} groups"
        )
    pg = PlateGroups(
        groups=groups, train_orders={e: tuple(index[c] for c in seq) for e, seq in complete.items()}
    )
    log.debug("plate groups from %s (reference %s): sizes %s", source, ref_exp, [len(g) for g in groups])
    return pg


def _log_restricted(probs: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """log of probabilities restricted to ``classes`` and renormalised, floored at PROB_FLOOR."""
    q = probs[:, classes].astype(np.float64)
    q = np.maximum(q / np.maximum(q.sum(axis=1, keepdims=True), 1e-300), PROB_FLOOR)
    q /= q.sum(axis=1, keepdims=True)
    return np.log(q)


@dataclass
class GroupChoice:
    """An experiment's chosen plate -> group order (``assignment``: plate -> group index), the
    runner-up order, and the evidence between them (see ``choose_assignment``)."""

    assignment: dict[int, int]
    runner_up: dict[int, int] | None
    margin: float  # paired t statistic of the per-well log-likelihood differences
    mean_diff: float  # their mean (nats per well of the plates where the two orders differ)
    n_orders: int

    def info(self) -> dict:
        return {
            "assignment": self.assignment,
            "runner_up": self.runner_up,
            "margin": round(self.margin, 2) if np.isfinite(self.margin) else None,
            "mean_diff": round(self.mean_diff, 4) if np.isfinite(self.mean_diff) else None,
            "orders_searched": self.n_orders,
        }


def _paired_t(d: np.ndarray) -> float:
    """mean(d) / (sd(d) / sqrt(n)); 0 when d is all 0, inf when it is a positive constant."""
    mean = float(d.mean())
    if len(d) < 2 or mean == 0.0:
        return 0.0 if mean == 0.0 else np.inf
    se = float(d.std(ddof=1)) / np.sqrt(len(d))
    return mean / se if se > 0 else np.inf


def choose_assignment(plate_probs: dict[int, np.ndarray], groups: PlateGroups) -> GroupChoice:
    """The plate -> group order of one experiment among all ``G!`` permutations.

    The score of an order is the log-likelihood ``sum_plates sum_wells log(sum_{c in group(plate)}
    p[w, c])`` that every well belongs to its plate's group. Only the plates present count, so
    orders that agree on them are one candidate; ties go to the smallest order.

    The margin compares the best order with the runner-up (the best order differing on a present
    plate): ``d_w`` is a well's log-likelihood under the best minus under the runner-up, over the
    wells of the plates where the two differ, and the margin is the paired t statistic
    ``mean(d) / (sd(d) / sqrt(n))`` (``inf`` without a runner-up, 0 on a tie). Unlike ``mean(d)``
    alone it does not depend on how confident (calibrated) the model is: on synthetic 1,108-class
    experiments every wrong order had a margin below 0.5 whatever the confidence (docs/balancing.md).
    """
    plates = sorted(plate_probs)
    logmass = {
        p: np.log(np.maximum(np.stack([x[:, g].sum(axis=1) for g in groups.groups], axis=1), 1e-300))
        for p, x in plate_probs.items()
    }  # per plate: wells x groups
    total = np.stack([logmass[p].sum(axis=0) for p in plates])  # plates x groups
    scores: dict[tuple[int, ...], float] = {}
    for order in groups.assignments:
        key = tuple(order[p - 1] for p in plates)
        if key not in scores:
            scores[key] = float(total[np.arange(len(plates)), list(key)].sum())
    ranked = sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))
    best = dict(zip(plates, ranked[0][0], strict=True))
    if len(ranked) == 1:
        return GroupChoice(best, None, np.inf, np.inf, 1)
    runner = dict(zip(plates, ranked[1][0], strict=True))
    d = np.concatenate(
        [logmass[p][:, best[p]] - logmass[p][:, runner[p]] for p in plates if best[p] != runner[p]]
    )
    return GroupChoice(best, runner, _paired_t(d), float(d.mean()), len(ranked))


def exact_plate(logq: np.ndarray) -> np.ndarray:
    """Hungarian one-to-one assignment of wells (rows) to classes (columns) maximising sum log q."""
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(-logq)
    out = np.empty(logq.shape[0], dtype=np.int64)
    out[rows] = cols
    return out


def _n_distinct(logits: np.ndarray) -> tuple[int, np.ndarray]:
    pred = logits.argmax(axis=1)
    counts = np.bincount(pred, minlength=logits.shape[1])
    return int((counts > 0).sum()), counts


def iterative_plate(
    logq: np.ndarray,
    max_iter: int = 1000,
    step: float = 0.5,
    patience: int = 10,
    min_step: float = 1e-3,
) -> tuple[np.ndarray, int]:
    """DeepNoise-style prior adjustment of one plate; returns (bias per class, iterations used).

    Predictions are the argmax of ``logq - bias`` (``bias`` starts at 0); the score is the number of
    distinct predicted classes. Each iteration adds ``step`` to the bias of every over-predicted
    class (predicted for more than one well), i.e. divides its probability by ``e**step``. When
    the best score has not improved for ``patience`` iterations, ``step`` halves. It stops when
    every class is predicted at most once, after ``max_iter`` iterations, or when ``step`` falls
    below ``min_step``; the bias of the best score seen (the earliest one on ties) is returned.
    """
    bias = np.zeros(logq.shape[1])
    score, counts = _n_distinct(logq)
    best_score, best_bias = score, bias.copy()
    stall = 0
    it = 0
    while it < max_iter and counts.max(initial=0) > 1 and step >= min_step:
        it += 1
        bias = bias + step * (counts > 1)
        score, counts = _n_distinct(logq - bias)
        if score > best_score:
            best_score, best_bias, stall = score, bias.copy(), 0
        else:
            stall += 1
            if stall >= patience:
                step, stall = step / 2, 0
    return best_bias, it


def _softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=1, keepdims=True)


def _plate_index(pred: Predictions) -> dict[tuple[str, int], np.ndarray]:
    keys = pd.DataFrame({"e": pred.experiment, "p": pred.plate})
    return {(str(e), int(p)): np.asarray(ix) for (e, p), ix in keys.groupby(["e", "p"]).indices.items()}


def _check_groups(pred: Predictions, groups: PlateGroups | None) -> None:
    """``InputError`` unless the plate groups are given and fit the classes of ``pred``."""
    if groups is None:
        raise InputError("balancing method groups needs the plate groups (a site table)")
    top = max(int(g.max()) for g in groups.groups)
    if top >= pred.n_classes:
        raise InputError(
            f"plate groups contain class {top}, but the predictions have {pred.n_classes} classes"
        )


def _choose_experiment_order(
    pred: Predictions, exp: str, exp_plates: dict[int, np.ndarray], groups: PlateGroups, min_margin: float
) -> GroupChoice:
    """The plate -> group order of experiment ``exp`` (``choose_assignment``); a WARNING when its margin
    over the runner-up is below ``min_margin``."""
    bad = [p for p in exp_plates if not 1 <= p <= groups.n_groups]
    if bad:
        raise InputError(f"experiment {exp}: plate {bad[0]} outside 1..{groups.n_groups}")
    choice = choose_assignment({p: pred.probs[ix] for p, ix in exp_plates.items()}, groups)
    if choice.margin < min_margin:
        log.warning(
            "experiment %s: weak plate -> group order: %s beats the runner-up %s with a margin "
            "of only %.2f (paired t of the per-well log-likelihoods, %.4f nats per well; "
            "threshold %g): the group restriction may be wrong for this experiment "
            "(methods exact and paper do not use the groups)",
            exp,
            choice.assignment,
            choice.runner_up,
            choice.margin,
            choice.mean_diff,
            min_margin,
        )
    return choice


def _balance_plate(logq: np.ndarray, method: str, max_iter: int) -> tuple[np.ndarray, tuple[int, int] | None]:
    """One plate's balanced probabilities over its candidate classes (``logq``: wells x classes) and,
    for ``paper``, (iterations used, duplicates left)."""
    if method == "paper":
        bias, n_iter = iterative_plate(logq, max_iter=max_iter)
        return _softmax(logq - bias), (n_iter, int(len(logq) - _n_distinct(logq - bias)[0]))
    assigned = exact_plate(logq)
    block = np.exp(logq)
    block[np.arange(len(logq)), assigned] += 1.0
    block /= 2
    return block, None


def _balance_experiment(
    pred: Predictions,
    exp: str,
    exp_plates: dict[int, np.ndarray],
    groups: PlateGroups | None,
    method: str,
    max_iter: int,
    min_margin: float,
    out: np.ndarray,
) -> dict:
    """Balance the plates (plate -> rows of ``pred``) of experiment ``exp`` into ``out``; returns the
    experiment's info."""
    use_groups = method == "groups"
    exp_info: dict = {}
    if use_groups:
        choice = _choose_experiment_order(pred, exp, exp_plates, groups, min_margin)
        exp_info.update(choice.info())
    for p, ix in sorted(exp_plates.items()):
        classes = groups.groups[choice.assignment[p]] if use_groups else np.arange(pred.n_classes)
        if method != "paper" and len(ix) > len(classes):
            where = "its group has only" if use_groups else "the predictions have only"
            raise InputError(
                f"experiment {exp} plate {p}: {len(ix)} wells but {where} {len(classes)} classes "
                f"(e.g. well {pred.well_id[ix[0]]})"
            )
        block, paper_info = _balance_plate(_log_restricted(pred.probs[ix], classes), method, max_iter)
        if paper_info is not None:
            exp_info.setdefault("iterations", {})[int(p)] = paper_info[0]
            exp_info.setdefault("duplicates_left", {})[int(p)] = paper_info[1]
        rows = np.zeros((len(ix), pred.n_classes), dtype=np.float64)
        rows[:, classes] = block
        out[ix] = rows.astype(np.float32)
    return exp_info


def balance_predictions(
    pred: Predictions,
    groups: PlateGroups | None = None,
    method: str = "groups",
    max_iter: int = 1000,
    min_margin: float = MIN_MARGIN,
) -> tuple[Predictions, dict]:
    """Balance every plate of ``pred``; returns the balanced predictions and per-experiment info.

    ``groups`` is required for ``groups`` and ignored by the other methods.
    """
    check_method(method)
    if method == "none":
        return pred.with_probs(pred.probs.copy()), {}
    if method == "groups":
        _check_groups(pred, groups)
    out = np.zeros_like(pred.probs, dtype=np.float32)
    info: dict = {}
    plates = _plate_index(pred)
    for exp in sorted({e for e, _ in plates}):
        exp_plates = {p: ix for (e, p), ix in plates.items() if e == exp}
        info[exp] = _balance_experiment(pred, exp, exp_plates, groups, method, max_iter, min_margin, out)
    return pred.with_probs(out), info


def _run(args: argparse.Namespace) -> int:
    check_method(args.method)
    pred = load_predictions(args.predictions)
    groups = None
    sites = None
    if args.sites is not None:
        from deepnoise.metadata import read_sites

        sites = read_sites(args.sites)
        check_wells(pred, sites, str(args.predictions), allow_missing=args.allow_missing)
    if args.method == "groups":
        if sites is None:
            raise InputError(f"--method {args.method} needs --sites (to infer the plate groups)")
        groups = infer_plate_groups(sites, source=str(args.sites))
    balanced, info = balance_predictions(
        pred, groups, method=args.method, max_iter=args.max_iter, min_margin=args.min_margin
    )
    for exp, i in info.items():
        log.info("%s: %s", exp, i)
    if sites is not None:
        from deepnoise.evaluate import accuracy_table, truth_from_sites

        truth = truth_from_sites(sites)
        for name, p in (("before", pred), ("after", balanced)):
            acc = accuracy_table(p, truth, missing="skip")
            if acc["n"]:
                log.info("validation accuracy %s balancing: %.4f (%d wells)", name, acc["accuracy"], acc["n"])
    save_predictions(balanced, args.out)
    log.info("balanced (%s) %d wells -> %s", args.method, len(balanced), args.out)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "balance",
        help="per-plate balancing of predictions",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--predictions", required=True, help="ensemble (or model) predictions npz")
    p.add_argument("--sites", help="site table (plate groups from its labelled train plates)")
    # No argparse `choices`: check_method names what replaced an old method name.
    p.add_argument(
        "--method",
        default="groups",
        metavar="{" + ",".join(METHODS) + "}",
        help="balancing method (default: groups; see above)",
    )
    p.add_argument("--max-iter", type=int, default=1000, help="paper: iterations per plate")
    p.add_argument(
        "--min-margin",
        type=float,
        default=MIN_MARGIN,
        help="groups: warn when the best plate -> group order's margin over the runner-up (paired t "
        "statistic of the per-well log-likelihoods) is below this (default %(default)s)",
    )
    p.add_argument(
        "--allow-missing",
        action="store_true",
        help="accept plates whose predictions lack some treatment wells of the site table",
    )
    p.add_argument("--out", required=True, help="balanced predictions npz (same format)")
    p.set_defaults(func=_run)
