import numpy as np
import pandas as pd
import pytest

from deepnoise import cli
from deepnoise.balance import (
    balance_predictions,
    infer_plate_groups,
    iterative_plate,
    synthetic_case,
)
from deepnoise.ensemble import load_predictions, save_predictions
from deepnoise.errors import InputError
from deepnoise.evaluate import accuracy_table


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
    assert g.assignments == [(0, 1, 2, 3), (1, 2, 3, 0), (2, 3, 0, 1), (3, 0, 1, 2)]
    # every train plate's classes are exactly one group, consistent with a rotation
    train = sites[sites.dataset == "train"]
    for e, d in train.groupby("experiment"):
        seq = tuple(
            next(k for k, gr in enumerate(g.groups) if set(gr) == set(dd.sirna_id))
            for _, dd in sorted(d.groupby("plate"))
        )
        assert seq in g.assignments, e


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


def test_exact_recovers_permutation_and_rotation():
    sites, pred, truth = synthetic_case(n_classes=1108, n_eval=2, signal=4.0, seed=5)
    groups = infer_plate_groups(sites)
    raw = accuracy_table(pred, truth)["accuracy"]
    out, info = balance_predictions(pred, groups, "exact")
    acc = accuracy_table(out, truth)["accuracy"]
    assert acc > 0.95 and acc > raw + 0.1
    assert np.allclose(out.probs.sum(axis=1), 1.0, atol=1e-4)
    true = _true_assignment(pred, truth, groups)
    for e in true:
        assert info[e]["assignment"] == true[e]
    # one-to-one within each plate, classes inside the plate's group
    for (e, p), d in pd.DataFrame({"e": out.experiment, "p": out.plate, "y": out.labels()}).groupby(
        ["e", "p"]
    ):
        assert d.y.is_unique
        assert set(d.y) <= set(groups.groups[info[e]["assignment"][p]])


def test_exact_perfect_on_clean_permutation():
    sites, pred, truth = synthetic_case(n_classes=80, signal=8.0, noise=1.0, seed=6)
    out, _ = balance_predictions(pred, infer_plate_groups(sites), "exact")
    assert accuracy_table(out, truth)["accuracy"] == 1.0


def test_exact_handles_missing_wells():
    sites, pred, truth = synthetic_case(n_classes=1108, drop_wells=5, signal=3.5, seed=7)
    out, _ = balance_predictions(pred, infer_plate_groups(sites), "exact")
    assert len(out) == 4 * (277 - 5)
    assert accuracy_table(out, truth)["accuracy"] > accuracy_table(pred, truth)["accuracy"]
    for _, d in pd.DataFrame({"p": out.plate, "y": out.labels()}).groupby("p"):
        assert d.y.is_unique


def test_exact_rejects_plate_with_more_wells_than_classes():
    sites, pred, _ = synthetic_case(n_classes=40, seed=8)
    plate1 = np.flatnonzero(pred.plate == 1)
    extra = pred.take(plate1[:2])
    extra.well_id = np.array([w + "x" for w in extra.well_id])
    from deepnoise.ensemble import concat_predictions

    bigger = concat_predictions([pred, extra])
    with pytest.raises(InputError, match=r"plate 1: 12 wells but its group has only 10 classes"):
        balance_predictions(bigger, infer_plate_groups(sites), "exact")


def test_iterative_improves_and_terminates():
    sites, pred, truth = synthetic_case(n_classes=1108, signal=3.5, seed=9)
    groups = infer_plate_groups(sites)
    raw = accuracy_table(pred, truth)["accuracy"]
    out, info = balance_predictions(pred, groups, "iterative", max_iter=500)
    assert accuracy_table(out, truth)["accuracy"] > raw + 0.1
    exp = next(iter(info.values()))
    assert all(n <= 500 for n in exp["iterations"].values())
    assert sum(exp["duplicates_left"].values()) < 0.05 * len(pred)
    # without group restriction it still improves
    out2, _ = balance_predictions(pred, None, "iterative", restrict=False)
    assert accuracy_table(out2, truth)["accuracy"] > raw


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
    for method in ("exact", "iterative"):
        out, _ = balance_predictions(pred, groups, method)
        assert accuracy_table(out, truth)["correct"] > raw, method


def test_none_is_a_copy_and_unknown_method():
    sites, pred, _ = synthetic_case(n_classes=40, seed=13)
    out, info = balance_predictions(pred, None, "none")
    assert np.array_equal(out.probs, pred.probs) and out.probs is not pred.probs and info == {}
    with pytest.raises(InputError, match="unknown balancing method"):
        balance_predictions(pred, None, "greedy")
    with pytest.raises(InputError, match="needs the plate groups"):
        balance_predictions(pred, None, "exact")


def test_balance_cli(tmp_path, capsys):
    sites, pred, truth = synthetic_case(n_classes=80, signal=3.0, seed=14, eval_dataset="train")
    sites.to_csv(tmp_path / "sites.csv", index=False)
    save_predictions(pred, tmp_path / "e.npz")
    for method in ("exact", "iterative", "none"):
        rc = cli.main(
            ["balance", "--predictions", str(tmp_path / "e.npz"), "--sites", str(tmp_path / "sites.csv"),
             "--method", method, "--out", str(tmp_path / f"b_{method}.npz")]
        )  # fmt: skip
        assert rc == 0
        out = load_predictions(tmp_path / f"b_{method}.npz")
        assert np.array_equal(out.well_id, pred.well_id)
    exact = load_predictions(tmp_path / "b_exact.npz")
    assert accuracy_table(exact, truth)["accuracy"] > accuracy_table(pred, truth)["accuracy"]
    rc = cli.main(["balance", "--predictions", str(tmp_path / "e.npz"), "--method", "exact",
                   "--out", str(tmp_path / "x.npz")])  # fmt: skip
    assert rc == 2 and "needs --sites" in capsys.readouterr().err
    assert not (tmp_path / "x.npz").exists()
