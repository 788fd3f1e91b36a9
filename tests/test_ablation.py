"""Config handling and table building of benchmarks/ablation.py, on fabricated metrics."""

import copy
import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("ablation", REPO / "benchmarks" / "ablation.py")
ablation = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ablation)


def _stage(name, kind, val, test, n=80):
    def split(acc):
        c = round(acc * n)
        return {"overall": {"n": n, "correct": c, "accuracy": c / n}, "cell_types": {}, "plates": []}

    splits = {"validation": split(val)}
    if test is not None:
        splits["test"] = split(test)
    return {"stage": name, "kind": kind, "files": [], "n_wells": 2 * n, "splits": splits}


def _metrics(round_, **stages):
    return {
        "round": round_,
        "test_scored": True,
        "stages": [_stage(k, "model" if k.startswith("m") else k, *v) for k, v in stages.items()],
    }


STUDY = {
    "base": "config/config.yaml",
    "runs": {"a": {"rounds": 1}, "b": {"rounds": 2}},
    "rows": [
        {"id": "a1", "group": "g", "label": "A", "run": "a", "stage": "m1", "paper": 50.0},
        {"id": "b1", "group": "g", "label": "B", "run": "b", "stage": "ensemble"},
        {"id": "b2", "group": "h", "label": "B round 1", "run": "b", "stage": "balanced", "round": 1},
    ],
    "expect": [["a1", "b1"], ["b1", "b2"]],
}

# fabricated metrics: run -> seed -> {round: metrics}
METRICS = {
    "a": {0: {0: _metrics(0, m1=(0.50, 0.40))}, 1: {0: _metrics(0, m1=(0.60, 0.50))}},
    "b": {
        0: {
            0: _metrics(0, m1=(0.7, 0.6), ensemble=(0.75, 0.65), balanced=(0.9, 0.8)),
            1: _metrics(1, m1=(0.7, 0.6), ensemble=(0.75, 0.65), balanced=(0.95, 0.9)),
        },
        1: {0: _metrics(0, m1=(0.7, 0.6), ensemble=(0.85, 0.75), balanced=(0.9, 0.8))},  # round 1 missing
    },
}


def _metrics_of(run, seed):
    return METRICS[run][seed]


def test_set_dotted_replaces_and_checks_parents():
    cfg = {"train": {"head": "arcface", "seed": 0}, "models": {"r10": {}, "r18": {}}}
    ablation.set_dotted(cfg, "train.head", "softmax")
    ablation.set_dotted(cfg, "models", {"r10": {"backbone": "resnet10t"}})
    assert cfg == {"train": {"head": "softmax", "seed": 0}, "models": {"r10": {"backbone": "resnet10t"}}}
    with pytest.raises(KeyError, match="nope"):
        ablation.set_dotted(cfg, "nope.x", 1)


def test_real_study_config_is_consistent():
    study = ablation.load_study(REPO / "config" / "ablation.yaml")
    base = yaml.safe_load((REPO / study["base"]).read_text())
    cfgs = {r: ablation.run_config(base, study, r, 0) for r in study["runs"]}
    for run, cfg in cfgs.items():
        for section in ablation.SHARED_SECTIONS:
            assert cfg[section] == base[section], (run, section)
        assert int(cfg["rounds"]) >= ablation.rounds_needed(study, run)
        # same training budget everywhere
        assert cfg["train"]["epochs"] == base["train"]["epochs"]
        assert cfg["finetune"] == base["finetune"]
    # each rung of the ladder changes one thing of the previous run
    order = ["norm_cell_type", "norm_experiment", "norm_plate", "arcface", "full"]
    for prev, run in zip(order, order[1:], strict=False):
        a, b = cfgs[prev]["train"], cfgs[run]["train"]
        changed = {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)}
        assert len(changed) == 1, (prev, run, changed)
    # the single model of the one-model runs is the full run's first model, trained the same way
    assert cfgs["arcface"]["models"] == {"r10": base["models"]["r10"]}
    assert cfgs["full"]["models"]["r10"] == base["models"]["r10"] and len(cfgs["full"]["models"]) == 2


def test_seed_repeats_shift_all_training_seeds():
    study = ablation.load_study(REPO / "config" / "ablation.yaml")
    base = yaml.safe_load((REPO / study["base"]).read_text())
    s0 = ablation.run_config(base, study, "full", 0)
    s2 = ablation.run_config(base, study, "full", 2)
    stride = 2 * study["seed_stride"]
    assert s2["train"]["seed"] == s0["train"]["seed"] + stride
    for name, model in s0["models"].items():
        if "seed" in model:
            assert s2["models"][name]["seed"] == model["seed"] + stride
    assert s2["synthetic"] == s0["synthetic"]
    assert base["train"]["seed"] == s0["train"]["seed"]  # the base config is not modified


def test_load_study_rejects_bad_configs(tmp_path):
    def write(study):
        path = tmp_path / "s.yaml"
        path.write_text(yaml.safe_dump(study))
        return path

    bad = copy.deepcopy(STUDY)
    bad["rows"][0]["run"] = "zzz"
    with pytest.raises(ValueError, match="unknown run 'zzz'"):
        ablation.load_study(write(bad))
    bad = copy.deepcopy(STUDY)
    bad["runs"]["a"]["synthetic.seed"] = 3
    with pytest.raises(ValueError, match="share the screen"):
        ablation.load_study(write(bad))
    bad = copy.deepcopy(STUDY)
    bad["expect"].append(["a1", "nope"])
    with pytest.raises(ValueError, match="unknown row 'nope'"):
        ablation.load_study(write(bad))
    assert ablation.load_study(write(STUDY))["rows"][0]["id"] == "a1"


def test_long_table_and_summary_over_seeds():
    long = ablation.long_table(STUDY, _metrics_of, [0, 1])
    # b2 (round 1) is missing for seed 1
    assert sorted(zip(long["id"], long["seed"], strict=True)) == [
        ("a1", 0),
        ("a1", 1),
        ("b1", 0),
        ("b1", 1),
        ("b2", 0),
    ]
    a1 = long[long["id"] == "a1"].sort_values("seed")
    assert a1["validation"].tolist() == pytest.approx([50.0, 60.0])
    assert a1["n_test"].tolist() == [80, 80]

    table = ablation.summarise(STUDY, long).set_index("id")
    assert list(table.index) == ["a1", "b1", "b2"]
    assert table.loc["a1", "validation_mean"] == pytest.approx(55.0)
    assert table.loc["a1", "validation_sd"] == pytest.approx(np.std([50, 60], ddof=1))
    assert table.loc["a1", "test_mean"] == pytest.approx(45.0)
    assert table.loc["a1", "pooled_mean"] == pytest.approx(50.0)  # (50 + 40) / 2 and (60 + 50) / 2
    assert table.loc["a1", "n_pooled"] == 160
    assert table.loc["a1", "paper"] == 50.0
    assert table.loc["b1", "validation_mean"] == pytest.approx(80.0)
    assert table.loc["b2", "seeds"] == 1 and math.isnan(table.loc["b2", "validation_sd"])
    assert table.loc["b2", "round"] == 1 and table.loc["b2", "test_mean"] == pytest.approx(90.0)


def test_unknown_stage_names_the_round_and_stages():
    study = copy.deepcopy(STUDY)
    study["rows"][0]["stage"] = "ghost"
    with pytest.raises(KeyError, match="no stage 'ghost'"):
        ablation.long_table(study, _metrics_of, [0])


def test_unscored_test_split_is_nan():
    metrics = {"a": {0: {0: _metrics(0, m1=(0.5, None))}}}
    study = {**STUDY, "rows": STUDY["rows"][:1], "expect": []}
    long = ablation.long_table(study, lambda r, s: metrics[r][s], [0])
    assert math.isnan(long["test"].iloc[0]) and long["n_test"].iloc[0] == 0
    assert long["validation"].iloc[0] == pytest.approx(50.0)
    assert long["pooled"].iloc[0] == pytest.approx(50.0) and long["n_pooled"].iloc[0] == 80


def test_ordering_verdicts():
    long = ablation.long_table(STUDY, _metrics_of, [0, 1])
    table = ablation.summarise(STUDY, long)
    checks = ablation.check_ordering(STUDY, table, "validation").set_index("higher")
    # a1 55 -> b1 80 over 160 wells each: far beyond noise
    assert checks.loc["b1", "verdict"] == "holds"
    assert checks.loc["b1", "diff"] == pytest.approx(25.0)
    # b1 80 (160 wells) -> b2 95 (80 wells): +15 against a binomial noise of hypot(3.2, 2.4) = 4.0
    assert checks.loc["b2", "verdict"] == "holds"
    assert checks.loc["b2", "noise"] == pytest.approx(4.0, abs=0.05)

    table2 = table.copy()
    table2.loc[table2["id"] == "b2", "validation_mean"] = 78.0
    checks = ablation.check_ordering(STUDY, table2, "validation").set_index("higher")
    assert checks.loc["b2", "verdict"] == "within noise"
    table2.loc[table2["id"] == "b2", "validation_mean"] = 40.0
    assert (
        ablation.check_ordering(STUDY, table2, "validation").set_index("higher").loc["b2", "verdict"]
        == "reversed"
    )
    table2.loc[table2["id"] == "b2", "validation_mean"] = np.nan
    assert (
        ablation.check_ordering(STUDY, table2, "validation").set_index("higher").loc["b2", "verdict"]
        == "missing"
    )


def test_binomial_se():
    assert ablation.binomial_se(50.0, 100) == pytest.approx(5.0)
    assert ablation.binomial_se(100.0, 100) > 0  # floored, never claims zero noise
    assert math.isnan(ablation.binomial_se(50.0, 0))


def test_markdown_and_plot(tmp_path):
    long = ablation.long_table(STUDY, _metrics_of, [0, 1])
    table = ablation.summarise(STUDY, long)
    checks = pd.concat([ablation.check_ordering(STUDY, table, s) for s in ablation.SCORES])
    md = ablation.markdown(table, checks, footer="Command: `x`")
    lines = md.splitlines()
    assert lines[0].startswith("| step | run | stage | round |")
    assert "| A | a | m1 | 0 | 55.0 ± 7.1 | 45.0 ± 7.1 | 50.0 ± 7.1 | 50 |" in lines
    assert "| B round 1 | b | balanced | 1 | 95.0 | 90.0 | 92.5 |  |" in lines
    assert "| a1 < b1 | +25.0 | +25.0 | +25.0 (" in md and "holds |" in md
    assert "Seeds per row: 1/2" in md and md.rstrip().endswith("Command: `x`")
    ablation.plot(table, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_rebalanced_stage_scores_and_caches(tmp_path):
    from balance_cases import synthetic_case

    from deepnoise.ensemble import save_predictions

    sites, pred, truth = synthetic_case(n_classes=40, signal=2.0, seed=1, eval_dataset="test")
    res = tmp_path / "results"
    (res / "round0" / "ensemble").mkdir(parents=True)
    sites.to_csv(res / "sites.csv", index=False)
    truth.rename("sirna_id").rename_axis("well_id").reset_index().to_csv(res / "test_truth.csv", index=False)
    save_predictions(pred, res / "round0" / "ensemble" / "SYN.npz")

    raw = ablation.rebalanced_stage(tmp_path, 0, "none")
    exact = ablation.rebalanced_stage(tmp_path, 0, "exact")
    assert raw["stage"] == "balance:none" and exact["kind"] == "balanced"
    n = len(pred)
    assert raw["splits"]["test"]["overall"]["n"] == n
    assert exact["splits"]["test"]["overall"]["accuracy"] > raw["splits"]["test"]["overall"]["accuracy"]
    cache = res / "ablation" / "round0" / "balance_exact.json"
    assert json.loads(cache.read_text()) == exact
    assert (res / "ablation" / "round0" / "exact" / "SYN.npz").exists()
    # cached: a second call reads the JSON
    cache.write_text(json.dumps(exact | {"n_wells": -1}))
    assert ablation.rebalanced_stage(tmp_path, 0, "exact")["n_wells"] == -1

    metrics = {"round": 0, "test_scored": True, "stages": []}
    (res / "round0" / "metrics.json").write_text(json.dumps(metrics))
    study = {"rows": [{"id": "x", "run": "r", "stage": "balance:paper"}]}
    loaded = ablation.load_run_metrics(tmp_path, study, "r")
    assert [s["stage"] for s in loaded[0]["stages"]] == ["balance:paper"]


def test_footer_from_run_json(tmp_path):
    assert (
        ablation.footer_text(tmp_path / "run.json", "python x --table-only")
        == "Command: `python x --table-only`"
    )
    info = {
        "command": "python benchmarks/ablation.py --seeds 1",
        "wall_minutes": 21.04,
        "cores": 2,
        "cpus": 2,
    }
    (tmp_path / "run.json").write_text(
        json.dumps(info | {"machine": "x86_64", "runs": 6, "finished": "2026-01-01 10:00"})
    )
    text = ablation.footer_text(tmp_path / "run.json", "python x --table-only")
    assert text.startswith(
        "Command: `python benchmarks/ablation.py --seeds 1`; wall time 21.0 min with --cores 2"
    )
