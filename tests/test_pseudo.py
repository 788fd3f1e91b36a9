import numpy as np
import pandas as pd

from deepnoise import cli
from deepnoise.ensemble import Predictions, save_predictions
from deepnoise.pseudo import COLUMNS, pseudo_labels


def _pred(ids, datasets, probs):
    return Predictions.from_well_ids(ids, datasets, probs)


def test_only_test_wells(tmp_path):
    a = _pred(
        ["V-01_1_B02", "T-01_1_B03", "T-01_1_B02"],
        ["train", "test", "test"],
        [[0.9, 0.1, 0.0], [0.1, 0.2, 0.7], [0.2, 0.6, 0.2]],
    )
    b = _pred(["T-02_3_C04"], ["test"], [[0.5, 0.1, 0.4]])
    df = pseudo_labels(a)
    assert list(df.columns) == list(COLUMNS)
    assert list(df.well_id) == ["T-01_1_B02", "T-01_1_B03"]
    assert list(df.sirna_id) == [1, 2]
    np.testing.assert_allclose(df.confidence, [0.6, 0.7], atol=1e-6)
    save_predictions(a, tmp_path / "a.npz")
    save_predictions(b, tmp_path / "b.npz")
    out = tmp_path / "pseudo.csv"
    assert cli.main(["pseudo-labels", "--inputs", str(tmp_path / "a.npz"), str(tmp_path / "b.npz"),
                     "--out", str(out)]) == 0  # fmt: skip
    got = pd.read_csv(out)
    assert list(got.columns) == list(COLUMNS)
    assert list(got.well_id) == ["T-01_1_B02", "T-01_1_B03", "T-02_3_C04"]
    assert list(got.plate) == [1, 1, 3] and list(got.well) == ["B02", "B03", "C04"]
    assert got.sirna_id.dtype.kind == "i"


def test_duplicate_wells_across_files(tmp_path, capsys):
    a = _pred(["T-01_1_B02"], ["test"], [[0.9, 0.1]])
    save_predictions(a, tmp_path / "a.npz")
    rc = cli.main(["pseudo-labels", "--inputs", str(tmp_path / "a.npz"), str(tmp_path / "a.npz"),
                   "--out", str(tmp_path / "p.csv")])  # fmt: skip
    assert rc == 2 and "T-01_1_B02" in capsys.readouterr().err
