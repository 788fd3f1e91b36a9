"""Per-plate balancing of predictions: every treatment siRNA occurs exactly once per plate.

Plate groups. Each plate of an experiment holds the treatments of one of ``G`` (RxRx1: 4) fixed
groups of siRNAs, and the plate -> group assignment of an experiment is one of ``G`` cyclic
rotations. ``infer_plate_groups`` learns both from the labelled train plates of the site table:

- every train plate's set of treatment ``sirna_id`` belongs to one group; plates whose sets overlap
  are the same group (so plates with missing wells still join their group), and a group's classes
  are the union of its plates' sets;
- the reference order is the plate sequence of the first complete train experiment (sorted by
  name): ``groups[k]`` is the group of its plate ``k + 1``. Rotation ``r`` maps plate ``p`` to group
  ``(p - 1 + r) % G``. The candidate assignments are the ``G`` rotations plus any non-cyclic
  assignment seen in a train experiment (logged as a warning).

Methods (``balance_predictions``), applied to each experiment independently:

- ``exact``: choose the candidate assignment maximising ``sum_plates sum_wells log(sum_{c in
  group(plate)} p[w, c])`` (the log-likelihood that the plate's wells belong to that group); restrict
  each plate's probabilities to its group's classes and renormalise (``q``); assign wells to distinct
  classes with the Hungarian algorithm on ``-log q`` (rectangular when the plate misses wells; a plate
  with more wells than its group has classes is an ``InputError``). Output ``probs = (q + onehot) /
  2``: a distribution (rows sum to 1) that is 0 outside the group, whose argmax is the assigned class
  (strictly: ``q`` is floored at ``1e-6`` before the Hungarian step), and the model's restricted
  confidence in the assigned class is ``2 * probs.max(axis=1) - 1``.
- ``iterative`` (the DeepNoise prior adjustment, see ``iterative_plate``): per plate, on ``log q``
  (group-restricted and renormalised, unless ``restrict=False``: all classes), repeatedly divide
  the probability of every over-predicted class by ``e**step`` (a per-class bias in log space); the
  step halves when the number of distinct predicted classes has not improved for 10 iterations.
  Output ``probs = softmax(log q - bias)`` (0 outside the group when restricted); argmax is the
  adjusted prediction. A few duplicates may remain (reported per plate in the log).
- ``none``: the input unchanged.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from deepnoise.ensemble import Predictions, check_wells, load_predictions, save_predictions
from deepnoise.errors import InputError

log = logging.getLogger(__name__)

METHODS = ("exact", "iterative", "none")
PROB_FLOOR = 1e-6


@dataclass
class PlateGroups:
    """``groups[k]``: sorted class ids of group ``k``; ``assignments``: candidate plate -> group maps.

    Each assignment is a tuple of group indices, entry ``p - 1`` for plate ``p``.
    """

    groups: list[np.ndarray]
    assignments: list[tuple[int, ...]] = field(default_factory=list)

    @property
    def n_groups(self) -> int:
        return len(self.groups)

    def rotation(self, r: int) -> tuple[int, ...]:
        g = self.n_groups
        return tuple((p + r) % g for p in range(g))


def infer_plate_groups(sites: pd.DataFrame, source: str = "site table") -> PlateGroups:
    """Groups and their cyclic order from the labelled train plates of a site table."""
    need = {"dataset", "well_type", "experiment", "plate", "sirna_id"}
    missing = need - set(sites.columns)
    if missing:
        raise InputError(f"{source}: missing columns {sorted(missing)}")
    t = sites[(sites["dataset"] == "train") & (sites["well_type"] == "treatment") & (sites["sirna_id"] >= 0)]
    if t.empty:
        raise InputError(f"{source}: no labelled train treatment wells to infer the plate groups from")
    plate_sets = {
        (str(e), int(p)): np.unique(g["sirna_id"].to_numpy(np.int64))
        for (e, p), g in t.groupby(["experiment", "plate"], sort=True)
    }
    keys = list(plate_sets)
    # Union-find over plates: two plates sharing a siRNA hold the same group.
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
    comp = {k: find(i) for i, k in enumerate(keys)}
    roots = sorted(set(comp.values()))
    by_exp: dict[str, dict[int, int]] = {}
    for (e, p), c in comp.items():
        by_exp.setdefault(e, {})[p] = c
    n_plates = max(len(v) for v in by_exp.values())
    if len(roots) != n_plates:
        raise InputError(
            f"{source}: the train plates form {len(roots)} disjoint siRNA groups, but experiments have "
            f"{n_plates} plates; cannot infer the plate groups"
        )
    complete = {
        e: tuple(m[p] for p in sorted(m))
        for e, m in sorted(by_exp.items())
        if len(m) == n_plates and len(set(m.values())) == n_plates
    }
    if not complete:
        raise InputError(f"{source}: no train experiment with {n_plates} plates of distinct groups")
    ref_exp, ref_seq = next(iter(complete.items()))
    index = {root: k for k, root in enumerate(ref_seq)}
    groups = [
        np.unique(np.concatenate([plate_sets[key] for key, c in comp.items() if c == root]))
        for root in ref_seq
    ]
    pg = PlateGroups(groups=groups)
    pg.assignments = [pg.rotation(r) for r in range(n_plates)]
    for e, seq in complete.items():
        a = tuple(index[c] for c in seq)
        if a not in pg.assignments:
            log.warning("%s: experiment %s has a non-cyclic plate->group order %s", source, e, a)
            pg.assignments.append(a)
    log.debug("plate groups from %s (reference %s): sizes %s", source, ref_exp, [len(g) for g in groups])
    return pg


def _log_restricted(probs: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """log of probabilities restricted to ``classes`` and renormalised, floored at PROB_FLOOR."""
    q = probs[:, classes].astype(np.float64)
    q = np.maximum(q / np.maximum(q.sum(axis=1, keepdims=True), 1e-300), PROB_FLOOR)
    q /= q.sum(axis=1, keepdims=True)
    return np.log(q)


def choose_assignment(
    plate_probs: dict[int, np.ndarray], groups: PlateGroups
) -> tuple[tuple[int, ...], np.ndarray]:
    """The candidate assignment maximising the wells' summed log group mass; also all scores."""
    mass = {
        p: np.log(np.maximum(np.stack([x[:, g].sum(axis=1) for g in groups.groups], axis=1), 1e-300))
        for p, x in plate_probs.items()
    }
    scores = np.array(
        [
            sum(float(m[:, a[p - 1]].sum()) for p, m in mass.items() if 1 <= p <= len(a))
            for a in groups.assignments
        ]
    )
    return groups.assignments[int(np.argmax(scores))], scores


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


def balance_predictions(
    pred: Predictions,
    groups: PlateGroups | None,
    method: str = "exact",
    max_iter: int = 1000,
    restrict: bool = True,
) -> tuple[Predictions, dict]:
    """Balance every plate of ``pred``; returns the balanced predictions and per-experiment info.

    ``groups`` is required for ``exact`` and for ``iterative`` with ``restrict``.
    """
    if method not in METHODS:
        raise InputError(f"unknown balancing method {method!r} (choose from {', '.join(METHODS)})")
    if method == "none":
        return pred.with_probs(pred.probs.copy()), {}
    use_groups = method == "exact" or restrict
    if use_groups and groups is None:
        raise InputError(f"balancing method {method} needs the plate groups (a site table)")
    if use_groups:
        top = max(int(g.max()) for g in groups.groups)
        if top >= pred.n_classes:
            raise InputError(
                f"plate groups contain class {top}, but the predictions have {pred.n_classes} classes"
            )
    out = np.zeros_like(pred.probs, dtype=np.float32)
    info: dict = {}
    plates = _plate_index(pred)
    for exp in sorted({e for e, _ in plates}):
        exp_plates = {p: ix for (e, p), ix in plates.items() if e == exp}
        exp_info: dict = {}
        if use_groups:
            bad = [p for p in exp_plates if not 1 <= p <= groups.n_groups]
            if bad:
                raise InputError(f"experiment {exp}: plate {bad[0]} outside 1..{groups.n_groups}")
            assignment, scores = choose_assignment(
                {p: pred.probs[ix] for p, ix in exp_plates.items()}, groups
            )
            exp_info["assignment"] = {int(p): int(assignment[p - 1]) for p in sorted(exp_plates)}
            exp_info["assignment_scores"] = [round(float(s), 3) for s in scores]
        for p, ix in sorted(exp_plates.items()):
            probs = pred.probs[ix]
            if use_groups:
                classes = groups.groups[assignment[p - 1]]
            else:
                classes = np.arange(pred.n_classes)
            if method == "exact" and len(ix) > len(classes):
                raise InputError(
                    f"experiment {exp} plate {p}: {len(ix)} wells but its group has only "
                    f"{len(classes)} classes (e.g. well {pred.well_id[ix[0]]})"
                )
            logq = _log_restricted(probs, classes)
            if method == "exact":
                assigned = exact_plate(logq)
                q = np.exp(logq)
                q[np.arange(len(ix)), assigned] += 1.0
                block = q / 2
            else:
                bias, n_iter = iterative_plate(logq, max_iter=max_iter)
                block = _softmax(logq - bias)
                exp_info.setdefault("iterations", {})[int(p)] = n_iter
                exp_info.setdefault("duplicates_left", {})[int(p)] = int(
                    len(ix) - _n_distinct(logq - bias)[0]
                )
            rows = np.zeros((len(ix), pred.n_classes), dtype=np.float64)
            rows[:, classes] = block
            out[ix] = rows.astype(np.float32)
        info[exp] = exp_info
    return pred.with_probs(out), info


def _run(args: argparse.Namespace) -> int:
    pred = load_predictions(args.predictions)
    groups = None
    sites = None
    if args.sites is not None:
        from deepnoise.evaluate import read_sites

        sites = read_sites(args.sites)
        check_wells(pred, sites, str(args.predictions), allow_missing=args.allow_missing)
    needs_groups = args.method == "exact" or (args.method == "iterative" and args.restrict)
    if needs_groups:
        if sites is None:
            raise InputError(f"--method {args.method} needs --sites (to infer the plate groups)")
        groups = infer_plate_groups(sites, source=str(args.sites))
    balanced, info = balance_predictions(
        pred, groups, method=args.method, max_iter=args.max_iter, restrict=args.restrict
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
    p.add_argument("--method", choices=METHODS, default="exact")
    p.add_argument("--max-iter", type=int, default=1000, help="iterative: iterations per plate")
    p.add_argument(
        "--no-restrict",
        dest="restrict",
        action="store_false",
        help="iterative: do not restrict plates to their inferred group's classes",
    )
    p.add_argument(
        "--allow-missing",
        action="store_true",
        help="accept plates whose predictions lack some treatment wells of the site table",
    )
    p.add_argument("--out", required=True, help="balanced predictions npz (same format)")
    p.set_defaults(func=_run)


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
) -> tuple[pd.DataFrame, Predictions, pd.Series]:
    """A synthetic screen for tests and benchmarks: (site table, predictions, truth).

    Classes are split at random into ``n_groups`` groups; every experiment gets a random cyclic
    rotation of the groups over its ``n_groups`` plates and a random well order. The site table has
    ``n_train`` labelled train experiments plus the ``n_eval`` predicted ones (labelled when
    ``eval_dataset == "train"``, i.e. validation). Predicted logits are ``N(0, noise)`` with
    ``signal`` added to the true class, probabilities ``softmax(sharpness * logits)`` (sharpness
    sets the confidence, not the argmax); ``drop_wells`` wells per predicted plate are left out.
    """
    from deepnoise.layout import INNER_WELLS, well_id

    rng = np.random.default_rng(seed)
    groups = np.array_split(rng.permutation(n_classes), n_groups)
    rows, pred_rows, logits = [], [], []
    for i in range(n_train + n_eval):
        exp = f"SYN-{i + 1:02d}"
        dataset = "train" if i < n_train else eval_dataset
        r = int(rng.integers(n_groups))
        for p in range(1, n_groups + 1):
            classes = rng.permutation(groups[(p - 1 + r) % n_groups])
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
        probs=_softmax(sharpness * logits).astype(np.float32),
    )
    truth = pd.Series(meta["y"].to_numpy(np.int64), index=meta["well_id"].to_numpy(str))
    return sites, pred, truth
