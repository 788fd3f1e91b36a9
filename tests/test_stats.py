"""Plate statistics, their exact aggregation and the normalisation table, against numpy."""

from __future__ import annotations

import json

import numpy as np
import pytest

from deepnoise.cli import main
from deepnoise.metadata import build_sites
from deepnoise.stats import normalization_table
from tests.fixtures.data import site_image, write_rxrx1

PLATES = [("HUVEC-01", 1), ("HUVEC-01", 2), ("HUVEC-02", 1), ("HUVEC-02", 2), ("RPE-01", 1)]


@pytest.fixture(scope="module")
def stats(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stats")
    df, _, _ = build_sites("rxrx1", write_rxrx1(tmp / "rel"))
    df.to_csv(tmp / "sites.csv", index=False)
    files = {}
    for e, p in PLATES:
        h5 = tmp / "stacks" / e / f"Plate{p}.h5"
        assert (
            main(
                [
                    "stack",
                    "--sites",
                    str(tmp / "sites.csv"),
                    "--experiment",
                    e,
                    "--plate",
                    str(p),
                    "--out",
                    str(h5),
                ]
            )
            == 0
        )
        files[(e, p)] = tmp / "stats" / "plate" / e / f"Plate{p}.json"
        assert main(["plate-stats", "--stack", str(h5), "--out", str(files[(e, p)])]) == 0
    for e in ("HUVEC-01", "HUVEC-02"):
        files[e] = tmp / "stats" / "experiment" / f"{e}.json"
        inputs = [str(files[(e, p)]) for p in (1, 2)]
        assert main(["aggregate-stats", "--inputs", *inputs, "--out", str(files[e])]) == 0
    files["HUVEC"] = tmp / "stats" / "cell_type" / "HUVEC.json"
    assert (
        main(
            [
                "aggregate-stats",
                "--inputs",
                str(files["HUVEC-01"]),
                str(files["HUVEC-02"]),
                "--out",
                str(files["HUVEC"]),
            ]
        )
        == 0
    )
    return df, files


def pooled(df, plates, well_type=None):
    """Pixels of the sites as float64 (channels, pixels), the reference for the statistics."""
    rows = df[[(e, p) in plates for e, p in zip(df.experiment, df.plate, strict=True)]]
    if well_type:
        rows = rows[rows.well_type == well_type]
    images = [site_image(r.experiment, r.plate, r.well, r.site) for r in rows.itertuples()]
    return np.concatenate([i.reshape(6, -1) for i in images], axis=1).astype(np.float64)


def check(summary, pixels):
    np.testing.assert_array_equal(summary["count"], np.full(6, pixels.shape[1], np.float64))
    np.testing.assert_array_equal(summary["sum"], pixels.sum(1))
    np.testing.assert_array_equal(summary["sumsq"], (pixels**2).sum(1))
    np.testing.assert_allclose(summary["mean"], pixels.mean(1), rtol=1e-12)
    np.testing.assert_allclose(summary["std"], pixels.std(1), rtol=1e-9)


def test_plate_stats(stats):
    df, files = stats
    data = json.loads(files[("HUVEC-01", 2)].read_text())
    assert (data["level"], data["experiment"], data["plate"], data["cell_type"]) == (
        "plate",
        "HUVEC-01",
        2,
        "HUVEC",
    )
    check(data["all"], pooled(df, [("HUVEC-01", 2)]))
    check(data["negative_control"], pooled(df, [("HUVEC-01", 2)], "negative_control"))
    assert data["negative_control"]["n_sites"] == 2 and data["all"]["n_sites"] == 8


def test_aggregation_is_exact(stats):
    df, files = stats
    exp = json.loads(files["HUVEC-02"].read_text())
    assert exp["level"] == "experiment" and exp["experiment"] == "HUVEC-02"
    check(exp["all"], pooled(df, [("HUVEC-02", 1), ("HUVEC-02", 2)]))
    ct = json.loads(files["HUVEC"].read_text())
    assert ct["level"] == "cell_type" and ct["cell_type"] == "HUVEC" and len(ct["plates"]) == 4
    huvec = [k for k in PLATES if k[0].startswith("HUVEC")]
    check(ct["all"], pooled(df, huvec))
    check(ct["negative_control"], pooled(df, huvec, "negative_control"))


def test_aggregate_rejects_a_plate_twice(stats, tmp_path, capsys):
    _, files = stats
    out = tmp_path / "x.json"
    rc = main(
        [
            "aggregate-stats",
            "--inputs",
            str(files["HUVEC-01"]),
            str(files[("HUVEC-01", 1)]),
            "--out",
            str(out),
        ]
    )
    assert rc == 2 and "experiment HUVEC-01 plate 1 is also in" in capsys.readouterr().err
    assert not out.exists()


def test_normalization_table(stats):
    df, files = stats
    plate_files = [files[k] for k in PLATES]
    every = plate_files + [files["HUVEC-01"], files["HUVEC-02"], files["HUVEC"]]
    for mode in ("plate", "negative_control", "experiment", "cell_type", "none"):
        for given in (every, plate_files):  # aggregates are summed from plate files when absent
            table = normalization_table(given, mode)
            assert sorted(table) == sorted(PLATES)
            for (e, p), (mean, std) in table.items():
                if mode == "none":
                    np.testing.assert_array_equal(mean, 0.0)
                    np.testing.assert_array_equal(std, 255.0)
                    continue
                scope = {
                    "plate": [(e, p)],
                    "negative_control": [(e, p)],
                    "experiment": [k for k in PLATES if k[0] == e],
                    "cell_type": [k for k in PLATES if k[0][:3] == e[:3]],
                }[mode]
                pixels = pooled(df, scope, "negative_control" if mode == "negative_control" else None)
                np.testing.assert_allclose(mean, pixels.mean(1), rtol=1e-12)
                np.testing.assert_allclose(std, pixels.std(1), rtol=1e-9)


def test_normalization_table_errors(stats):
    from deepnoise.errors import InputError

    _, files = stats
    with pytest.raises(InputError, match="HUVEC-01 plate 1: no plate statistics"):
        normalization_table([files["HUVEC-01"]], "plate")
    with pytest.raises(InputError, match="'global'"):
        normalization_table([files["HUVEC-01"]], "global")


def test_a_job_given_only_its_plates_files_gets_their_normalisation(stats):
    """A fine-tune or prediction of one cell type gets that cell type's files only (the DAG stays
    small): the cell type's file covers plates whose plate files the job was not given, and those
    are not asked for; a plate no file covers is named."""
    from deepnoise.errors import InputError

    df, files = stats
    given = [files[("HUVEC-01", 1)], files["HUVEC-01"], files["HUVEC"]]
    with pytest.raises(InputError, match="HUVEC-01 plate 2: no plate statistics"):
        normalization_table(given, "plate")  # every plate the files cover
    plate = normalization_table(given, "plate", [("HUVEC-01", 1)])
    assert list(plate) == [("HUVEC-01", 1)]
    np.testing.assert_allclose(plate[("HUVEC-01", 1)][0], pooled(df, [("HUVEC-01", 1)]).mean(1), rtol=1e-12)
    cell_type = normalization_table(given, "cell_type", [("HUVEC-01", 1)])
    huvec = [k for k in PLATES if k[0].startswith("HUVEC")]
    np.testing.assert_allclose(cell_type[("HUVEC-01", 1)][0], pooled(df, huvec).mean(1), rtol=1e-12)
    with pytest.raises(InputError, match="experiment RPE-01 plate 1: no statistics among the files"):
        normalization_table(given, "plate", [("RPE-01", 1)])
