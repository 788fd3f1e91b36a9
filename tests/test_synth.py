"""The synthetic screen: config validation, RxRx1-like structure, determinism, batch-effect strength."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from deepnoise import layout, synth
from deepnoise.cli import main

SMALL = {
    "seed": 3,
    "image_size": 32,
    "cell_types": ["HUVEC", "RPE"],
    "train_experiments_per_cell_type": 2,
    "test_experiments_per_cell_type": 1,
    "n_treatments": 8,
    "n_positive_controls": 2,
    "sites_per_well": 2,
}


def run(tmp_path, cfg, name="out", threads=1):
    out = tmp_path / name
    rc = main(
        [
            "synthesize",
            "--config-json",
            json.dumps(cfg),
            "--out-images",
            str(out / "images"),
            "--out-metadata",
            str(out / "metadata.csv"),
            "--out-truth",
            str(out / "test_truth.csv"),
            "--threads",
            str(threads),
        ]
    )
    return rc, out


@pytest.mark.parametrize(
    "change, key",
    [
        ({"bogus": 1}, "bogus"),
        ({"n_treatments": 10}, "n_treatments"),
        ({"image_size": "64"}, "image_size"),
        ({"pixel_noise": -1}, "pixel_noise"),
        ({"cell_types": ["HU-VEC"]}, "cell_types"),
    ],
)
def test_config_errors_name_the_key(tmp_path, capsys, change, key):
    rc, out = run(tmp_path, {**SMALL, **change})
    assert rc == 2
    assert repr(key) in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())


def test_missing_key(tmp_path, capsys):
    cfg = dict(SMALL)
    del cfg["sites_per_well"]
    assert run(tmp_path, cfg)[0] == 2
    assert "'sites_per_well'" in capsys.readouterr().err


def test_structure(tmp_path):
    rc, out = run(tmp_path, SMALL)
    assert rc == 0
    md = pd.read_csv(out / "metadata.csv", keep_default_na=False)
    truth = pd.read_csv(out / "test_truth.csv")
    assert list(md.columns) == synth.METADATA_COLUMNS
    assert list(truth.columns) == synth.TRUTH_COLUMNS
    experiments = layout.synthetic_experiments(SMALL)
    assert sorted(md.experiment.unique()) == sorted(e.experiment for e in experiments)
    n, p = SMALL["n_treatments"], SMALL["n_positive_controls"]
    labels = dict(zip(truth.well_id, truth.sirna_id, strict=True))
    md["label"] = [labels.get(w, s) for w, s in zip(md.well_id, md.sirna_id, strict=True)]
    wells = md[md.site == 1]
    assert set(md.site) == {1, 2} and set(md.plate) == set(layout.PLATES)
    assert set(md.well) <= set(layout.INNER_WELLS)
    groups = {}
    for (exp, plate), w in wells.groupby(["experiment", "plate"]):
        treat = w[w.well_type == "treatment"]
        assert len(treat) == n // 4 and treat.label.is_unique  # each class of the group once
        groups[(exp, plate)] = frozenset(treat.label)
        assert sorted(w[w.well_type == "positive_control"].label) == list(range(n, n + p))
        neg = w[w.well_type == "negative_control"]
        assert list(neg.label) == [n + p] and list(neg.sirna) == ["EMPTY"]
        assert w.well.is_unique
    distinct = set(groups.values())
    assert len(distinct) == 4 and set().union(*distinct) == set(range(n))  # 4 disjoint groups
    for exp in md.experiment.unique():  # plates of an experiment: a cyclic rotation of the groups
        order = [groups[(exp, p)] for p in layout.PLATES]
        assert len(set(order)) == 4
    test = md[md.dataset == "test"]
    assert (test[test.well_type == "treatment"].sirna_id == -1).all()
    assert (test[test.well_type == "treatment"].sirna == "").all()
    assert set(truth.well_id) == set(test[test.well_type == "treatment"].well_id)
    png = out / "images" / md.experiment[0] / f"Plate{md.plate[0]}" / f"{md.well[0]}_s1_w6.png"
    with Image.open(png) as img:
        assert img.mode == "L" and img.size == (32, 32)


def test_deterministic(tmp_path):
    _, a = run(tmp_path, SMALL, "a", threads=1)
    _, b = run(tmp_path, SMALL, "b", threads=2)
    _, c = run(tmp_path, {**SMALL, "seed": 4}, "c")
    files = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    assert files == sorted(p.relative_to(b) for p in b.rglob("*.png"))
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert (a / "metadata.csv").read_bytes() == (b / "metadata.csv").read_bytes()
    assert any((a / f).read_bytes() != (c / f).read_bytes() for f in files if (c / f).exists())


def _accuracies(md: pd.DataFrame, images: np.ndarray) -> dict[str, float]:
    """Nearest-class-mean (LDA) accuracy on per-channel mean/std features, per normalisation,
    leaving one experiment out at a time within each cell type."""
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    mean, std = images.mean(axis=(2, 3)), images.std(axis=(2, 3))
    out = {}
    for mode, keys in (
        ("cell_type", ["cell_type"]),
        ("experiment", ["experiment"]),
        ("plate", ["experiment", "plate"]),
    ):
        feats = np.zeros((len(md), 12))
        for _, idx in md.groupby(keys).indices.items():
            mu, sd = images[idx].mean(axis=(0, 2, 3)), images[idx].std(axis=(0, 2, 3))
            feats[idx] = np.hstack([(mean[idx] - mu) / sd, std[idx] / sd])
        hits = []
        for _, ct in md[md.well_type == "treatment"].groupby("cell_type"):
            for exp in ct.experiment.unique():
                train, test = ct[ct.experiment != exp], ct[ct.experiment == exp]
                clf = LinearDiscriminantAnalysis().fit(feats[train.index], train.label)
                hits.extend(clf.predict(feats[test.index]) == test.label)
        out[mode] = float(np.mean(hits))
    return out


def test_plate_normalisation_beats_experiment_beats_cell_type(tmp_path):
    cfg = {
        **SMALL,
        "image_size": 48,
        "train_experiments_per_cell_type": 4,
        "test_experiments_per_cell_type": 1,
        "n_treatments": 40,
        "n_positive_controls": 4,
    }
    rc, out = run(tmp_path, cfg, threads=2)
    assert rc == 0
    md = pd.read_csv(out / "metadata.csv", keep_default_na=False)
    truth = pd.read_csv(out / "test_truth.csv")
    labels = dict(zip(truth.well_id, truth.sirna_id, strict=True))
    md["label"] = [labels.get(w, s) for w, s in zip(md.well_id, md.sirna_id, strict=True)]
    images = np.stack(
        [
            np.stack(
                [
                    np.asarray(
                        Image.open(
                            out / "images" / r.experiment / f"Plate{r.plate}" / f"{r.well}_s{r.site}_w{c}.png"
                        )
                    )
                    for c in range(1, 7)
                ]
            )
            for r in md.itertuples()
        ]
    ).astype(np.float64)
    acc = _accuracies(md, images)
    chance = 1 / cfg["n_treatments"]
    assert acc["plate"] > 10 * chance, acc
    assert acc["plate"] > acc["experiment"] + 0.1, acc
    assert acc["experiment"] > acc["cell_type"] + 0.05, acc
