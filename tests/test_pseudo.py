import numpy as np
import pandas as pd
import pytest

from deepnoise import cli
from deepnoise.ensemble import Predictions, save_predictions
from deepnoise.errors import InputError
from deepnoise.evaluate import pseudo_label_metrics
from deepnoise.pseudo import COLUMNS, changed_labels, pseudo_labels, read_hard_labels, select_by_margin


def _pred(ids, datasets, probs):
    return Predictions.from_well_ids(ids, datasets, probs)


def test_every_predicted_well_gets_a_label(tmp_path):
    """Test and validation wells both (the validation truth is never read here)."""
    a = _pred(
        ["V-01_1_B02", "T-01_1_B03", "T-01_1_B02"],
        ["train", "test", "test"],
        [[0.9, 0.1, 0.0], [0.1, 0.2, 0.7], [0.2, 0.6, 0.2]],
    )
    b = _pred(["T-02_3_C04"], ["test"], [[0.5, 0.1, 0.4]])
    df = pseudo_labels(a)
    assert list(df.columns) == list(COLUMNS)
    assert list(df.well_id) == ["T-01_1_B02", "T-01_1_B03", "V-01_1_B02"]
    assert list(df.dataset) == ["test", "test", "train"]
    assert list(df.sirna_id) == [1, 2, 0] and list(df.selected) == [1, 1, 1]
    np.testing.assert_allclose(df.confidence, [0.6, 0.7, 0.9], atol=1e-6)
    np.testing.assert_allclose(df.margin, [0.4, 0.5, 0.8], atol=1e-6)
    save_predictions(a, tmp_path / "a.npz")
    save_predictions(b, tmp_path / "b.npz")
    out = tmp_path / "pseudo.csv"
    assert cli.main(["pseudo-labels", "--inputs", str(tmp_path / "a.npz"), str(tmp_path / "b.npz"),
                     "--out", str(out)]) == 0  # fmt: skip
    got = pd.read_csv(out)
    assert list(got.columns) == list(COLUMNS)
    assert list(got.well_id) == ["T-01_1_B02", "T-01_1_B03", "T-02_3_C04", "V-01_1_B02"]
    assert list(got.plate) == [1, 1, 3, 1] and list(got.well) == ["B02", "B03", "C04", "B02"]
    assert got.sirna_id.dtype.kind == "i"


def test_margin_selection_per_plate(tmp_path):
    """The fraction of each plate's wells with the largest ensemble margin is selected; the labels
    are the balanced ones."""
    ids = ["T-01_1_B02", "T-01_1_B03", "T-01_1_B04", "T-01_1_B05", "T-01_2_B02", "T-01_2_B03"]
    ens = np.array([[0.5, 0.4, 0.1], [0.9, 0.05, 0.05], [0.34, 0.33, 0.33], [0.1, 0.8, 0.1],
                    [0.6, 0.3, 0.1], [0.2, 0.2, 0.6]], np.float32)  # fmt: skip
    bal = np.eye(3, dtype=np.float32)[[1, 0, 2, 1, 0, 2]]
    df = pseudo_labels(_pred(ids, "test", bal), _pred(ids, "test", ens), fraction=0.5)
    chosen = set(df.loc[df.selected == 1, "well_id"])
    assert chosen == {"T-01_1_B03", "T-01_1_B05", "T-01_2_B03"}  # 2 of 4 on plate 1, 1 of 2 on plate 2
    assert df.set_index("well_id").loc["T-01_1_B02", "sirna_id"] == 1  # balanced label, not argmax
    df.to_csv(tmp_path / "p.csv", index=False)
    assert read_hard_labels(tmp_path / "p.csv") == {"T-01_1_B03": 0, "T-01_1_B05": 1, "T-01_2_B03": 2}
    keys = pd.DataFrame({"experiment": ["E"] * 3, "plate": [1] * 3})
    assert select_by_margin(keys, np.array([0.1, 0.3, 0.2]), 1.0).all()
    with pytest.raises(InputError, match="fraction"):
        select_by_margin(keys, np.zeros(3), 0.0)


def test_changed_labels_and_accuracy_against_the_truth():
    prev = pd.DataFrame({"well_id": ["A", "B", "C"], "sirna_id": [1, 2, 3]})
    cur = pd.DataFrame(
        {"well_id": ["A", "B", "C", "V"], "sirna_id": [1, 5, 3, 0], "selected": [1, 0, 1, 1],
         "dataset": ["test", "test", "test", "train"]}
    )  # fmt: skip
    assert changed_labels(cur, prev) == {"compared": 3, "changed": 1}
    sites = pd.DataFrame({"well_id": ["V"], "well_type": ["treatment"], "sirna_id": [0]})
    truth = pd.Series({"A": 1, "B": 2, "C": 4})
    m = pseudo_label_metrics(cur, sites, truth, prev)
    assert m["test"]["all"] == {"n": 3, "correct": 1, "accuracy": 1 / 3}
    assert m["test"]["selected"] == {"n": 2, "correct": 1, "accuracy": 0.5}
    assert m["validation"]["all"]["accuracy"] == 1.0 and m["changed"] == 1


def test_duplicate_wells_across_files(tmp_path, capsys):
    a = _pred(["T-01_1_B02"], ["test"], [[0.9, 0.1]])
    save_predictions(a, tmp_path / "a.npz")
    rc = cli.main(["pseudo-labels", "--inputs", str(tmp_path / "a.npz"), str(tmp_path / "a.npz"),
                   "--out", str(tmp_path / "p.csv")])  # fmt: skip
    assert rc == 2 and "T-01_1_B02" in capsys.readouterr().err
