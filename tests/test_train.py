import dataclasses
import json
import logging
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from deepnoise import cli, train
from deepnoise.errors import InputError
from tests.fixtures import train as tf

TINY = tf.TINY
_run = tf.train_tiny


def test_config_defaults_and_errors():
    cfg = train.TrainConfig()
    assert (cfg.lr, cfg.weight_decay, cfg.batch_size, cfg.epochs) == (3e-4, 2e-4, 64, 160)
    assert [cfg.lr_at(e) for e in (0, 99, 100, 139, 140, 159)] == [3e-4, 3e-4, 1e-4, 1e-4, 1e-5, 1e-5]
    assert (cfg.arcface_s, cfg.arcface_m, cfg.head) == (30.0, 0.1, "arcface")
    with pytest.raises(InputError, match="learning_rate: unknown key"):
        train.TrainConfig.from_dict({"learning_rate": 1.0})
    with pytest.raises(InputError, match="epochs"):
        train.TrainConfig.from_dict({"epochs": "ten"})
    with pytest.raises(InputError, match="lr_values"):
        train.TrainConfig.from_dict({"lr_milestones": [1, 2], "lr_values": [0.1]})
    assert train.TrainConfig.from_dict({"lr": 1}).lr == 1.0
    assert train.TrainConfig.from_dict({"pretrained": "/x.pth"}).pretrained == "/x.pth"
    # every field is documented (config/README.md's key table is generated from these)
    assert all(f.metadata["doc"] for f in train.TrainConfig.__dataclass_fields__.values())


def test_device_selection(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert train.select_device("auto").type == "cpu"
    with pytest.raises(InputError, match="cuda"):
        train.select_device("cuda")


def test_resume_is_bit_identical(tiny_screen, tmp_path, caplog):
    full = _run(tiny_screen, tmp_path / "full")
    with pytest.raises(RuntimeError, match="injected"):
        _run(tiny_screen, tmp_path / "cut", fail_after_epoch=0, cfg={"num_workers": 1})
    assert not (tmp_path / "cut" / "weights.pt").exists()
    ckpt = torch.load(tmp_path / "cut" / "ckpt" / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 0 and len(ckpt["log"]) == 1
    with caplog.at_level(logging.INFO, logger="deepnoise.train"):
        resumed = _run(tiny_screen, tmp_path / "cut")
    assert "resuming from" in caplog.text and "after epoch 0" in caplog.text
    for part in ("student", "teacher"):
        for key, value in full[part].items():
            assert torch.equal(value, resumed[part][key]), (part, key)
    a, b = pd.read_csv(tmp_path / "full" / "log.csv"), pd.read_csv(tmp_path / "cut" / "log.csv")
    cols = ["epoch", "lr", "loss", "loss_ce", "val_acc_student", "val_acc_teacher"]
    pd.testing.assert_frame_equal(a[cols], b[cols])
    assert list(a.columns) == train.LOG_COLUMNS and list(a["lr"]) == [2e-3, 2e-3, 1e-3]
    assert full["model_config"]["n_classes"] == tiny_screen.n_treatments + tiny_screen.n_controls
    assert not all(torch.equal(full["student"][k], full["teacher"][k]) for k in full["student"])
    # a finished run's resume checkpoint is deleted with its weights written, unless kept
    assert not (tmp_path / "cut" / "ckpt" / "last.pt").exists()
    _run(tiny_screen, tmp_path / "kept", cfg={"epochs": 1, "keep_checkpoint": True})
    assert (tmp_path / "kept" / "ckpt" / "last.pt").exists()


def test_tiny_model_beats_chance(tiny_screen, tmp_path):
    w = _run(tiny_screen, tmp_path, cfg={"epochs": 6, "lr_milestones": [], "lr_values": [], "lr": 3e-3})
    log = pd.read_csv(tmp_path / "log.csv")
    chance = 1 / tiny_screen.n_treatments
    assert log["val_acc_teacher"].iloc[-1] > 3 * chance, log
    assert log["loss"].iloc[-1] < log["loss"].iloc[0]
    assert w["scope"] == "all"
    # fewer labelled wells than the batch size: the batch shrinks to them (one step per epoch)
    small = _run(tiny_screen, tmp_path / "small", cfg={"epochs": 1, "batch_size": 500})
    assert small["epochs"] == 1


def test_finetune_scope_pseudo_labels_and_cli(tiny_screen, tmp_path):
    _run(tiny_screen, tmp_path / "all", cfg={"epochs": 1})
    test_wells = [w for w in tiny_screen.truth if w.startswith("HUVEC-03")]
    pd.DataFrame(
        {"well_id": test_wells, "sirna_id": [tiny_screen.truth[w] for w in test_wells], "selected": 1}
    ).to_csv(tmp_path / "pseudo.csv", index=False)
    hp = tmp_path / "hp.json"
    hp.write_text(json.dumps({**TINY, "epochs": 1, "softmax_only": True}))
    common = [
        "train",
        "--sites", str(tiny_screen.sites),
        "--classes", str(tiny_screen.classes),
        "--stacks", *map(str, tiny_screen.stacks),
        "--stats", *map(str, tiny_screen.stats),
        "--scope", "HUVEC",
        "--val-experiments", "HUVEC-02",
        "--init", str(tmp_path / "all" / "weights.pt"),
        "--pseudo-labels", str(tmp_path / "pseudo.csv"),
        "--out-weights", str(tmp_path / "ft" / "weights.pt"),
        "--out-log", str(tmp_path / "ft" / "log.csv"),
        "--checkpoint-dir", str(tmp_path / "ft" / "ckpt"),
        "--threads", "1",
        "--device", "cpu",
    ]  # fmt: skip
    assert cli.main([*common, "--hparams", str(hp)]) == 2  # unknown key
    hp.write_text(json.dumps({**TINY, "epochs": 1}))
    assert cli.main([*common, "--hparams", str(hp)]) == 0
    log = pd.read_csv(tmp_path / "ft" / "log.csv")
    assert log["loss_pseudo"].iloc[0] > 0
    rpe = [("RPE" if a == "HUVEC" else a) for a in common]
    assert cli.main([*rpe, "--hparams", str(hp)]) == 2  # no such cell type


def test_integration_with_synthetic_screen(tmp_path):
    """synthesize -> sites -> stack -> plate-stats -> train -> predict through the CLI."""
    syn = {
        "seed": 0,
        "image_size": 32,
        "cell_types": ["HUVEC"],
        "train_experiments_per_cell_type": 3,
        "test_experiments_per_cell_type": 1,
        "n_treatments": 8,
        "n_positive_controls": 1,
        "sites_per_well": 2,
    }
    res = tmp_path / "results"
    images = tmp_path / "synthetic"
    assert (
        cli.main(
            ["synthesize", "--config-json", json.dumps(syn), "--out-images", str(images / "images")]
            + ["--out-metadata", str(images / "metadata.csv"), "--out-truth", str(images / "truth.csv")]
        )
        == 0
    )
    sites, classes = res / "sites.csv", res / "classes.json"
    assert (
        cli.main(
            ["sites", "--source", "synthetic", "--root", str(images), "--out-sites", str(sites)]
            + ["--out-truth", str(res / "test_truth.csv"), "--out-classes", str(classes)]
        )
        == 0
    )
    stacks, stats = [], []
    for exp in ["HUVEC-01", "HUVEC-02", "HUVEC-03", "HUVEC-04"]:
        for plate in (1, 2, 3, 4):
            stack = res / "stacks" / exp / f"Plate{plate}.h5"
            stat = res / "stats" / "plate" / exp / f"Plate{plate}.json"
            args = [
                "stack",
                "--sites",
                str(sites),
                "--experiment",
                exp,
                "--plate",
                str(plate),
                "--out",
                str(stack),
            ]
            assert cli.main(args) == 0
            assert cli.main(["plate-stats", "--stack", str(stack), "--out", str(stat)]) == 0
            stacks.append(str(stack))
            stats.append(str(stat))
    hp = json.dumps({**TINY, "input_size": 32, "epochs": 2, "batch_size": 8})
    out = tmp_path / "model"
    common = ["--sites", str(sites), "--stacks", *stacks, "--stats", *stats]
    train_args = ["train", *common, "--classes", str(classes), "--hparams", hp, "--scope", "all"]
    train_args += ["--val-experiments", "HUVEC-03", "--threads", "1", "--device", "cpu"]
    train_args += ["--out-weights", str(out / "w.pt"), "--out-log", str(out / "log.csv")]
    assert cli.main([*train_args, "--checkpoint-dir", str(out / "ckpt")]) == 0
    pred = tmp_path / "pred.npz"
    pred_args = ["predict", "--weights", str(out / "w.pt"), *common, "--cell-type", "HUVEC"]
    pred_args += ["--experiments", "HUVEC-03", "HUVEC-04", "--out", str(pred), "--threads", "1"]
    assert cli.main([*pred_args, "--num-workers", "0", "--device", "cpu"]) == 0
    z = np.load(pred)
    n_t = json.loads(classes.read_text())["n_treatments"]
    assert z["probs"].shape == (len(z["well_id"]), n_t) and len(z["well_id"]) == 2 * 4 * n_t // 4
    np.testing.assert_allclose(z["probs"].sum(1), 1.0, atol=1e-5)


def test_bench_train_smoke(tmp_path, capsys):
    out = tmp_path / "bench.json"
    args = ["bench", "train", "--backbone", "resnet10t", "--input-size", "16", "--batch-size", "4"]
    args += ["--steps", "2", "--warmup", "1", "--synthetic", "--num-workers", "0", "--threads", "1"]
    assert cli.main([*args, "--mean-teacher", "--device", "cpu", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["unlabelled_batch_size"] == 4 and result["ratio_full_over_model"] > 0
    assert "ratio_full_over_model" in capsys.readouterr().out


@pytest.mark.slow
def test_ddp_two_cpu_processes(tiny_screen, tmp_path):
    """torchrun with 2 CPU processes (gloo): trains, rank 0 alone writes the outputs."""
    import subprocess
    import sys
    from pathlib import Path

    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "deepnoise", "train"]
    cmd += ["--sites", str(tiny_screen.sites), "--classes", str(tiny_screen.classes)]
    cmd += ["--stacks", *map(str, tiny_screen.stacks), "--stats", *map(str, tiny_screen.stats)]
    cmd += ["--hparams", json.dumps({**TINY, "epochs": 2}), "--scope", "all", "--val-experiments", "HUVEC-02"]
    cmd += ["--out-weights", str(tmp_path / "w.pt"), "--out-log", str(tmp_path / "log.csv")]
    cmd += ["--checkpoint-dir", str(tmp_path / "ckpt"), "--threads", "1", "--device", "cpu"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    log = pd.read_csv(tmp_path / "log.csv")
    assert list(log["epoch"]) == [0, 1] and log["val_acc_teacher"].notna().all()
    assert torch.load(tmp_path / "w.pt", weights_only=True)["epochs"] == 2


def test_several_gpus_relaunch_through_torchrun(monkeypatch):
    """A job given several GPUs reruns itself under torch.distributed.run, one process per GPU."""
    monkeypatch.setattr(sys, "argv", ["deepnoise", "train", "--scope", "all"])
    cmd = train.ddp_launch_command(sys.argv[1:], 4)
    assert cmd[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4"]
    assert cmd[5:] == ["-m", "deepnoise", "train", "--scope", "all"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert train._visible_gpus("auto") == 0


# ---------------------------------------------------------------- honest models (issue 12)


def test_no_teacher_without_mean_teacher(tiny_screen, tmp_path):
    """mean_teacher: false trains, selects, saves and predicts the student; no teacher exists."""
    w = _run(tiny_screen, tmp_path, cfg={"mean_teacher": False, "epochs": 2})
    assert w["teacher"] is None and w["selected"]["net"] == "student"
    log = pd.read_csv(tmp_path / "log.csv")
    assert log["val_acc_teacher"].isna().all() and log["ema_decay"].isna().all()
    assert log["val_acc_student"].notna().all()
    if w["selected"]["epoch"] == 1:  # the last epoch: the saved model is the final student
        assert all(torch.equal(w["model"][k], w["student"][k]) for k in w["student"])
    cfg = train.TrainConfig.from_dict({**TINY, "mean_teacher": False})
    rt = train.setup_runtime("cpu", 1)
    mc = {**train.models.model_config(cfg, 9, 6)}
    trainer = train.Trainer(cfg, mc, rt, np.zeros((1, 6)), np.ones((1, 6)), 2)
    assert trainer.teacher is None and [n for n, _ in trainer.networks()] == ["student"]


def test_compile_is_refused_on_cpu_with_its_key(tmp_path):
    """train.compile (a CUDA speed knob) is refused for CPU training, naming the key and the fix."""
    cfg = train.TrainConfig.from_dict({**TINY, "compile": True})
    rt = train.setup_runtime("cpu", 1)
    mc = {**train.models.model_config(cfg, 9, 6)}
    with pytest.raises(InputError, match=r"train.compile: true needs a CUDA device.*train.compile: false"):
        train.Trainer(cfg, mc, rt, np.zeros((1, 6)), np.ones((1, 6)), 2)
    eager = train.Trainer(
        dataclasses.replace(cfg, compile=False), mc, rt, np.zeros((1, 6)), np.ones((1, 6)), 2
    )
    assert eager.forward_student is eager.student and eager.forward_teacher is eager.teacher


class _FakeTrainer:
    selected_name = "teacher"

    def __init__(self):
        self.selected_net = torch.nn.Linear(1, 1, bias=False)


def test_best_validation_epoch_is_selected():
    """The saved model is the selected network of the epoch with the highest validation accuracy
    (a tie goes to the later epoch); NaN scores (no validation) select nothing."""
    trainer, best = _FakeTrainer(), None
    for epoch, score in enumerate([0.2, 0.5, 0.4, 0.5, 0.3]):
        with torch.no_grad():
            trainer.selected_net.weight.fill_(float(epoch))
        best = train.update_best(best, trainer, epoch, {"val_acc_teacher": score, "val_acc_student": 0.9})
    assert (best.epoch, best.val_acc) == (3, 0.5)
    assert float(best.model["weight"]) == 3.0
    assert train.update_best(None, trainer, 0, {"val_acc_teacher": float("nan")}) is None


def test_saved_model_is_the_best_teacher_epoch(tiny_screen, tmp_path):
    w = _run(tiny_screen, tmp_path, cfg={"epochs": 4, "ema_max_window": 0.3})
    log = pd.read_csv(tmp_path / "log.csv")
    scores = log["val_acc_teacher"].to_numpy()
    best = int(np.flatnonzero(scores == scores.max())[-1])
    sel = w["selected"]
    assert (sel["net"], sel["epoch"], sel["rule"]) == ("teacher", best, "best validation")
    assert sel["val_acc"] == pytest.approx(scores.max(), abs=1e-7)
    # the EMA decay is capped on a short run (12 steps): the teacher averages over <= 30% of them
    assert log["ema_decay"].max() < TINY["ema_decay"], log["ema_decay"].tolist()
    # without validation the last epoch is saved
    last = _run(tiny_screen, tmp_path / "noval", cfg={"epochs": 2}, val_experiments=[])
    assert last["selected"]["rule"] == "last epoch" and last["selected"]["epoch"] == 1
    assert all(torch.equal(last["model"][k], last["teacher"][k]) for k in last["teacher"])


def test_round_seeds_differ_and_round_zero_keeps_the_seed(tiny_screen, tmp_path):
    """A round r > 0 with unchanged inputs does not reproduce round r - 1 bit for bit."""
    assert train.round_seed(7, 0) == 7 and len({train.round_seed(7, r) for r in range(5)}) == 5
    a = _run(tiny_screen, tmp_path / "r0", cfg={"epochs": 1})
    b = _run(tiny_screen, tmp_path / "r1", cfg={"epochs": 1}, round_=1)
    assert b["round"] == 1 and b["hparams"]["seed"] == train.round_seed(0, 1)
    assert not all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


# ---------------------------------------------------------------- a rerun equals a fresh run (issue 16)


def _ft(screen, out, init, lr, **kw):
    return _run(
        screen, out, cfg={"epochs": 2, "lr": lr, "lr_milestones": [], "lr_values": []}, init=str(init),
        scope="HUVEC", **kw,
    )  # fmt: skip


def test_stale_checkpoint_is_set_aside_and_init_is_loaded(tiny_screen, tmp_path, caplog):
    """The README's "change one setting, rerun": a fine-tune whose folder holds a checkpoint of
    another lr (or of other --init weights) starts from --init exactly as a fresh run does."""
    init_a = tmp_path / "a"
    _run(tiny_screen, init_a, cfg={"epochs": 1})
    fresh = _ft(tiny_screen, tmp_path / "fresh", init_a / "weights.pt", 1e-3)
    # a finished run of another lr kept its checkpoint; an interrupted one of another lr too
    _ft(tiny_screen, tmp_path / "ft", init_a / "weights.pt", 5e-3, keep_checkpoint=True)
    with caplog.at_level(logging.WARNING, logger="deepnoise.checkpoint"):
        again = _ft(tiny_screen, tmp_path / "ft", init_a / "weights.pt", 1e-3)
    assert "lr 0.005 -> 0.001" in caplog.text and "moved to" in caplog.text
    assert not list((tmp_path / "ft" / "ckpt").glob("last.pt*"))  # both gone with the weights written
    for k in fresh["model"]:
        assert torch.equal(fresh["model"][k], again["model"][k]), k
    # the shared weights are rebuilt (other seed): the fine-tune restarts from them
    init_b = tmp_path / "b"
    _run(tiny_screen, init_b, cfg={"epochs": 1, "seed": 5})
    with pytest.raises(RuntimeError, match="injected"):
        _ft(tiny_screen, tmp_path / "ft2", init_a / "weights.pt", 1e-3, fail_after_epoch=0)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="deepnoise.checkpoint"):
        rebuilt = _ft(tiny_screen, tmp_path / "ft2", init_b / "weights.pt", 1e-3)
    assert "input contents changed" in caplog.text
    fresh_b = _ft(tiny_screen, tmp_path / "fresh_b", init_b / "weights.pt", 1e-3)
    for k in fresh_b["model"]:
        assert torch.equal(fresh_b["model"][k], rebuilt["model"][k]), k


def test_fingerprint_hashes_contents_not_mtimes(tiny_screen, tmp_path, caplog):
    import os

    screen = tf.copy_screen(tiny_screen, tmp_path / "screen")  # its mtimes are changed below
    with pytest.raises(RuntimeError, match="injected"):
        _run(screen, tmp_path, cfg={"epochs": 2}, fail_after_epoch=0)
    for path in [screen.sites, *screen.stacks, *screen.stats]:
        os.utime(path, (1e9, 1e9))  # rebuilt with the same contents: still resumed
    with caplog.at_level(logging.INFO):
        _run(screen, tmp_path, cfg={"epochs": 2})
    assert "resuming from" in caplog.text
    fp = train.checkpoint.inputs_fingerprint([str(screen.sites)], {})
    assert fp == train.checkpoint.inputs_fingerprint([str(screen.sites)], {})
    copy = tmp_path / "sites.csv"
    copy.write_text(screen.sites.read_text().replace("HUVEC-01", "HUVEC-09", 1))
    assert train.checkpoint.inputs_fingerprint([str(copy)], {}) != fp


# ---------------------------------------------------------------- pseudo-label targets


def test_soft_and_hard_pseudo_targets(tiny_screen, tmp_path):
    from deepnoise.ensemble import Predictions, save_predictions

    test_wells = sorted(w for w in tiny_screen.truth if w.startswith("HUVEC-03") and tiny_screen.truth[w] < 6)
    probs = np.full((len(test_wells), tiny_screen.n_treatments), 0.02, np.float32)
    for i, w in enumerate(test_wells):
        probs[i, tiny_screen.truth[w]] = 1 - 0.02 * (tiny_screen.truth[w] and tiny_screen.n_treatments - 1)
    pred = Predictions.from_well_ids(test_wells, "test", probs / probs.sum(1, keepdims=True))
    save_predictions(pred, tmp_path / "ens.npz")
    soft = _run(tiny_screen, tmp_path / "soft", cfg={"epochs": 1}, soft_targets=[str(tmp_path / "ens.npz")])
    log = pd.read_csv(tmp_path / "soft" / "log.csv")
    assert log["loss_pseudo"].iloc[0] > 0 and soft["round"] == 0
    with pytest.raises(InputError, match="give one, not both"):
        _run(tiny_screen, tmp_path / "x", soft_targets=["a"], pseudo_labels="b")


def test_a_killed_checkpoint_save_leaves_nothing_behind(tiny_screen, tmp_path, caplog):
    """A training killed while saving its checkpoint left a temporary file (a model + optimiser); the
    next start of the same training removes it before training."""
    from deepnoise import atomic

    ckpt = tmp_path / "ckpt" / "last.pt"
    ckpt.parent.mkdir(parents=True)
    leftover = ckpt.parent / atomic.temp_name(ckpt, ".pt")
    leftover.write_bytes(b"half a checkpoint")
    assert atomic.stale_temps(ckpt) == [leftover]
    with caplog.at_level(logging.INFO, logger="deepnoise.train"):
        _run(tiny_screen, tmp_path, cfg={"epochs": 1})
    assert not leftover.exists() and "left by an interrupted checkpoint save" in caplog.text
