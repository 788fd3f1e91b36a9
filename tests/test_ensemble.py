import numpy as np
import pytest

from deepnoise import cli
from deepnoise.ensemble import Predictions, ensemble, load_predictions, save_predictions
from deepnoise.errors import InputError


def _pred(ids, probs, dataset="test"):
    return Predictions.from_well_ids(ids, dataset, probs)


IDS = ["E-01_1_B02", "E-01_1_B03", "E-01_2_B02"]


def test_mean_aligned_by_well_id():
    a = _pred(IDS, [[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]])
    # same wells, shuffled
    order = [2, 0, 1]
    b = _pred([IDS[i] for i in order], [[0.1, 0.9], [0.7, 0.3], [0.4, 0.6]])
    out = ensemble([a, b])
    assert list(out.well_id) == IDS
    np.testing.assert_allclose(out.probs, [[0.8, 0.2], [0.3, 0.7], [0.3, 0.7]], atol=1e-6)


def test_mismatched_wells_named():
    a = _pred(IDS, np.full((3, 2), 0.5))
    b = _pred(IDS[:2] + ["E-01_2_B09"], np.full((3, 2), 0.5))
    with pytest.raises(InputError, match="E-01_2_B09"):
        ensemble([a, b], names=["a", "b"])
    c = _pred(IDS[:2], np.full((2, 2), 0.5))
    with pytest.raises(InputError, match="E-01_2_B02 of a is missing"):
        ensemble([a, c], names=["a", "c"])
    d = _pred(IDS, np.full((3, 3), 1 / 3))
    with pytest.raises(InputError, match="3 classes"):
        ensemble([a, d], names=["a", "d"])
    e = _pred(IDS, np.full((3, 2), 0.5), dataset="train")
    with pytest.raises(InputError, match="different dataset"):
        ensemble([a, e], names=["a", "e"])


def test_npz_roundtrip_and_cli(tmp_path):
    a = _pred(IDS, [[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]])
    b = _pred(IDS[::-1], [[0.5, 0.5], [0.2, 0.8], [0.9, 0.1]])
    save_predictions(a, tmp_path / "a.npz")
    save_predictions(b, tmp_path / "b.npz")
    with np.load(tmp_path / "a.npz") as z:
        assert z["plate"].dtype.kind == "U" and z["probs"].dtype == np.float32
    back = load_predictions(tmp_path / "a.npz")
    assert back.plate.dtype == np.int64 and list(back.well_id) == IDS
    rc = cli.main(["ensemble", "--inputs", str(tmp_path / "a.npz"), str(tmp_path / "b.npz"),
                   "--out", str(tmp_path / "e.npz")])  # fmt: skip
    assert rc == 0
    np.testing.assert_allclose(load_predictions(tmp_path / "e.npz").probs, a.probs, atol=1e-6)


def test_bad_files(tmp_path):
    np.savez(tmp_path / "bad.npz", well_id=np.array(["x"]))
    with pytest.raises(InputError, match=r"bad.npz: missing arrays"):
        load_predictions(tmp_path / "bad.npz")
    a = _pred(IDS[:1] * 2, np.full((2, 2), 0.5))
    save_predictions(a, tmp_path / "dup.npz")
    with pytest.raises(InputError, match="occurs more than once"):
        load_predictions(tmp_path / "dup.npz")
    (tmp_path / "junk.npz").write_text("nope")
    with pytest.raises(InputError, match="not a readable npz"):
        load_predictions(tmp_path / "junk.npz")
