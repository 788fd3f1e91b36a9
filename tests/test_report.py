import json

import h5py
import numpy as np
import pandas as pd
import pytest

from deepnoise import cli
from deepnoise.errors import InputError
from deepnoise.report import CHANNEL_RGB, to_rgb

PNG = b"\x89PNG\r\n\x1a\n"


def _is_png(path):
    data = path.read_bytes()
    return data[:8] == PNG and len(data) > 1000


def test_plot_training(tmp_path):
    for name in ("a", "b"):
        d = tmp_path / "round0" / "models" / name / "all"
        d.mkdir(parents=True)
        pd.DataFrame(
            {"epoch": [1, 2, 3], "lr": [0.1, 0.05, 0.01], "loss": [3.0, 2.0, 1.5],
             "loss_consistency": [0.3, 0.2, 0.1], "val_acc_student": [0.1, 0.3, 0.4],
             "val_acc_teacher": [0.12, 0.33, 0.45], "seconds": [10, 10, 11]}
        ).to_csv(d / "log.csv", index=False)  # fmt: skip
    (tmp_path / "empty.csv").write_text("")
    logs = [str(p) for p in sorted(tmp_path.rglob("log.csv"))] + [str(tmp_path / "empty.csv")]
    out = tmp_path / "curves.png"
    assert cli.main(["plot-training", "--logs", *logs, "--out", str(out)]) == 0
    assert _is_png(out)


def _metrics(round_):
    plates = [
        {"experiment": e, "plate": p, "cell_type": e[:1], "n": 10, "correct": c, "accuracy": c / 10}
        for e in ("A-01", "B-01") for p, c in zip((1, 2, 3, 4), (5, 6, 7, 8), strict=True)
    ]  # fmt: skip
    split = {"overall": {"n": 80, "correct": 52, "accuracy": 0.65},
             "cell_types": {"A": {"n": 40, "correct": 26, "accuracy": 0.65},
                            "B": {"n": 40, "correct": 26, "accuracy": 0.65}}, "plates": plates}  # fmt: skip
    stages = [
        {"stage": s, "kind": k, "files": [], "n_wells": 80, "splits": {"validation": split, "test": split}}
        for s, k in (("resnet", "model"), ("ensemble", "ensemble"), ("balanced", "balanced"))
    ]
    return {"round": round_, "test_scored": True, "stages": stages}


def test_plot_summary_kinds(tmp_path):
    for r in (0, 1):
        (tmp_path / f"m{r}.json").write_text(json.dumps(_metrics(r)))
    tsv = tmp_path / "summary.tsv"
    assert cli.main(["summary", "--metrics", str(tmp_path / "m0.json"), str(tmp_path / "m1.json"),
                     "--out", str(tsv)]) == 0  # fmt: skip
    for kind in ("accuracy", "balancing"):
        out = tmp_path / f"{kind}.png"
        assert cli.main(["plot-summary", "--kind", kind, "--summary", str(tsv), "--out", str(out)]) == 0
        assert _is_png(out)
    out = tmp_path / "plates.png"
    assert cli.main(["plot-summary", "--kind", "plates", "--metrics", str(tmp_path / "m1.json"),
                     "--out", str(out)]) == 0  # fmt: skip
    assert _is_png(out)
    assert cli.main(["plot-summary", "--kind", "plates", "--out", str(out)]) == 2
    # an empty summary still yields a figure
    (tmp_path / "empty.tsv").write_text("round\tstage\tkind\tsplit\tcell_type\tn\tcorrect\taccuracy\n")
    out = tmp_path / "empty.png"
    assert cli.main(["plot-summary", "--summary", str(tmp_path / "empty.tsv"), "--out", str(out)]) == 0
    assert _is_png(out)


def test_to_rgb():
    img = np.zeros((6, 4, 4), np.uint8)
    img[0] = 51  # channel 1 at the top of its rxrx1 range -> its full colour
    rgb = to_rgb(img)
    assert rgb.shape == (4, 4, 3) and rgb.dtype == np.uint8
    assert (rgb[0, 0] == CHANNEL_RGB[0]).all()
    assert (to_rgb(np.full((6, 2, 2), 255, np.uint8)) == 255).all()
    assert to_rgb(img, "percentile").shape == (4, 4, 3)
    with pytest.raises(InputError):
        to_rgb(np.zeros((3, 2, 2), np.uint8))


def test_plot_composites(tmp_path):
    stack = tmp_path / "Plate1.h5"
    rng = np.random.default_rng(0)
    n = 6
    with h5py.File(stack, "w") as h5:
        h5.create_dataset(
            "images", data=rng.integers(0, 120, (n, 6, 32, 32), dtype=np.uint8), chunks=(1, 6, 32, 32)
        )
        h5.create_dataset(
            "well_id", data=np.array([f"E-01_1_B0{i + 2}" for i in range(n)], dtype=h5py.string_dtype())
        )
        h5.create_dataset("site", data=np.ones(n, np.int8))
        h5.create_dataset("sirna_id", data=np.arange(n, dtype=np.int32))
        h5.attrs["experiment"] = "E-01"
        h5.attrs["plate"] = 1
    out = tmp_path / "comp.png"
    assert cli.main(["plot-composites", "--stack", str(stack), "--n", "4", "--out", str(out)]) == 0
    assert _is_png(out)
    assert cli.main(["plot-composites", "--stack", str(tmp_path / "nope.h5"), "--out", str(out)]) == 2
