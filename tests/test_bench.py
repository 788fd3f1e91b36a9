"""``deepnoise bench train`` decides by repeated, interleaved timings and prints their spread."""

import json

from deepnoise import bench, cli


def test_summary_is_median_min_max():
    assert bench.summarize("x", [3.0, 1.0, 2.0, 10.0, 5.0]) == {"x": 3.0, "x_min": 1.0, "x_max": 10.0}
    assert bench.summarize("x", [1.0, 2.0]) == {"x": 1.5, "x_min": 1.0, "x_max": 2.0}


def test_bench_train_repeats_alternate_and_print_spreads(tmp_path, capsys, monkeypatch):
    calls = []
    step = bench.train.Trainer.step

    def traced(self, lab, unl=None, epoch_float=0.0):
        calls.append(lab[0].data_ptr())
        return step(self, lab, unl, epoch_float)

    monkeypatch.setattr(bench.train.Trainer, "step", traced)
    out = tmp_path / "bench.json"
    args = ["bench", "train", "--backbone", "resnet10t", "--input-size", "16", "--batch-size", "4"]
    args += ["--steps", "2", "--warmup", "1", "--synthetic", "--num-workers", "0", "--threads", "1"]
    assert cli.main([*args, "--device", "cpu", "--repeats", "5", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    for key in ("model_step_images_per_s", "full_step_images_per_s", "ratio_full_over_model"):
        assert result[f"{key}_min"] <= result[key] <= result[f"{key}_max"], key
    assert result["repeats"] == 5
    printed = capsys.readouterr().out
    assert "ratio_full_over_model" in printed and "median of 5 [min " in printed
    # warm-up 1 step, then 5 repeats x (2 model steps on the kept batch + 2 full steps)
    kept = calls[0]
    pattern = ["m" if p == kept else "f" for p in calls[1:]]
    assert "".join(pattern) == "mmff" + "ffmm" + "mmff" + "ffmm" + "mmff", pattern
    assert cli.main([*args, "--device", "cpu", "--repeats", "0"]) == 2
    assert "--repeats 0: expected at least 1" in capsys.readouterr().err


def test_bench_train_compile_is_refused_on_cpu(capsys):
    """`--compile` (train.compile) measures torch.compile on a GPU; on CPU it stops with the key."""
    args = ["bench", "train", "--backbone", "resnet10t", "--input-size", "16", "--batch-size", "4"]
    args += ["--steps", "1", "--warmup", "1", "--synthetic", "--num-workers", "0", "--threads", "1"]
    assert cli.main([*args, "--device", "cpu", "--repeats", "1", "--compile"]) == 2
    assert "train.compile: true needs a CUDA device" in capsys.readouterr().err


def test_bench_train_needs_a_warmup_step(capsys):
    """The untimed warm-up also provides the timed steps' batches: 0 is refused, not a crash."""
    import pytest

    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "train", "--synthetic", "--warmup", "0"])
    assert exc.value.code == 2
    assert "--warmup: must be >= 1, got 0" in capsys.readouterr().err
