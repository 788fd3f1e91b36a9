import itertools
import logging

import numpy as np
import pandas as pd
import pytest

from deepnoise import cli
from deepnoise.balance import (
    balance_predictions,
    choose_assignment,
    infer_plate_groups,
    iterative_plate,
)
from deepnoise.ensemble import Predictions, load_predictions, save_predictions
from deepnoise.errors import InputError
from deepnoise.evaluate import accuracy_table
from tests.fixtures.balance import synthetic_case


def _true_assignment(pred, truth, groups):
    """experiment -> {plate: group index} from the truth."""
    out = {}
    for e, p, w in zip(pred.experiment, pred.plate, pred.well_id, strict=True):
        y = truth[w]
        out.setdefault(e, {})[int(p)] = next(k for k, g in enumerate(groups.groups) if y in g)
    return out


def test_infer_groups_matches_the_screen():
    sites, pred, truth = synthetic_case(n_classes=40, n_train=3, seed=3)
    g = infer_plate_groups(sites)
    assert g.n_groups == 4 and [len(x) for x in g.groups] == [10] * 4
    assert np.array_equal(np.sort(np.concatenate(g.groups)), np.arange(40))
    # every plate -> group order is a candidate, not only the cyclic ones
    assert g.assignments == list(itertools.permutations(range(4)))
    # every train plate's classes are exactly one group
    train = sites[sites.dataset == "train"]
    for e, d in train.groupby("experiment"):
        seq = tuple(
            next(k for k, gr in enumerate(g.groups) if set(gr) == set(dd.sirna_id))
            for _, dd in sorted(d.groupby("plate"))
        )
        assert g.train_orders[e] == seq, e


def test_infer_groups_with_missing_train_wells_and_bad_tables():
    sites, _, _ = synthetic_case(n_classes=40, n_train=3, seed=4)
    # drop some labelled train wells: plates sharing classes still join their groups
    lossy = sites.drop(sites.index[sites.dataset.eq("train")][::7])
    g = infer_plate_groups(lossy)
    assert g.n_groups == 4 and sum(len(x) for x in g.groups) == 40
    with pytest.raises(InputError, match="no labelled train"):
        infer_plate_groups(sites[sites.dataset == "test"])
    # a plate mixing two groups merges them: 3 groups for 4 plates
    broken = sites.copy()
    first = broken.index[(broken.dataset == "train") & (broken.plate == 1)][0]
    other = broken.loc[(broken.dataset == "train") & (broken.plate == 2), "sirna_id"].iloc[0]
    broken.loc[first, "sirna_id"] = other
    with pytest.raises(InputError, match="disjoint siRNA groups"):
        infer_plate_groups(broken)


def _plates(out):
    return pd.DataFrame({"e": out.experiment, "p": out.plate, "y": out.labels()}).groupby(["e", "p"])


def test_groups_recovers_permutation_and_order():
    sites, pred, truth = synthetic_case(n_classes=1108, n_eval=2, signal=4.0, seed=5)
    groups = infer_plate_groups(sites)
    raw = accuracy_table(pred, truth)["accuracy"]
    out, info = balance_predictions(pred, groups, "groups")
    acc = accuracy_table(out, truth)["accuracy"]
    assert acc > 0.95 and acc > raw + 0.1
    assert np.allclose(out.probs.sum(axis=1), 1.0, atol=1e-4)
    true = _true_assignment(pred, truth, groups)
    for e in true:
        assert info[e]["assignment"] == true[e]
        assert info[e]["orders_searched"] == 24
    # one-to-one within each plate, classes inside the plate's group
    for (e, p), d in _plates(out):
        assert d.y.is_unique
        assert set(d.y) <= set(groups.groups[info[e]["assignment"][p]])


@pytest.mark.parametrize("order", [(0, 2, 1, 3), (3, 1, 0, 2), (1, 0, 3, 2)])
def test_groups_non_cyclic_experiment_stays_perfect(order):
    # The train experiments only show cyclic orders; the predicted one is not cyclic. Searching
    # only the 4 rotations put half of the plates in the wrong group: accuracy 1.0 -> 0.5.
    sites, pred, truth = synthetic_case(n_classes=400, signal=8.0, seed=21, eval_order=order)
    groups = infer_plate_groups(sites)
    rotations = [tuple((p + r) % 4 for p in range(4)) for r in range(4)]
    assert all(o in rotations for o in groups.train_orders.values())
    assert accuracy_table(pred, truth)["accuracy"] == 1.0
    out, info = balance_predictions(pred, groups, "groups")
    assert accuracy_table(out, truth)["accuracy"] == 1.0
    assert info["SYN-03"]["assignment"] == {p + 1: g for p, g in enumerate(order)}


def test_groups_perfect_on_clean_permutation():
    sites, pred, truth = synthetic_case(n_classes=80, signal=8.0, noise=1.0, seed=6)
    out, _ = balance_predictions(pred, infer_plate_groups(sites), "groups")
    assert accuracy_table(out, truth)["accuracy"] == 1.0


def test_groups_handles_missing_wells():
    sites, pred, truth = synthetic_case(n_classes=1108, drop_wells=5, signal=3.5, seed=7)
    out, _ = balance_predictions(pred, infer_plate_groups(sites), "groups")
    assert len(out) == 4 * (277 - 5)
    assert accuracy_table(out, truth)["accuracy"] > accuracy_table(pred, truth)["accuracy"]
    for _, d in pd.DataFrame({"p": out.plate, "y": out.labels()}).groupby("p"):
        assert d.y.is_unique


def test_groups_and_exact_reject_plate_with_more_wells_than_classes():
    sites, pred, _ = synthetic_case(n_classes=40, seed=8)
    plate1 = np.flatnonzero(pred.plate == 1)
    extra = pred.take(plate1[:2])
    extra.well_id = np.array([w + "x" for w in extra.well_id])
    from deepnoise.ensemble import concat_predictions

    bigger = concat_predictions([pred, extra])
    with pytest.raises(InputError, match=r"plate 1: 12 wells but its group has only 10 classes"):
        balance_predictions(bigger, infer_plate_groups(sites), "groups")
    huge = concat_predictions([pred.take(np.flatnonzero(pred.plate == p)) for p in (1, 2, 3, 4)])
    huge.plate = np.ones(len(huge), np.int64)
    huge.probs = huge.probs[:, :30] / huge.probs[:, :30].sum(axis=1, keepdims=True)
    with pytest.raises(InputError, match=r"plate 1: 40 wells but the predictions have only 30 classes"):
        balance_predictions(huge, None, "exact")


def _groups_weak_margin_logs(caplog, signal, sharpness, seed):
    sites, pred, _ = synthetic_case(
        n_classes=1108, signal=signal, sharpness=sharpness, seed=seed, eval_order=(2, 0, 3, 1)
    )
    with caplog.at_level(logging.WARNING, logger="deepnoise.balance"):
        caplog.clear()
        _, info = balance_predictions(pred, infer_plate_groups(sites), "groups")
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING], info["SYN-03"]


@pytest.mark.parametrize("sharpness", [1.0, 10.0])
def test_groups_warns_on_weak_margin_only(caplog, sharpness):
    # ambiguous: a model near chance (raw accuracy ~1 %): the order is a guess -> a warning naming it
    weak, info = _groups_weak_margin_logs(caplog, signal=0.5, sharpness=sharpness, seed=31)
    assert len(weak) == 1 and "experiment SYN-03: weak plate -> group order" in weak[0]
    assert info["margin"] < 3.0 and info["runner_up"] is not None
    # clear: a model with ~40 % raw accuracy, whatever its confidence: no warning
    clear, info = _groups_weak_margin_logs(caplog, signal=3.0, sharpness=sharpness, seed=31)
    assert clear == [] and info["margin"] > 3.0
    assert info["assignment"] == {1: 2, 2: 0, 3: 3, 4: 1}


def test_groups_margin_of_uniform_predictions_is_zero():
    sites, pred, _ = synthetic_case(n_classes=40, seed=32)
    flat = pred.with_probs(np.full_like(pred.probs, 1 / 40))
    choice = choose_assignment(
        {p: flat.probs[flat.plate == p] for p in (1, 2, 3, 4)}, infer_plate_groups(sites)
    )
    assert choice.margin == 0.0 and choice.n_orders == 24
    # only the plates present count: with one plate there are 4 candidate groups, not 24 orders
    one = choose_assignment({2: pred.probs[pred.plate == 2]}, infer_plate_groups(sites))
    assert one.n_orders == 4 and list(one.assignment) == [2]


def _tiny(probs: np.ndarray, plate: int = 1) -> Predictions:
    n = len(probs)
    return Predictions(
        well_id=np.array([f"E_{plate}_w{i}" for i in range(n)]),
        experiment=np.array(["E"] * n),
        plate=np.full(n, plate, np.int64),
        well=np.array([f"w{i}" for i in range(n)]),
        dataset=np.array(["test"] * n),
        probs=probs.astype(np.float32),
    )


@pytest.mark.parametrize("seed", range(6))
def test_exact_is_optimal_against_brute_force(seed):
    rng = np.random.default_rng(seed)
    n_wells, n_classes = 4, 7
    probs = rng.dirichlet(np.full(n_classes, 0.5), size=n_wells)
    pred = _tiny(probs)
    out, _ = balance_predictions(pred, None, "exact")
    got = out.labels()
    assert len(set(got)) == n_wells
    logq = np.log(np.maximum(probs.astype(np.float32) / probs.astype(np.float32).sum(1, keepdims=True), 1e-6))
    score = lambda a: float(logq[np.arange(n_wells), list(a)].sum())  # noqa: E731
    best = max(itertools.permutations(range(n_classes), n_wells), key=score)
    assert score(got) == pytest.approx(score(best), abs=1e-9)
    # confidence in the assigned class: 2 * max - 1 is the model's probability of it
    assert np.allclose(2 * out.probs.max(axis=1) - 1, probs[np.arange(n_wells), got], atol=1e-4)


def test_exact_one_class_per_plate_over_all_classes():
    # RxRx1 shape: 277 wells per plate, 1,108 classes, no plate groups used
    sites, pred, truth = synthetic_case(n_classes=1108, signal=2.5, seed=41)
    out, info = balance_predictions(pred, None, "exact")
    assert info["SYN-03"] == {}
    for _, d in _plates(out):
        assert len(d) == 277 and d.y.is_unique
    assert np.allclose(out.probs.sum(axis=1), 1.0, atol=1e-4)
    assert accuracy_table(out, truth)["accuracy"] > accuracy_table(pred, truth)["accuracy"]
    # the groups, when given, are ignored
    same, _ = balance_predictions(pred, infer_plate_groups(sites), "exact")
    assert np.array_equal(same.probs, out.probs)


def test_paper_and_exact_do_not_use_the_plate_groups():
    # A well whose (unique) argmax lies outside its plate's group keeps it under paper and exact;
    # restricting the plate to its group (groups) moves it to its true class.
    sites, pred, truth = synthetic_case(n_classes=40, signal=8.0, seed=42)
    groups = infer_plate_groups(sites)
    w = int(np.flatnonzero(pred.plate == 1)[0])
    y = int(truth[pred.well_id[w]])
    own = next(g for g in groups.groups if y in g)
    other = int(next(c for c in range(40) if c not in own))
    probs = pred.probs.copy()
    probs[w, other] = probs[w, y] * 2
    probs[w] /= probs[w].sum()
    moved = pred.with_probs(probs)
    for method in ("paper", "exact"):
        with_groups, _ = balance_predictions(moved, groups, method)
        without, _ = balance_predictions(moved, None, method)
        assert np.array_equal(with_groups.probs, without.probs), method
        assert with_groups.labels()[w] == other, method
    by_group, _ = balance_predictions(moved, groups, "groups")
    assert by_group.labels()[w] == y


def test_paper_improves_and_terminates():
    sites, pred, truth = synthetic_case(n_classes=1108, signal=3.5, seed=9)
    raw = accuracy_table(pred, truth)["accuracy"]
    out, info = balance_predictions(pred, None, "paper", max_iter=500)
    assert accuracy_table(out, truth)["accuracy"] > raw
    exp = next(iter(info.values()))
    assert all(n <= 500 for n in exp["iterations"].values())
    assert sum(exp["duplicates_left"].values()) < 0.05 * len(pred)
    assert np.allclose(out.probs.sum(axis=1), 1.0, atol=1e-4)


def test_iterative_constructed_case():
    # three wells all prefer class 0; their second choices are distinct: lowering class 0 fixes it
    logq = np.log(np.array([[0.5, 0.4, 0.05, 0.05], [0.45, 0.05, 0.45, 0.05], [0.6, 0.05, 0.05, 0.3]]))
    bias, n_iter = iterative_plate(logq, max_iter=100)
    pred = (logq - bias).argmax(axis=1)
    assert n_iter < 100
    assert list(pred) == [1, 2, 0]
    # max_iter bounds the loop
    _, n = iterative_plate(logq, max_iter=1)
    assert n == 1


@pytest.mark.parametrize("seed", [10, 11, 12])
def test_balancing_strictly_improves_noisy(seed):
    sites, pred, truth = synthetic_case(n_classes=400, signal=2.5, seed=seed, eval_dataset="train")
    groups = infer_plate_groups(sites[~sites.experiment.isin(np.unique(pred.experiment))])
    raw = accuracy_table(pred, truth)["correct"]
    # not paper: its heuristic (best number of distinct labels, not likelihood) can lose a few
    # wells on such under-confident 400-class plates (seed 10: 137 -> 135 correct)
    for method in ("groups", "exact"):
        out, _ = balance_predictions(pred, groups, method)
        assert accuracy_table(out, truth)["correct"] > raw, method


def test_none_is_a_copy_and_unknown_or_old_methods():
    sites, pred, _ = synthetic_case(n_classes=40, seed=13)
    out, info = balance_predictions(pred, None, "none")
    assert np.array_equal(out.probs, pred.probs) and out.probs is not pred.probs and info == {}
    with pytest.raises(InputError, match=r"unknown balancing method 'greedy'; choose from groups, exact"):
        balance_predictions(pred, None, "greedy")
    with pytest.raises(InputError, match=r"'exakt' \(did you mean exact\?\)"):
        balance_predictions(pred, None, "exakt")
    with pytest.raises(InputError, match=r"'iterative' \(the old 'iterative' is now paper .*groups"):
        balance_predictions(pred, infer_plate_groups(sites), "iterative")
    with pytest.raises(InputError, match="needs the plate groups"):
        balance_predictions(pred, None, "groups")


def test_balance_cli(tmp_path, capsys):
    sites, pred, truth = synthetic_case(n_classes=80, signal=3.0, seed=14, eval_dataset="train")
    sites.to_csv(tmp_path / "sites.csv", index=False)
    save_predictions(pred, tmp_path / "e.npz")
    for method in ("groups", "exact", "paper", "none"):
        rc = cli.main(
            ["balance", "--predictions", str(tmp_path / "e.npz"), "--sites", str(tmp_path / "sites.csv"),
             "--method", method, "--out", str(tmp_path / f"b_{method}.npz")]
        )  # fmt: skip
        assert rc == 0
        out = load_predictions(tmp_path / f"b_{method}.npz")
        assert np.array_equal(out.well_id, pred.well_id)
    for method in ("groups", "exact", "paper"):
        out = load_predictions(tmp_path / f"b_{method}.npz")
        assert accuracy_table(out, truth)["accuracy"] > accuracy_table(pred, truth)["accuracy"], method
    # exact and paper run without a site table; groups needs one
    rc = cli.main(["balance", "--predictions", str(tmp_path / "e.npz"), "--method", "exact",
                   "--out", str(tmp_path / "y.npz")])  # fmt: skip
    assert rc == 0
    rc = cli.main(["balance", "--predictions", str(tmp_path / "e.npz"), "--method", "groups",
                   "--out", str(tmp_path / "x.npz")])  # fmt: skip
    assert rc == 2 and "needs --sites" in capsys.readouterr().err
    assert not (tmp_path / "x.npz").exists()
    rc = cli.main(["balance", "--predictions", str(tmp_path / "e.npz"), "--method", "iterative",
                   "--out", str(tmp_path / "x.npz")])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "'iterative'" in err and "now paper" in err and "groups" in err
    assert not (tmp_path / "x.npz").exists()
