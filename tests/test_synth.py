"""The synthetic screen: config validation, RxRx1-like structure, determinism, batch-effect strength."""

from __future__ import annotations

import json
from pathlib import Path

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
    # On 12 global features a linear classifier gets (seed 3) plate 0.145 > experiment 0.107 >
    # cell type 0.081 (chance 0.025); the old screen, whose only noise was per-plate gain and offset,
    # gave 0.72 / 0.36 / 0.15. The remaining gap is the noise per-plate normalisation cannot remove.
    chance = 1 / cfg["n_treatments"]
    assert acc["plate"] > 4 * chance, acc
    assert acc["plate"] > acc["experiment"] + 0.02, acc
    assert acc["experiment"] > acc["cell_type"] + 0.01, acc


# --- The noise model (docs/noise-model.md): every effect is present and survives per-plate
# normalisation as documented. Each test renders a screen with every effect off (QUIET) except the
# one under test, and compares it with the same screen without that effect.

# every technical and biological noise knob: the two calibration groups and the ones set on their own
NOISE_KNOBS = (
    "treatment_interaction",
    "response_strength",
    *synth.AFFINE,
    *synth.NUISANCE,
    "focus_blur",
    "well_noise",
    "pixel_noise",
)
QUIET = {**SMALL, "cell_types": ["HUVEC"], **dict.fromkeys(NOISE_KNOBS, 0.0)}


def on(*keys: str) -> dict:
    """The defaults of the named knobs (the effect as the demo screen has it)."""
    return {k: synth.DEFAULTS[k] for k in keys}


def render(cfg: dict) -> tuple[pd.DataFrame, np.ndarray]:
    """All sites of a screen in memory: (table of experiment/plate/well/label/site, float images)."""
    screen = synth.Screen(synth.validate_config(cfg))
    rows, images = [], []
    for w in screen.wells():
        for site in range(1, cfg["sites_per_well"] + 1):
            rows.append((w.experiment, w.plate, w.well, w.sirna_id, site))
            images.append(screen.render(w, site))
    md = pd.DataFrame(rows, columns=["experiment", "plate", "well", "label", "site"])
    return md, np.stack(images).astype(np.float64)


def plate_normalised(md: pd.DataFrame, images: np.ndarray) -> np.ndarray:
    """(x - mean_plate) / std_plate per channel, as the training's `normalization: plate`."""
    out = np.empty_like(images)
    for idx in md.groupby(["experiment", "plate"]).indices.values():
        mu = images[idx].mean(axis=(0, 2, 3), keepdims=True)
        sd = images[idx].std(axis=(0, 2, 3), keepdims=True)
        out[idx] = (images[idx] - mu) / sd
    return out


def test_validation_names_key_and_range(tmp_path, capsys):
    for change, text in (
        ({"gamma_plate": 1.5}, "'gamma_plate' must be a number in [0.0, 1.0]"),
        ({"crosstalk": -0.1}, "'crosstalk' must be a number in [0.0, 1.0]"),
        ({"cells_per_site": 0}, "'cells_per_site' must be a number in (0.0, 500.0]"),
        ({"well_noise": True}, "'well_noise' must be a number"),
        ({"plate_group_orders": "cyc"}, "'plate_group_orders' must be one of all, cyclic"),
        ({"image_size": 2048}, "'image_size' must be an integer in 16..1024"),
    ):
        with pytest.raises(synth.InputError) as err:
            synth.validate_config({**SMALL, **change})
        assert text in str(err.value)


def test_schema_bounds_are_the_generators():
    import yaml

    schema = yaml.safe_load((Path(__file__).parents[1] / "workflow/schemas/config.schema.yaml").read_text())
    props = schema["properties"]["synthetic"]["properties"]
    for key, (lo, hi) in synth.RANGES.items():
        low = "exclusiveMinimum" if key in synth.POSITIVE else "minimum"
        assert (props[key][low], props[key]["maximum"]) == (lo, hi), key
    for key, (lo, hi) in synth.INT_RANGES.items():
        assert (props[key]["minimum"], props[key]["maximum"]) == (lo, hi), key
    assert props["plate_group_orders"]["enum"] == list(synth.GROUP_ORDERS)
    assert set(props) == {*synth.REQUIRED, *synth.DEFAULTS}


def _orders(cfg: dict) -> list[tuple[int, ...]]:
    """Each experiment's plate -> group order, read from the wells' labels."""
    screen = synth.Screen(synth.validate_config(cfg))
    group_of = {int(c): k for k, g in enumerate(screen.groups) for c in g}
    plates = {}
    for w in screen.wells():
        if w.well_type == "treatment":
            plates.setdefault(w.experiment, {})[w.plate] = group_of[w.sirna_id]
    return [tuple(p[k] for k in layout.PLATES) for _, p in sorted(plates.items())]


def test_plate_group_orders_are_permutations_not_only_rotations():
    cfg = {**SMALL, "train_experiments_per_cell_type": 6}
    cyclic = {tuple((p + r) % 4 for p in range(4)) for r in range(4)}
    orders = _orders(cfg)
    assert all(sorted(o) == [0, 1, 2, 3] for o in orders)
    assert len([o for o in orders if o not in cyclic]) >= 2, orders
    assert len(set(orders)) >= 5, orders
    assert set(_orders({**cfg, "plate_group_orders": "cyclic"})) <= cyclic


def test_gamma_leaves_a_residual_that_affine_normalisation_cannot_remove():
    # Identical wells (no phenotype), strong per-plate gain and offset: after per-plate
    # normalisation the plates' pixel distributions have the same shape (skewness) without gamma,
    # not with it.
    base = {**QUIET, "phenotype_strength": 0.0, "n_treatments": 40, "sites_per_well": 4}
    base.update(experiment_gain=0.3, plate_gain=0.2, experiment_offset=10.0, plate_offset=5.0)

    def spread(cfg):
        md, images = render(cfg)
        z = plate_normalised(md, images)
        skew = [
            (z[idx].transpose(1, 0, 2, 3).reshape(6, -1) ** 3).mean(axis=1)
            for idx in md.groupby(["experiment", "plate"]).indices.values()
        ]
        return float(np.stack(skew).std(axis=0).mean())

    affine, gamma = spread(base), spread({**base, **on("gamma_experiment", "gamma_plate")})
    assert gamma > 3 * affine, (affine, gamma)


def test_illumination_field_survives_plate_normalisation():
    base = {**QUIET, "phenotype_strength": 0.0, "n_treatments": 40, "sites_per_well": 2}

    def spatial(cfg):
        md, images = render(cfg)
        z = plate_normalised(md, images)
        # Per plate, the pixel-wise median over its sites is the background times the field.
        out = []
        for idx in md.groupby(["experiment", "plate"]).indices.values():
            med = np.median(z[idx], axis=0)  # (6, S, S)
            blocks = med.reshape(6, 4, 8, 4, 8).mean(axis=(2, 4))
            out.append(blocks.std(axis=(1, 2)).mean())
        return float(np.mean(out))

    flat, field = spatial(base), spatial({**base, **on("illumination_experiment", "illumination_plate")})
    assert field > 3 * flat, (flat, field)


def test_focus_varies_between_plates():
    base = {**QUIET, "phenotype_strength": 0.0, "n_treatments": 40, "sites_per_well": 2}

    def spread(cfg):
        md, images = render(cfg)
        z = plate_normalised(md, images)[:, 1]  # a cytoplasm channel
        lap = np.abs(
            4 * z[:, 1:-1, 1:-1] - z[:, :-2, 1:-1] - z[:, 2:, 1:-1] - z[:, 1:-1, :-2] - z[:, 1:-1, 2:]
        )
        sharp = pd.Series(lap.mean(axis=(1, 2)))
        per_plate = sharp.groupby([md.experiment, md.plate]).mean()
        return float(np.log(per_plate).std())

    sharp, blurred = spread(base), spread({**base, **on("focus_blur", "focus_plate", "focus_site")})
    assert blurred > 2 * sharp, (sharp, blurred)


@pytest.mark.parametrize(
    "knobs, measure",
    [
        (("density_experiment", "density_plate", "density_well"), "count"),
        (("size_experiment", "size_plate"), "area"),
    ],
)
def test_cell_density_and_size_shift_between_plates(knobs, measure):
    # Nuclei (channel 1 above the background) as connected components: their number per site
    # follows the density, their median area the cell size.
    from scipy import ndimage

    base = {**QUIET, "phenotype_strength": 0.0, "n_treatments": 40, "sites_per_well": 2}

    def spread(cfg):
        md, images = render(cfg)
        values = []
        for image in images[:, 0] > synth.DEFAULTS["background"] + 1:
            labels, n = ndimage.label(image)
            areas = np.bincount(labels.ravel())[1:]
            values.append(n if measure == "count" else np.median(areas) if n else np.nan)
        per_plate = pd.Series(values, dtype=float).groupby([md.experiment, md.plate]).mean()
        return float(np.log(per_plate).std())

    fixed, shifted = spread(base), spread({**base, **on(*knobs)})
    assert shifted > 2 * fixed, (fixed, shifted)


def test_crosstalk_changes_channel_correlations_per_experiment():
    # Correlations between channels are invariant to any per-channel affine map, so per-plate
    # normalisation cannot undo a per-experiment mixing of the channels.
    base = {**QUIET, "phenotype_strength": 0.0, "n_treatments": 40, "sites_per_well": 1}
    base["train_experiments_per_cell_type"] = 3

    def spread(cfg):
        md, images = render(cfg)
        z = plate_normalised(md, images)
        corr = [
            np.corrcoef(z[idx].transpose(1, 0, 2, 3).reshape(6, -1))
            for idx in md.groupby("experiment").indices.values()
        ]
        return float(np.ptp(np.stack(corr), axis=0).max())

    none, crosstalk = spread(base), spread({**base, **on("crosstalk")})
    assert crosstalk > 3 * none, (none, crosstalk)


def test_stain_changes_signal_to_background_contrast():
    # The stain multiplies the cells' signal, not the background (alone it is affine per plate and
    # channel, so per-plate normalisation would remove it: docs/noise-model.md).
    base = {**QUIET, "phenotype_strength": 0.0, "n_treatments": 40, "sites_per_well": 1}

    def spread(cfg):
        md, images = render(cfg)
        contrast = [
            np.log(images[idx].mean(axis=(0, 2, 3)) - synth.DEFAULTS["background"])
            for idx in md.groupby(["experiment", "plate"]).indices.values()
        ]
        return float(np.stack(contrast).std(axis=0).mean())

    none, stain = spread(base), spread({**base, **on("stain_experiment", "stain_plate")})
    assert stain > 2 * none, (none, stain)


def test_well_position_gradient_and_edge_effect():
    # Many wells per plate; each site's median pixel is its background level.
    base = {
        **QUIET,
        "phenotype_strength": 0.0,
        "n_treatments": 200,
        "sites_per_well": 1,
        "image_size": 16,
        "pixel_noise": 5.0,
        "train_experiments_per_cell_type": 1,
    }

    def r2(cfg):
        md, images = render(cfg)
        z = plate_normalised(md, images)
        level = np.median(z.reshape(len(z), 6, -1), axis=2)
        pos = np.array([synth.well_position(w) for w in md.well])
        out = []
        for idx in md.groupby(["experiment", "plate"]).indices.values():
            x = np.column_stack([np.ones(len(idx)), pos[idx]])
            y = level[idx]
            resid = y - x @ np.linalg.lstsq(x, y, rcond=None)[0]
            out.append(1 - resid.var(axis=0) / y.var(axis=0))
        return float(np.mean(out))

    flat, gradient = r2(base), r2({**base, **on("well_gradient", "edge_effect")})
    edge_only = r2({**base, **on("edge_effect")})
    assert gradient > 0.5 and flat < 0.2, (flat, gradient)
    assert edge_only > 2 * flat, (flat, edge_only)


def test_well_level_noise_is_shared_by_a_wells_sites():
    # F ratio of the per-site mean cell intensity (foreground pixels): ~1 when the wells of a plate
    # are alike, > 1 when each well has its own shift.
    base = {**QUIET, "phenotype_strength": 0.0, "n_treatments": 40, "sites_per_well": 4}

    def f_ratio(cfg):
        md, images = render(cfg)
        cells = images > synth.DEFAULTS["background"] + 1
        feats = pd.DataFrame(np.log((images * cells).sum(axis=(2, 3)) / cells.sum(axis=(2, 3))))
        key = [md.experiment, md.plate, md.well]
        between = feats.groupby(key).mean().var().mean()
        within = feats.groupby(key).var().mean().mean()
        return float(between / (within / cfg["sites_per_well"]))

    none, noisy = f_ratio(base), f_ratio({**base, **on("well_noise")})
    assert noisy > 3 * none, (none, noisy)


def test_treatment_profiles_differ_between_experiments_after_plate_normalisation():
    base = {**QUIET, "n_treatments": 40, "sites_per_well": 3}

    def distance(cfg):
        md, images = render(cfg)
        z = plate_normalised(md, images)
        feats = pd.DataFrame(np.hstack([z.mean(axis=(2, 3)), z.std(axis=(2, 3))]))
        profile = feats.groupby([md.label, md.experiment]).mean()
        treat = profile[profile.index.get_level_values(0) < cfg["n_treatments"]]
        a, b = (treat.xs(e, level=1) for e in sorted(md.experiment.unique())[:2])
        return float(((a - b) ** 2).to_numpy().mean() / ((a - a.mean()) ** 2).to_numpy().mean())

    same = distance(base)
    interaction = distance({**base, **on("treatment_interaction")})
    assert interaction > 1.5 * same, (same, interaction)


def test_scales_multiply_their_group_and_one_leaves_the_knobs_as_given():
    cfg = synth.validate_config({**SMALL, "nuisance_scale": 0.25, "affine_scale": 0.5})
    eff = synth.effective_knobs(cfg)
    for knob in synth.NUISANCE:
        assert eff[knob] == synth.DEFAULTS[knob] * 0.25, knob
    for knob in synth.AFFINE:
        assert eff[knob] == synth.DEFAULTS[knob] * 0.5, knob
    for knob in ("pixel_noise", "well_noise", "treatment_interaction", "phenotype_strength"):
        assert eff[knob] == synth.DEFAULTS[knob], knob
    assert not set(synth.NUISANCE) & set(synth.AFFINE)
    # scale 1.0 (the default): the hard screen's images, byte for byte
    hard = synth.Screen(synth.validate_config(SMALL))
    ones = synth.Screen(synth.validate_config({**SMALL, "nuisance_scale": 1.0, "affine_scale": 1.0}))
    w = hard.wells()[5]
    assert np.array_equal(hard.render(w, 1), ones.render(w, 1))
    scaled = synth.Screen(cfg)
    assert not np.array_equal(hard.render(w, 1), scaled.render(w, 1))


def test_calibrated_screen_clips_at_most_one_percent_and_the_hard_one_more():
    """The clipping limit of docs/noise-model.md ("Calibrating the screen"): the demo's screen keeps
    <= 1 % of its pixels at 0 or 255; the hard screen (all scales 1) does not."""
    import yaml

    demo = yaml.safe_load((Path(__file__).parents[1] / "config" / "config.yaml").read_text())["synthetic"]
    cfg = {**demo, "image_size": 32, "n_treatments": 40}
    calibrated = synth.clipped_fractions(cfg, max_wells=4)
    assert calibrated["at_0"] + calibrated["at_255"] <= 0.01, calibrated
    hard = {
        k: v
        for k, v in cfg.items()
        if k not in ("nuisance_scale", "affine_scale", "brightness", "background")
    }
    clipped = synth.clipped_fractions(hard, max_wells=4)
    assert clipped["at_0"] + clipped["at_255"] > 0.05, clipped


def test_brightness_scales_the_cells_not_the_background():
    quiet = {**QUIET, "background": 30.0, "pixel_noise": 0.0}
    dim = synth.Screen(synth.validate_config({**quiet, "brightness": 0.5}))
    full = synth.Screen(synth.validate_config(quiet))
    w = full.wells()[0]
    a, b = dim.render(w, 1).astype(float), full.render(w, 1).astype(float)
    empty, cells = b == 30, b > 40  # background only; clearly inside cells
    assert empty.any() and cells.any()
    assert (a[empty] == 30).all()  # the background is not dimmed
    assert a[cells].mean() < b[cells].mean() - 10
