import numpy as np
import pytest
import torch

from deepnoise import cli, data, metadata, models
from deepnoise.errors import InputError
from deepnoise.weights import load_weights


def _args(screen, weights, out, experiments=("HUVEC-02", "HUVEC-03"), cell_type="HUVEC"):
    return [
        "predict",
        "--weights", str(weights),
        "--sites", str(screen.sites),
        "--stacks", *map(str, screen.stacks),
        "--stats", *map(str, screen.stats),
        "--cell-type", cell_type,
        "--experiments", *experiments,
        "--out", str(out),
        "--batch-size", "5",
        "--threads", "1",
        "--num-workers", "0",
        "--device", "cpu",
    ]  # fmt: skip


def _reference(screen, weights, well_id: str, n_views: int) -> np.ndarray:
    """The selected model's softmax over the treatment logits of one well, averaged over its 2
    sites and the first ``n_views`` dihedral views, computed directly."""
    from deepnoise.augment import dihedral

    state = torch.load(weights, weights_only=True)
    net = models.build_model(state["model_config"]).eval()
    net.load_state_dict(state["model"])
    index = data.StackIndex.build(screen.stacks)
    wells = index.locate(data.well_table(metadata.read_sites(screen.sites)))
    mean, std = data.normalization_arrays(screen.stats, "plate", index.keys)
    i = int(np.flatnonzero(wells["well_id"] == well_id)[0])
    img, norm_idx, _, _ = data.StackDataset(index.files, wells)[i]
    x = data.normalize_batch(img[None], torch.tensor([norm_idx]), torch.tensor(mean), torch.tensor(std))[0]
    with torch.no_grad():
        views = torch.cat([dihedral(x, k) for k in range(n_views)])
        return net(views)[:, : screen.n_treatments].softmax(1).mean(0).numpy()


def test_predict_npz_format_and_tta(tiny_screen, tiny_model, tmp_path):
    out = tmp_path / "p.npz"
    assert cli.main(_args(tiny_screen, tiny_model, out)) == 0
    z = np.load(out)
    assert set(z.files) == {"well_id", "experiment", "plate", "well", "dataset", "probs"}
    n = len(z["well_id"])
    expect = [
        w
        for w, c in tiny_screen.truth.items()
        if w[:8] in ("HUVEC-02", "HUVEC-03") and c < tiny_screen.n_treatments
    ]
    assert sorted(z["well_id"].tolist()) == sorted(expect)
    assert z["probs"].shape == (n, tiny_screen.n_treatments) and z["probs"].dtype == np.float32
    np.testing.assert_allclose(z["probs"].sum(1), 1.0, atol=1e-5)
    assert set(z["dataset"].tolist()) == {"train", "test"} and z["plate"].dtype.kind == "U"
    # reference: the selected model's softmax over treatment logits, mean of 2 sites x 8 views
    np.testing.assert_allclose(
        z["probs"][3], _reference(tiny_screen, tiny_model, z["well_id"][3], 8), atol=1e-5
    )


def test_predict_without_tta_is_the_unaugmented_view(tiny_screen, tiny_model, tmp_path):
    """``--no-tta`` (config predict.tta: false) averages the two sites of the image as it is, only."""
    out = tmp_path / "p1.npz"
    assert cli.main([*_args(tiny_screen, tiny_model, out), "--no-tta"]) == 0
    z = np.load(out)
    np.testing.assert_allclose(
        z["probs"][3], _reference(tiny_screen, tiny_model, z["well_id"][3], 1), atol=1e-5
    )
    tta = tmp_path / "p8.npz"
    assert cli.main(_args(tiny_screen, tiny_model, tta)) == 0
    assert not np.allclose(np.load(tta)["probs"], z["probs"], atol=1e-4)


def test_predict_errors(tiny_screen, tiny_model, tmp_path):
    assert cli.main(_args(tiny_screen, tiny_model, tmp_path / "x.npz", cell_type="RPE")) == 2
    assert cli.main(_args(tiny_screen, tiny_model, tmp_path / "x.npz", experiments=("NOPE-01",))) == 2
    with pytest.raises(InputError, match="cannot read weights"):
        load_weights(tmp_path / "missing.pt")
    assert not (tmp_path / "x.npz").exists()
