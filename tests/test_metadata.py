"""Site tables from the rxrx1, Kaggle and synthetic layouts; validation errors name the culprit."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest

from deepnoise.cli import main
from deepnoise.metadata import SITE_COLUMNS, TRUTH_COLUMNS, build_sites, read_sites
from tests.fixtures.data import N_TREATMENTS, fixture_wells, write_kaggle, write_png, write_rxrx1


def sites_cli(tmp_path, source, root, *extra):
    out = tmp_path / "results"
    rc = main(
        [
            "sites",
            "--source",
            source,
            "--root",
            str(root),
            "--out-sites",
            str(out / "sites.csv"),
            "--out-truth",
            str(out / "test_truth.csv"),
            "--out-classes",
            str(out / "classes.json"),
            *extra,
        ]
    )
    return rc, out


def test_rxrx1_and_kaggle_give_the_same_table(tmp_path):
    rc, a = sites_cli(tmp_path / "a", "rxrx1", write_rxrx1(tmp_path / "rxrx1"))
    assert rc == 0
    rc, b = sites_cli(tmp_path / "b", "kaggle", write_kaggle(tmp_path / "kaggle"))
    assert rc == 0
    ta, tb = read_sites(a / "sites.csv"), read_sites(b / "sites.csv")
    assert list(ta.columns) == SITE_COLUMNS
    same = [c for c in SITE_COLUMNS if c not in ("path", "sirna")]  # Kaggle has ids, no names
    pd.testing.assert_frame_equal(ta[same], tb[same])
    assert ((ta.sirna == "") == (tb.sirna == "")).all()
    assert len(ta) == 2 * len(fixture_wells())
    test = ta[ta.dataset == "test"]
    assert (test[test.well_type == "treatment"].sirna_id == -1).all()
    assert (test[test.well_type != "treatment"].sirna_id >= N_TREATMENTS).all()  # controls stay labelled
    for prefix in ta.path.tolist() + tb.path.tolist():
        assert all(os.path.isfile(f"{prefix}_w{c}.png") for c in range(1, 7))
    truth = pd.read_csv(a / "test_truth.csv")
    assert list(truth.columns) == TRUTH_COLUMNS
    wells = fixture_wells()
    hidden = wells[(wells.dataset == "test") & (wells.well_type == "treatment")]
    assert sorted(truth.sirna_id) == sorted(hidden.sirna_id)
    assert len(pd.read_csv(b / "test_truth.csv")) == 0  # Kaggle has no test labels
    ca, cb = json.loads((a / "classes.json").read_text()), json.loads((b / "classes.json").read_text())
    assert ca["n_treatments"] == cb["n_treatments"] == N_TREATMENTS
    assert ca["n_controls"] == cb["n_controls"] == 2
    assert ca["sirnas"][N_TREATMENTS + 1] == cb["sirnas"][N_TREATMENTS + 1] == "EMPTY"
    assert len(ca["sirnas"]) == N_TREATMENTS + 2


def test_filters_and_synthetic_truth(tmp_path):
    root = write_rxrx1(tmp_path / "rel")
    md = pd.read_csv(root / "metadata.csv")
    hidden = (md.dataset == "test") & (md.well_type == "treatment")
    truth = md[hidden].drop_duplicates("well_id")[TRUTH_COLUMNS]
    md.loc[hidden, "sirna"] = ""
    md.loc[hidden, "sirna_id"] = -1
    md.to_csv(root / "metadata.csv", index=False)
    truth.to_csv(root / "test_truth.csv", index=False)
    df, t, classes = build_sites(
        "synthetic", root, experiments=["HUVEC-02", "RPE-01"], cell_types=["HUVEC", "RPE"]
    )
    assert set(df.experiment) == {"HUVEC-02", "RPE-01"}
    assert sorted(t.well_id) == sorted(truth.well_id)
    assert classes["n_treatments"] == N_TREATMENTS


def _expect_error(tmp_path, capsys, root, source, needle, *extra):
    rc, out = sites_cli(tmp_path, source, root, *extra)
    assert rc == 2
    err = capsys.readouterr().err
    assert needle in err, err
    assert not out.exists() or not list(out.iterdir())


def test_duplicated_site(tmp_path, capsys):
    root = write_rxrx1(tmp_path / "rel")
    md = pd.read_csv(root / "metadata.csv")
    pd.concat([md, md.iloc[[3]]]).to_csv(root / "metadata.csv", index=False)
    _expect_error(tmp_path, capsys, root, "rxrx1", f"site {md.site_id[3]}: duplicated")


def test_unknown_cell_type(tmp_path, capsys):
    root = write_rxrx1(tmp_path / "rel")
    _expect_error(
        tmp_path, capsys, root, "rxrx1", "cell type 'RPE' of experiment RPE-01", "--cell-types", "HUVEC"
    )


def test_plate_out_of_range(tmp_path, capsys):
    root = write_kaggle(tmp_path / "kag")
    df = pd.read_csv(root / "train.csv")
    df.loc[0, "plate"] = 5
    df.loc[0, "id_code"] = f"{df.experiment[0]}_5_{df.well[0]}"
    df.to_csv(root / "train.csv", index=False)
    _expect_error(
        tmp_path, capsys, root, "kaggle", f"plate 5 of experiment {df.experiment[0]} is not in 1..4"
    )


def test_missing_png(tmp_path, capsys):
    root = write_rxrx1(tmp_path / "rel")
    victim = root / "images" / "RPE-01" / "Plate2" / "C05_s2_w4.png"
    victim.unlink()
    _expect_error(tmp_path, capsys, root, "rxrx1", f"{victim}: channel PNG of a metadata row is missing")


@pytest.mark.parametrize("plate_dir", ["Plate1", "Plate3"])
def test_png_without_metadata(tmp_path, capsys, plate_dir):
    root = write_kaggle(tmp_path / "kag")
    extra = root / "train" / "HUVEC-01" / plate_dir / "N13_s1_w1.png"
    write_png(extra, np.zeros((16, 16), np.uint8))
    _expect_error(tmp_path, capsys, root, "kaggle", f"{extra}: image has no metadata row")


def test_unknown_experiment(tmp_path, capsys):
    root = write_rxrx1(tmp_path / "rel")
    _expect_error(tmp_path, capsys, root, "rxrx1", "experiment HEPG2-07", "--experiments", "HEPG2-07")


# ------------------------------------------------------------------------------------------------
# The site table is the gate: every check the metadata allows names the metadata file and row


def _rewrite(root, edit, name="metadata.csv"):
    md = pd.read_csv(root / name, dtype=str, keep_default_na=False)
    out = edit(md)
    md = md if out is None else out
    md.to_csv(root / name, index=False)
    return md


def test_sites_of_one_well_that_disagree(tmp_path, capsys):
    root = write_rxrx1(tmp_path / "rel")

    def edit(md):  # site 2 of a train well gets another siRNA
        md.loc[3, "sirna_id"] = str(int(md.sirna_id[3]) + 1)

    md = _rewrite(root, edit)
    assert md.well_id[2] == md.well_id[3]
    _expect_error(
        tmp_path,
        capsys,
        root,
        "rxrx1",
        f"metadata.csv: row 5: site {md.site_id[3]}: the sites of well {md.well_id[3]} disagree on "
        f"sirna_id: {int(md.sirna_id[3])} here, {int(md.sirna_id[2])} in ",
    )


@pytest.mark.parametrize("column", ["well_id", "site_id"])
def test_ids_that_do_not_match_experiment_plate_well(tmp_path, capsys, column):
    root = write_rxrx1(tmp_path / "rel")
    evil = "HUVEC-03_1_X;touch PWNED #"

    def edit(md):
        md.loc[6, column] = evil

    _rewrite(root, edit)
    _expect_error(tmp_path, capsys, root, "rxrx1", f"metadata.csv: row 8: {column} '{evil}' does not match")


def test_kaggle_id_code_that_does_not_match(tmp_path, capsys):
    root = write_kaggle(tmp_path / "kag")

    def edit(df):
        df.loc[1, "id_code"] = "HUVEC-01_2_B02"

    _rewrite(root, edit, "train.csv")
    _expect_error(
        tmp_path, capsys, root, "kaggle", "train.csv: row 3: id_code 'HUVEC-01_2_B02' does not match"
    )


@pytest.mark.parametrize(
    "content, message", [("", "the file is empty"), (None, "the file has a header and no rows")]
)
def test_empty_or_header_only_metadata(tmp_path, capsys, content, message):
    root = write_rxrx1(tmp_path / "rel")
    path = root / "metadata.csv"
    path.write_text(path.read_text().splitlines()[0] + "\n" if content is None else content)
    _expect_error(tmp_path, capsys, root, "rxrx1", f"{path}: {message}")


def test_plate_missing_from_the_metadata(tmp_path, capsys):
    root = write_rxrx1(tmp_path / "rel")

    def edit(md):
        return md.drop(md.index[(md.experiment == "RPE-01") & (md.plate == "2")])

    _rewrite(root, edit)
    _expect_error(
        tmp_path,
        capsys,
        root,
        "rxrx1",
        f"{root / 'metadata.csv'}: experiment RPE-01 has no rows for plate 2 "
        "(every experiment needs plates 1, 2)",
        "--plates",
        "1",
        "2",
    )


def test_plate_at_another_resolution(tmp_path, capsys):
    root = write_rxrx1(tmp_path / "rel")
    wells = fixture_wells()
    odd = wells[(wells.experiment == "HUVEC-02") & (wells.plate == 2)]
    write_rxrx1(tmp_path / "big", odd, size=24)  # the same wells at 24x24
    for png in (tmp_path / "big" / "images" / "HUVEC-02" / "Plate2").iterdir():
        png.replace(root / "images" / "HUVEC-02" / "Plate2" / png.name)
    _expect_error(
        tmp_path,
        capsys,
        root,
        "rxrx1",
        "experiment HUVEC-02 plate 2: images are 24x24 "
        f"({root / 'images' / 'HUVEC-02' / 'Plate2' / 'B02_s1_w1.png'}), the other plates' are 16x16",
    )


def test_png_fingerprint_digest_is_stable(tmp_path):
    """The stack rule's `--pngs` param: name, size and mtime of every PNG in name order (other files
    ignored, `.PNG` counted). The digest is pinned: a change of its format would rerun every finished
    plate stack of every user after an upgrade."""
    import hashlib

    from deepnoise.metadata import png_fingerprint

    files = {"B02_s1_w1.png": b"ab", "A01_s2_w6.PNG": b"", "notes.txt": b"x"}
    for i, (name, content) in enumerate(files.items()):
        (tmp_path / name).write_bytes(content)
        os.utime(tmp_path / name, ns=(0, 1_000_000_000 * (i + 1)))
    text = "A01_s2_w6.PNG\x000\x002000000000\nB02_s1_w1.png\x002\x001000000000\n"
    assert png_fingerprint(tmp_path) == f"2 PNGs, sha256 {hashlib.sha256(text.encode()).hexdigest()[:32]}"
    assert png_fingerprint(tmp_path / "absent") == "no folder"
    (tmp_path / "B02_s1_w1.png").write_bytes(b"abc")
    assert png_fingerprint(tmp_path) != f"2 PNGs, sha256 {hashlib.sha256(text.encode()).hexdigest()[:32]}"
