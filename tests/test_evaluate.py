import json

import numpy as np
import pandas as pd
import pytest

from deepnoise import cli
from deepnoise.ensemble import Predictions, save_predictions
from deepnoise.errors import InputError
from deepnoise.evaluate import (
    accuracy_table,
    compare_accuracy,
    format_summary,
    parse_named,
    read_truth,
    submission_table,
    summary_table,
)


def _pred(ids, datasets, labels, n_classes=4):
    probs = np.full((len(ids), n_classes), 0.1, np.float32)
    probs[np.arange(len(ids)), labels] = 0.7
    return Predictions.from_well_ids(ids, datasets, probs)


def _sites():
    rows = []
    # validation experiment V-01 (labelled), test experiment T-01 (unlabelled), controls ignored
    for site in (1, 2):
        for wid, ds, y, wt in [
            ("V-01_1_B02", "train", 0, "treatment"),
            ("V-01_1_B03", "train", 1, "treatment"),
            ("V-01_2_B02", "train", 2, "treatment"),
            ("V-01_2_B04", "train", 5, "negative_control"),
            ("T-01_1_B02", "test", -1, "treatment"),
            ("T-01_1_B03", "test", -1, "treatment"),
            ("T-01_1_B04", "test", -1, "positive_control"),
        ]:
            e, p, w = wid.rsplit("_", 2)
            rows.append((f"{wid}_{site}", wid, e.split("-")[0], ds, e, int(p), w, site, wt, "", y, "x"))
    cols = "site_id well_id cell_type dataset experiment plate well site well_type sirna sirna_id path"
    return pd.DataFrame(rows, columns=cols.split())


IDS = ["V-01_1_B02", "V-01_1_B03", "V-01_2_B02", "T-01_1_B02", "T-01_1_B03"]
DS = ["train"] * 3 + ["test"] * 2


def _write_inputs(tmp_path, truth_rows=True):
    _sites().to_csv(tmp_path / "sites.csv", index=False)
    truth = tmp_path / "truth.csv"
    if truth_rows:
        pd.DataFrame(
            {"well_id": ["T-01_1_B02", "T-01_1_B03"], "experiment": "T-01", "plate": 1,
             "well": ["B02", "B03"], "cell_type": "T", "sirna_id": [3, 1]}
        ).to_csv(truth, index=False)  # fmt: skip
    else:
        truth.write_text("well_id,experiment,plate,well,cell_type,sirna_id\n")
    save_predictions(_pred(IDS, DS, [0, 1, 3, 3, 2]), tmp_path / "m1.npz")  # val 2/3, test 1/2
    save_predictions(_pred(IDS, DS, [0, 0, 0, 0, 0]), tmp_path / "m2.npz")  # val 1/3, test 0/2
    save_predictions(_pred(IDS, DS, [0, 1, 2, 3, 1]), tmp_path / "b.npz")  # val 3/3, test 2/2
    return truth


def test_metrics_arithmetic(tmp_path):
    truth = _write_inputs(tmp_path)
    out = tmp_path / "metrics.json"
    rc = cli.main(
        ["metrics", "--round", "1", "--sites", str(tmp_path / "sites.csv"), "--truth", str(truth),
         "--models", f"m1={tmp_path / 'm1.npz'}", f"m2={tmp_path / 'm2.npz'}",
         "--ensemble", str(tmp_path / "m1.npz"), "--balanced", str(tmp_path / "b.npz"), "--out", str(out)]
    )  # fmt: skip
    assert rc == 0
    m = json.loads(out.read_text())
    assert m["round"] == 1 and m["test_scored"] is True
    st = {s["stage"]: s for s in m["stages"]}
    assert [s["kind"] for s in m["stages"]] == ["model", "model", "ensemble", "balanced"]
    v = st["m1"]["splits"]["validation"]
    assert v["overall"] == {"n": 3, "correct": 2, "accuracy": pytest.approx(2 / 3)}
    assert v["cell_types"]["V"]["correct"] == 2
    plates = {(p["experiment"], p["plate"]): p for p in v["plates"]}
    assert plates[("V-01", 1)]["accuracy"] == 1.0 and plates[("V-01", 2)]["accuracy"] == 0.0
    assert st["m1"]["splits"]["test"]["overall"]["correct"] == 1
    assert st["m2"]["splits"]["test"]["overall"]["accuracy"] == 0.0
    assert st["balanced"]["splits"]["test"]["overall"]["accuracy"] == 1.0
    # summary over two rounds
    m0 = dict(m, round=0)
    (tmp_path / "m0.json").write_text(json.dumps(m0))
    rc = cli.main(
        ["summary", "--metrics", str(tmp_path / "m0.json"), str(out), "--out", str(tmp_path / "s.tsv")]
    )
    assert rc == 0
    s = pd.read_csv(tmp_path / "s.tsv", sep="\t")
    assert list(s.columns) == ["round", "stage", "kind", "split", "cell_type", "n", "correct", "accuracy"]
    row = s[(s["round"] == 1) & (s.stage == "m1") & (s.split == "validation") & (s.cell_type == "all")]
    assert row.accuracy.iloc[0] == pytest.approx(2 / 3)
    assert set(s["round"]) == {0, 1} and "balanced" in format_summary(s)
    # what each stage adds, test accuracy: m1 0.5 (best single), ensemble = m1 (+0), balanced 1.0
    text = format_summary(s, "groups")
    assert "balanced (groups)" in text and "What each stage adds (test accuracy" in text
    assert "round 0: best single model m1 50.0; ensemble +0.0; balanced (groups) +50.0" in text
    assert "round 1: best single model m1 50.0; ensemble +0.0; balanced (groups) +50.0; " in text
    assert "pseudo-label round (ensemble vs round 0) +0.0" in text


def test_metrics_without_test_truth(tmp_path):
    truth = _write_inputs(tmp_path, truth_rows=False)
    assert read_truth(truth).empty and read_truth(tmp_path / "absent.csv").empty
    out = tmp_path / "metrics.json"
    rc = cli.main(["metrics", "--round", "0", "--sites", str(tmp_path / "sites.csv"), "--truth", str(truth),
                   "--balanced", str(tmp_path / "b.npz"), "--out", str(out)])  # fmt: skip
    assert rc == 0
    m = json.loads(out.read_text())
    assert m["test_scored"] is False and set(m["stages"][0]["splits"]) == {"validation"}


def test_metrics_names_unlabelled_validation_well(tmp_path, capsys):
    _write_inputs(tmp_path)
    save_predictions(_pred(["V-01_4_Z99"], ["train"], [0]), tmp_path / "odd.npz")
    rc = cli.main(["metrics", "--round", "0", "--sites", str(tmp_path / "sites.csv"),
                   "--models", f"odd={tmp_path / 'odd.npz'}", "--out", str(tmp_path / "m.json")])  # fmt: skip
    assert rc == 2 and "V-01_4_Z99" in capsys.readouterr().err
    with pytest.raises(InputError, match="NAME=PATH"):
        parse_named(["nope"])


def test_accuracy_helpers():
    p = _pred(IDS, DS, [0, 1, 3, 3, 2])
    truth = pd.Series([0, 1, 2], index=IDS[:3])
    assert accuracy_table(p, truth, missing="skip") == {"n": 3, "correct": 2, "accuracy": 2 / 3}
    with pytest.raises(InputError, match="T-01_1_B02"):
        accuracy_table(p, truth)
    after = _pred(IDS, DS, [0, 1, 2, 3, 2])
    c = compare_accuracy(p, after, truth)
    assert c["before"]["correct"] == 2 and c["after"]["correct"] == 3


def test_submission(tmp_path):
    truth = _write_inputs(tmp_path)
    out = tmp_path / "submission.csv"
    sites = str(tmp_path / "sites.csv")
    rc = cli.main(["submission", "--balanced", str(tmp_path / "b.npz"), "--sites", sites, "--out", str(out)])
    assert rc == 0
    text = out.read_text().splitlines()
    assert text == ["id_code,sirna", "T-01_1_B02,3", "T-01_1_B03,1"]
    assert truth.exists()
    # a test treatment well without prediction is an error naming it
    sites = _sites()
    sites.loc[len(sites)] = [
        "T-01_2_B05_1",
        "T-01_2_B05",
        "T",
        "test",
        "T-01",
        2,
        "B05",
        1,
        "treatment",
        "",
        -1,
        "x",
    ]
    from deepnoise.ensemble import load_predictions

    with pytest.raises(InputError, match="T-01_2_B05"):
        submission_table(load_predictions(tmp_path / "b.npz"), sites)
    # a submission for a subset of cell types checks only their wells
    sites.loc[len(sites) - 1, "cell_type"] = "U"
    assert len(submission_table(load_predictions(tmp_path / "b.npz"), sites, ["T"])) == 2
    with pytest.raises(InputError, match="T-01_2_B05"):
        submission_table(load_predictions(tmp_path / "b.npz"), sites, ["T", "U"])
    with pytest.raises(InputError, match="'Z'"):
        submission_table(load_predictions(tmp_path / "b.npz"), sites, ["Z"])
    assert summary_table([]).empty
