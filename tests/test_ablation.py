"""benchmarks/ablation.py: statistics (known values), config handling, scheduling and table building
on fabricated runs."""

import copy
import json
import math
import threading
import time

import numpy as np
import pandas as pd
import pytest
import yaml

from benchmarks import ablation
from tests.fixtures.workflow import REPO


# ---------------------------------------------------------------- statistics
def test_paired_stats_known_values():
    # R: t.test(1:5): t = 4.2426, df = 4, p-value = 0.01324, 95 % CI 1.036757 4.963243
    s = ablation.paired_stats([1, 2, 3, 4, 5])
    assert s["n"] == 5 and s["mean"] == pytest.approx(3.0)
    assert s["sd"] == pytest.approx(math.sqrt(2.5))
    assert s["t"] == pytest.approx(4.242641, rel=1e-6)
    assert s["p"] == pytest.approx(0.01324, abs=5e-6)
    assert (s["ci_low"], s["ci_high"]) == pytest.approx((1.036757, 4.963243), abs=1e-6)
    # NaNs are dropped (a seed where one arm is missing)
    assert ablation.paired_stats([1, np.nan, 2, 3, 4, 5])["p"] == pytest.approx(s["p"])
    # by hand: mean 0.625, sum of squares 12.6875, sd = sqrt(12.6875 / 3), t = mean / (sd / 2)
    s = ablation.paired_stats([-2, 0.5, 1, 3])
    assert s["t"] == pytest.approx(0.625 / (math.sqrt(12.6875 / 3) / 2))
    assert s["p"] > 0.5 and s["ci_low"] < 0 < s["ci_high"]


def test_paired_stats_degenerate():
    one = ablation.paired_stats([2.0])
    assert one["n"] == 1 and one["mean"] == 2.0 and math.isnan(one["p"]) and math.isnan(one["ci_low"])
    assert ablation.paired_stats([])["n"] == 0
    same = ablation.paired_stats([2.0, 2.0, 2.0])
    assert same["p"] == 0.0 and same["ci_low"] == same["ci_high"] == 2.0
    zero = ablation.paired_stats([0.0, 0.0])
    assert zero["p"] == 1.0
    # equal differences up to float rounding (2 of 240 wells, computed two ways) have zero spread
    tied = ablation.paired_stats([100 * 2 / 240, 100 * (53 / 240 - 51 / 240)])
    assert tied["sd"] == 0.0 and tied["p"] == 0.0


def test_holm_known_values():
    # R: p.adjust(c(0.01, 0.04, 0.03, 0.005), "holm") = 0.03 0.06 0.06 0.02
    adj, lev = ablation.holm([0.01, 0.04, 0.03, 0.005])
    assert adj == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert lev == pytest.approx([0.05 / 3, 0.05 / 1, 0.05 / 2, 0.05 / 4])
    # NaN (a step without data) is left out of the family: m = 2
    adj, lev = ablation.holm([0.02, np.nan, 0.04])
    assert adj[0] == pytest.approx(0.04) and adj[2] == pytest.approx(0.04) and math.isnan(adj[1])
    assert math.isnan(lev[1])
    # capped at 1
    assert ablation.holm([0.6, 0.7])[0] == pytest.approx([1.0, 1.0])


def test_verdicts():
    assert ablation.verdict(3.0, 0.01, 5) == "holds"
    assert ablation.verdict(-3.0, 0.01, 5) == "reversed"
    assert ablation.verdict(3.0, 0.06, 5) == "undecided"
    assert ablation.verdict(3.0, 0.049, 5) == "holds"
    assert ablation.verdict(3.0, 0.0, 1) == "missing"
    assert ablation.verdict(3.0, float("nan"), 5) == "missing"
    # two seeds never decide, even with zero spread (p = 0): a tie of a discrete score, 1 df
    assert ablation.verdict(0.83, 0.0, 2) == "undecided"
    assert ablation.verdict(0.83, 0.0, 3) == "holds"
    # small: the Holm interval inside +-margin (only with a margin; never with 2 seeds)
    assert ablation.verdict(0.5, 0.4, 5, interval=(-1.5, 2.5), margin=3) == "small"
    assert ablation.verdict(0.5, 0.4, 5, interval=(-1.5, 3.5), margin=3) == "undecided"
    assert ablation.verdict(0.5, 0.4, 5, interval=(-1.5, 2.5)) == "undecided"
    assert ablation.verdict(0.5, 0.4, 2, interval=(-0.5, 0.5), margin=3) == "undecided"
    assert ablation.verdict(2.0, 0.01, 5, interval=(1.0, 2.9), margin=3) == "holds"


def _long(diffs_by_step, base=50.0):
    """A long table of rows a, b, c... where row k+1 - row k = diffs_by_step[k] per seed."""
    n_seeds = len(diffs_by_step[0])
    lines = []
    for seed in range(n_seeds):
        acc = base
        lines.append({"id": "r0", "seed": seed, "test": acc, "validation": acc})
        for k, diffs in enumerate(diffs_by_step):
            acc += diffs[seed]
            lines.append({"id": f"r{k + 1}", "seed": seed, "test": acc, "validation": acc})
    return pd.DataFrame(lines)


def test_step_table_pairs_by_seed_and_holm_adjusts():
    big = [4.0, 5.0, 6.0, 5.0, 5.5]  # clear gain
    noisy = [3.0, -2.0, 1.0, 4.0, -1.0]  # no clear sign
    worse = [-5.0, -6.0, -4.5, -5.5, -5.0]  # clear loss
    long = _long([big, noisy, worse])
    steps = [["r0", "r1"], ["r1", "r2"], ["r2", "r3"]]
    t = ablation.step_table(long, steps).set_index("higher")
    for k, d in zip(("r1", "r2", "r3"), (big, noisy, worse), strict=True):
        raw = ablation.paired_stats(d)
        assert t.loc[k, "mean"] == pytest.approx(raw["mean"])
        assert t.loc[k, "p"] == pytest.approx(raw["p"])
        assert (t.loc[k, "ci_low"], t.loc[k, "ci_high"]) == pytest.approx((raw["ci_low"], raw["ci_high"]))
    adj, lev = ablation.holm(t["p"].to_numpy())
    assert t["p_holm"].to_numpy() == pytest.approx(adj)
    # the adjusted interval uses the Holm level of its rank: wider than the 95 % one
    from scipy import stats

    for k in ("r1", "r3"):
        half = stats.t.ppf(1 - t.loc[k, "level_holm"] / 2, 4) * t.loc[k, "se"]
        assert t.loc[k, "ci_low_holm"] == pytest.approx(t.loc[k, "mean"] - half)
        assert t.loc[k, "ci_low_holm"] < t.loc[k, "ci_low"]
    assert t.loc["r1", "ci_low_holm"] > 0 and t.loc["r1", "verdict"] == "holds"
    assert t.loc["r2", "verdict"] == "undecided"
    assert t.loc["r3", "ci_high_holm"] < 0 and t.loc["r3", "verdict"] == "reversed"


def test_step_table_is_paired_not_pooled():
    # arms differ by +1 on every seed, but seeds differ by 20 points: a paired test sees it,
    # an unpaired comparison of the two columns would not
    lines = []
    for seed, level in enumerate([30.0, 50.0, 70.0, 40.0, 60.0]):
        lines += [{"id": "a", "seed": seed, "test": level}, {"id": "b", "seed": seed, "test": level + 1}]
    t = ablation.step_table(pd.DataFrame(lines), [["a", "b"]])
    assert t.loc[0, "sd"] == 0.0 and t.loc[0, "verdict"] == "holds"


def test_step_table_missing_seeds_and_rows():
    long = _long([[1.0, 2.0, 3.0]])
    long = long[~((long["id"] == "r1") & (long["seed"] == 2))]
    t = ablation.step_table(long, [["r0", "r1"], ["r0", "ghost"]]).set_index("higher")
    assert t.loc["r1", "n"] == 2 and t.loc["r1", "mean"] == pytest.approx(1.5)
    assert t.loc["ghost", "n"] == 0 and t.loc["ghost", "verdict"] == "missing"
    # the missing step is not counted in the Holm family: r1 keeps its raw p
    assert t.loc["r1", "p_holm"] == pytest.approx(t.loc["r1", "p"])


# ---------------------------------------------------------------- configs
STUDY = {
    "base": "config/config.yaml",
    "seeds": 2,
    "screen": {"synthetic.n_treatments": 120},
    "runs": {"a": {"rounds": 1}, "b": {"rounds": 2}, "c": {"from": "b", "rounds": 2}},
    "rows": [
        {"id": "a1", "label": "A", "run": "a", "stage": "m1", "paper": 50.0},
        {"id": "b1", "label": "B", "run": "b", "stage": "ensemble"},
        {"id": "c1", "label": "C round 1", "run": "c", "stage": "ensemble", "round": 1},
    ],
    "steps": [["a1", "b1"], ["b1", "c1"]],
}


def _write(tmp_path, study):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def test_set_dotted_replaces_and_creates_sections():
    cfg = {"train": {"head": "arcface", "seed": 0}, "models": {"r10": {}, "r18": {}}}
    ablation.set_dotted(cfg, "train.head", "softmax")
    ablation.set_dotted(cfg, "models", {"m1": {"backbone": "resnet10t"}})
    ablation.set_dotted(cfg, "pseudo.targets", "soft")  # a new section: the config check judges it
    assert cfg == {
        "train": {"head": "softmax", "seed": 0},
        "models": {"m1": {"backbone": "resnet10t"}},
        "pseudo": {"targets": "soft"},
    }
    with pytest.raises(KeyError, match="'head' is not a mapping"):
        ablation.set_dotted(cfg, "train.head.x", 1)


def test_load_study_rejects_bad_configs(tmp_path):
    assert ablation.load_study(_write(tmp_path, STUDY))["rows"][0]["id"] == "a1"
    cases = [
        (lambda s: s["rows"][0].update(run="zzz"), "unknown run 'zzz'"),
        (lambda s: s["runs"]["a"].update({"synthetic.seed": 3}), "share the screen"),
        (lambda s: s["runs"]["a"].update({"split.validation_per_cell_type": 2}), "share the screen"),
        (lambda s: s["steps"].append(["a1", "nope"]), "unknown row 'nope'"),
        (lambda s: s["steps"].append(["a1"]), "not a pair"),
        (lambda s: s["runs"]["c"].update({"from": "c"}), "must name a run without `from`"),
        (lambda s: s["screen"].update({"synthetic.seed": 1}), "screen key 'synthetic.seed'"),
        (lambda s: s["screen"].update({"train.epochs": 1}), "screen key 'train.epochs'"),
        (lambda s: s.update(seeds=1), "seeds must be >= 2"),
        (lambda s: s.pop("steps"), "missing key 'steps'"),
    ]
    for mutate, message in cases:
        bad = copy.deepcopy(STUDY)
        mutate(bad)
        with pytest.raises(ValueError, match=message):
            ablation.load_study(_write(tmp_path, bad))


def test_extends_merges_screen_and_overrides_and_replaces_the_rest(tmp_path):
    overrides = {"train.epochs": 4, "train.head": "softmax"}
    parent = _write(tmp_path, {**STUDY, "seeds": 5, "overrides": overrides})
    child = tmp_path / "child.yaml"
    child.write_text(
        yaml.safe_dump(
            {
                "extends": str(parent),  # relative to the repository, or absolute
                "seeds": 7,
                "screen": {"synthetic.train_experiments_per_cell_type": 9},
                "overrides": {"train.epochs": 30},
            }
        )
    )
    study = ablation.load_study(child)
    assert study["seeds"] == 7 and study["runs"] == STUDY["runs"] and study["steps"] == STUDY["steps"]
    assert study["screen"] == {**STUDY["screen"], "synthetic.train_experiments_per_cell_type": 9}
    assert study["overrides"] == {"train.epochs": 30, "train.head": "softmax"}
    assert "extends" not in study
    # the merged study is checked like any other: a bad key in the child is named
    child.write_text(yaml.safe_dump({"extends": str(parent), "screen": {"train.epochs": 1}}))
    with pytest.raises(ValueError, match="screen key 'train.epochs'"):
        ablation.load_study(child)
    child.write_text(yaml.safe_dump({"extends": str(tmp_path / "nope.yaml")}))
    with pytest.raises(ValueError, match="nope.yaml: cannot read the ablation design \\(extended by"):
        ablation.load_study(child)
    child.write_text(yaml.safe_dump({"extends": str(child)}))
    with pytest.raises(ValueError, match="`extends` cycle"):
        ablation.load_study(child)


def test_large_design_is_the_small_one_with_more_data_and_epochs():
    base = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    small = ablation.load_study(REPO / "config" / "ablation.yaml")
    large = ablation.load_study(REPO / "config" / "ablation-large.yaml")
    for run in small["runs"]:
        a, b = ablation.run_config(base, small, run, 2), ablation.run_config(base, large, run, 2)
        assert b["synthetic"].pop("train_experiments_per_cell_type") == 9
        a["synthetic"].pop("train_experiments_per_cell_type")
        assert (b["train"].pop("epochs"), b["train"].pop("lr_milestones")) == (30, [19, 26])
        a["train"].pop("epochs"), a["train"].pop("lr_milestones")
        assert a == b, run
    assert large["rows"] == small["rows"] and large["steps"] == small["steps"] and large["seeds"] == 5


def test_seeds_change_the_screen_and_all_training_seeds():
    base = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    study = {**STUDY, "seed_stride": 100, "runs": {"b": {"models": {"m1": {}, "m2": {"seed": 1}}}}}
    s0 = ablation.run_config(base, study, "b", 0)
    s3 = ablation.run_config(base, study, "b", 3)
    assert s3["synthetic"]["seed"] == s0["synthetic"]["seed"] + 3 == base["synthetic"]["seed"] + 3
    assert s3["train"]["seed"] == s0["train"]["seed"] + 300
    assert s3["models"]["m2"]["seed"] == s0["models"]["m2"]["seed"] + 300
    assert s0["synthetic"]["n_treatments"] == 120  # the screen section applies to every run
    assert base["synthetic"]["n_treatments"] != 120  # the base config is not modified
    assert "from" not in ablation.run_config(base, STUDY, "c", 0)


def test_real_study_config_is_a_ladder():
    """config/ablation.yaml and -gpu.yaml: every step changes what its label says, on one screen."""
    base = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    for name in ("ablation.yaml", "ablation-gpu.yaml", "ablation-large.yaml"):
        study = ablation.load_study(REPO / "config" / name)
        assert int(study["seeds"]) >= 5, name
        cfg = {r: ablation.run_config(base, study, r, 1) for r in study["runs"]}
        for run, c in cfg.items():
            assert int(c["rounds"]) >= ablation.rounds_needed(study, run), (name, run)
            for section in ablation.SHARED_SECTIONS:  # the runs of a seed share the screen
                assert c[section] == cfg["softmax_cell_type"][section], (name, run, section)
            assert c["train"]["epochs"] == cfg["softmax_cell_type"]["train"]["epochs"]
            assert c["finetune"] == cfg["softmax_cell_type"]["finetune"]
        n = cfg["softmax_cell_type"]["synthetic"]["n_treatments"]
        assert 30 <= n // 4 <= 100, (name, n)  # 30-100 treatments per plate
        rows = {r["id"]: r for r in study["rows"]}

        def train_diff(a, b, cfg=cfg, rows=rows):
            ta, tb = cfg[rows[a]["run"]]["train"], cfg[rows[b]["run"]]["train"]
            return {k for k in ta.keys() | tb.keys() if ta.get(k) != tb.get(k)}

        assert train_diff("cell_type", "experiment") == {"normalization"}
        assert train_diff("experiment", "plate") == {"normalization"}
        assert train_diff("plate", "arcface") == {"head"}
        assert train_diff("arcface", "mean_teacher") == {"mean_teacher"}
        # the single model is the ensemble's first model, trained the same way
        assert cfg["arcface"]["models"]["m1"] == cfg["ensemble"]["models"]["m1"]
        assert len(cfg["ensemble"]["models"]) == 2 and rows["ensemble"]["stage"] == "ensemble"
        for arm, targets in (("pseudo_soft", "soft"), ("pseudo_hard", "hard")):
            c = cfg[rows[arm]["run"]]
            assert c["pseudo"]["targets"] == targets and rows[arm]["round"] == 1
            assert study["runs"][rows[arm]["run"]]["from"] == "ensemble"
            assert c["models"] == cfg["ensemble"]["models"] and c["train"] == cfg["ensemble"]["train"]
        for method in ("paper", "exact", "groups"):
            row = rows[f"balance_{method}"]
            assert row["stage"] == f"balance:{method}" and row["run"] == "pseudo_soft" and row["round"] == 1
        assert [r["paper"] for r in study["rows"][:6]] == [51.5, 62.9, 74.58, 85.542, 90.145, 95.535]
        assert all("paper" in r for r in study["rows"])  # a number or an explicit "not reported"
        steps = {tuple(s) for s in study["steps"]}
        assert ("pseudo_soft", "balance_paper") in steps and len(steps) == 10


def test_calibrated_design_is_the_ladder_with_two_pseudo_rounds_and_an_equivalence_margin():
    """config/ablation-calibrated.yaml (make ablation): each step changes what its label says, the
    soft targets are the balanced ensemble's, two pseudo-label rounds, 12 steps, small = +-3."""
    base = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    study = ablation.load_study(REPO / "config" / "ablation-calibrated.yaml")
    assert int(study["seeds"]) >= 5 and study["equivalence_margin"] == 3
    cfg = {r: ablation.run_config(base, study, r, 1) for r in study["runs"]}
    for run, c in cfg.items():
        assert int(c["rounds"]) >= ablation.rounds_needed(study, run), run
        for section in ablation.SHARED_SECTIONS:
            assert c[section] == cfg["softmax_cell_type"][section], (run, section)
    screen = cfg["softmax_plate"]["synthetic"]
    # the calibrated screen of config/config.yaml (docs/ablation.md, "Calibrating the screen")
    for knob in ("nuisance_scale", "affine_scale", "brightness", "background"):
        assert screen[knob] == base["synthetic"][knob], knob
    assert screen["test_experiments_per_cell_type"] * 2 * screen["n_treatments"] >= 960
    rows = {r["id"]: r for r in study["rows"]}
    tr = {i: cfg[r["run"]]["train"] for i, r in rows.items()}
    diff = lambda a, b: {k for k in tr[a].keys() | tr[b].keys() if tr[a].get(k) != tr[b].get(k)}  # noqa: E731
    assert diff("cell_type", "experiment") == diff("experiment", "plate") == {"normalization"}
    assert diff("plate", "arcface") == {"head"} and diff("arcface", "mean_teacher") == {"mean_teacher"}
    for arm, targets in (("pseudo_soft", "soft"), ("pseudo_hard", "hard")):
        c = cfg[rows[arm]["run"]]
        assert c["pseudo"]["targets"] == targets and c["pseudo"]["soft_source"] == "balanced"
        assert c["balance"]["method"] == "paper" and c["rounds"] == 3
        assert (rows[arm]["round"], rows[f"{arm}_r2"]["round"]) == (1, 2)
        assert c["models"] == cfg["ensemble"]["models"] and c["train"] == cfg["ensemble"]["train"]
    for method in ("paper", "exact", "groups"):
        assert rows[f"balance_{method}"]["round"] == 2
    assert [r["paper"] for r in study["rows"][:6]] == [51.5, 62.9, 74.58, 85.542, 90.145, 95.535]
    assert len(study["steps"]) == 12 and ["pseudo_soft", "pseudo_soft_r2"] in study["steps"]


def test_stress_designs_render_the_hard_screen_whatever_the_demos_screen():
    """The hard screen's designs keep every noise knob at deepnoise.synth.DEFAULTS, though their
    base config (the demo) is the calibrated screen."""
    from deepnoise import synth

    base = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    assert base["synthetic"]["nuisance_scale"] < 1  # the demo is the calibrated screen
    for name in ("ablation.yaml", "ablation-large.yaml", "ablation-gpu.yaml"):
        study = ablation.load_study(REPO / "config" / name)
        knobs = synth.validate_config(ablation.run_config(base, study, "softmax_plate", 0)["synthetic"])
        assert {k: knobs[k] for k in synth.DEFAULTS} == synth.DEFAULTS, name


def test_unknown_key_stops_the_harness_naming_run_and_key():
    base = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    study = {**STUDY, "runs": {"ok": {}, "bad": {"train.no_such_key": 1}}}
    ablation.check_run_configs(base, study, ["ok"])
    with pytest.raises(SystemExit, match=r"(?s)run 'bad'.*no_such_key"):
        ablation.check_run_configs(base, study, ["ok", "bad"])


# ---------------------------------------------------------------- running
def test_schedule_respects_dependencies_and_priority():
    order, lock = [], threading.Lock()

    def task(name, pause=0.0):
        def fn():
            with lock:
                order.append(("start", name))
            time.sleep(pause)
            with lock:
                order.append(("end", name))
            return name

        return fn

    tasks = {
        "data": (task("data", 0.05), [], 10),
        "low": (task("low"), ["data"], 1),
        "high": (task("high", 0.05), ["data"], 5),
        "child": (task("child"), ["high"], 9),
    }
    got = ablation.schedule(tasks, parallel=1)
    assert got == ["data", "low", "high", "child"]  # in task order
    starts = [n for kind, n in order if kind == "start"]
    assert starts.index("data") == 0
    assert order.index(("start", "child")) > order.index(("end", "high"))
    assert starts.index("high") < starts.index("low")  # priority among ready tasks


def test_schedule_reraises_and_stops():
    ran = []

    def boom():
        raise RuntimeError("snakemake failed in X")

    tasks = {"a": (boom, [], 1), "b": (lambda: ran.append("b"), ["a"], 1)}
    with pytest.raises(RuntimeError, match="failed in X"):
        ablation.schedule(tasks, parallel=2)
    assert ran == []


def test_copy_workdir_drops_later_rounds(tmp_path):
    src = tmp_path / "src"
    for rel in (
        "results/round0/metrics.json",
        "results/round1/metrics.json",
        "results/round12/x",
        "results/checkpoints/round0/c",
        "results/checkpoints/round1/c",
        "logs/round1/l",
        "results/ablation/round0/balance_exact.json",
        ".snakemake/metadata/m",
        "config.yaml",
    ):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text("x")
    ablation.copy_workdir(src, tmp_path / "dst", drop_rounds_from=1)
    dst = tmp_path / "dst"
    assert (dst / "results/round0/metrics.json").exists() and (dst / ".snakemake/metadata/m").exists()
    for gone in ("results/round1", "results/round12", "results/checkpoints", "logs/round1",
                 "results/ablation", "config.yaml"):  # fmt: skip
        assert not (dst / gone).exists(), gone
    (src / "results/round0/metrics.json").write_text("changed")
    ablation.copy_workdir(src, dst, drop_rounds_from=1)  # an existing copy is kept
    assert (dst / "results/round0/metrics.json").read_text() == "x"


# ---------------------------------------------------------------- reading runs
def _log(teacher):
    n = len(teacher)
    return pd.DataFrame(
        {"epoch": range(1, n + 1), "val_acc_student": np.linspace(0.1, 0.5, n), "val_acc_teacher": teacher}
    )


def test_selected_epoch_is_best_teacher_else_last():
    row = ablation.selected_epoch(_log([0.2, 0.6, 0.4, 0.6]))
    assert row["epoch"] == 2  # the first best teacher epoch
    row = ablation.selected_epoch(_log([np.nan] * 3))
    assert row["epoch"] == 3  # no teacher: the last epoch


def test_student_teacher_reads_fine_tuned_logs(tmp_path):
    models = tmp_path / "results" / "round0" / "models"
    for m, scope, teacher in (
        ("m1", "all", [0.9, 0.9]),  # the shared model: not used when fine-tuned scopes exist
        ("m1", "HUVEC", [0.5, 0.7]),
        ("m1", "RPE", [0.3, 0.1]),
        ("m2", "all", [np.nan, np.nan]),
    ):
        (models / m / scope).mkdir(parents=True)
        _log(teacher).to_csv(models / m / scope / "log.csv", index=False)
    student, teacher = ablation.student_teacher(tmp_path, 0, ["m1"])
    assert teacher == pytest.approx(100 * (0.7 + 0.3) / 2)
    assert student == pytest.approx(100 * (0.5 + 0.1) / 2)  # students at the selected epochs
    student, teacher = ablation.student_teacher(tmp_path, 0, ["m2"])
    assert student == pytest.approx(50.0) and math.isnan(teacher)  # no teacher: NaN, last epoch
    assert all(math.isnan(x) for x in ablation.student_teacher(tmp_path, 0, ["ghost"]))


def test_pseudo_entry_forms():
    got = ablation.pseudo_entry(
        {"pseudo_labels": {"validation": {"accuracy": 0.5}, "test": 0.25, "changed": 7}}
    )
    assert {k: got[k] for k in ("pseudo_validation", "pseudo_test", "pseudo_changed")} == {
        "pseudo_validation": 50.0, "pseudo_test": 25.0, "pseudo_changed": 7.0,
    }  # fmt: skip
    assert math.isnan(got["pseudo_selected_validation"]) and math.isnan(got["pseudo_selected_test"])
    assert all(math.isnan(v) for v in ablation.pseudo_entry({}).values())
    # the workflow's own format (deepnoise.evaluate.pseudo_label_metrics)
    real = {
        "all": {"n": 4, "correct": 3, "accuracy": 0.75},
        "selected": {"n": 2, "correct": 2, "accuracy": 1.0},
    }
    got = ablation.pseudo_entry({"pseudo_labels": {"validation": real, "test": real, "changed": 2}})
    assert got == {
        "pseudo_validation": 75.0, "pseudo_test": 75.0, "pseudo_changed": 2.0,
        "pseudo_selected_validation": 100.0, "pseudo_selected_test": 100.0,
    }  # fmt: skip


def _stage(name, kind, val, test, n=80):
    def split(acc):
        c = round(acc * n)
        return {"overall": {"n": n, "correct": c, "accuracy": c / n}, "cell_types": {}, "plates": []}

    splits = {"validation": split(val)}
    if test is not None:
        splits["test"] = split(test)
    return {"stage": name, "kind": kind, "files": [], "n_wells": 2 * n, "splits": splits}


def test_stage_accuracy():
    m = {"round": 0, "stages": [_stage("m1", "model", 0.5, None)]}
    assert ablation.stage_accuracy(m, "m1", "validation") == pytest.approx(50.0)
    assert math.isnan(ablation.stage_accuracy(m, "m1", "test"))
    with pytest.raises(KeyError, match="no stage 'ghost'"):
        ablation.stage_accuracy(m, "ghost", "test")


def test_tables_from_fabricated_runs(tmp_path):
    study = copy.deepcopy(STUDY)
    rng = np.random.default_rng(0)
    acc = {"a1": 40.0, "b1": 60.0, "c1": 61.0}

    def read(row, seed):
        if row["id"] == "c1" and seed == 2:
            return None  # a run that has not finished
        t = acc[row["id"]] + seed + rng.normal(0, 0.1)
        return {"test": t, "validation": t - 5, "student": 30.0, "teacher": np.nan,
                "pseudo_validation": np.nan, "pseudo_test": 70.0, "pseudo_changed": 3.0}  # fmt: skip

    long = ablation.long_table(study, read, [0, 1, 2, 3, 4])
    assert len(long) == 14
    steps = ablation.step_table(long, study["steps"])
    table = ablation.summarise(study, long, steps).set_index("id")
    assert table.loc["a1", "seeds"] == 5 and table.loc["c1", "seeds"] == 4
    assert table.loc["b1", "vs"] == "a1" and table.loc["a1", "vs"] == ""
    assert table.loc["b1", "step_mean"] == pytest.approx(20.0, abs=0.3)
    assert table.loc["b1", "verdict"] == "holds"
    assert table.loc["c1", "step_n"] == 4
    assert table.loc["b1", "paper"] == "not reported" and table.loc["a1", "paper"] == 50.0
    md = ablation.markdown(table.reset_index(), steps, 5, footer="Command: `x`")
    lines = md.splitlines()
    assert lines[0].startswith("| step | paper | test acc. % |")
    b = next(line for line in lines if line.startswith("| B |"))
    assert "| not reported |" in b and "| a1 |" in b and b.rstrip().endswith("| holds |")
    assert "Holm" in md and md.rstrip().endswith("Command: `x`")
    assert any(line.startswith("| C round 1 |") and "– / 70.0" in line for line in lines)


def test_rebalanced_stage_scores_and_caches(tmp_path):
    from deepnoise.ensemble import save_predictions
    from tests.fixtures.balance import synthetic_case

    sites, pred, truth = synthetic_case(n_classes=40, signal=2.0, seed=1, eval_dataset="test")
    res = tmp_path / "results"
    (res / "round0" / "ensemble").mkdir(parents=True)
    sites.to_csv(res / "sites.csv", index=False)
    truth.rename("sirna_id").rename_axis("well_id").reset_index().to_csv(res / "test_truth.csv", index=False)
    save_predictions(pred, res / "round0" / "ensemble" / "SYN.npz")

    raw = ablation.rebalanced_stage(tmp_path, 0, "none")
    exact = ablation.rebalanced_stage(tmp_path, 0, "exact")
    assert raw["stage"] == "balance:none" and exact["kind"] == "balanced"
    assert raw["splits"]["test"]["overall"]["n"] == len(pred)
    assert exact["splits"]["test"]["overall"]["accuracy"] > raw["splits"]["test"]["overall"]["accuracy"]
    cache = res / "ablation" / "round0" / "balance_exact.json"
    assert json.loads(cache.read_text()) == exact
    cache.write_text(json.dumps(exact | {"n_wells": -1}))
    assert ablation.rebalanced_stage(tmp_path, 0, "exact")["n_wells"] == -1  # cached
    with pytest.raises(RuntimeError, match="balance:nonsense"):
        ablation.rebalanced_stage(tmp_path, 0, "nonsense")


def test_footer_from_run_json():
    assert ablation.footer_text({}, "python x --table-only") == "Command: `python x --table-only`."
    info = {"command": "python -m benchmarks.ablation", "wall_minutes": 51.04, "cores": 2, "parallel": 2,
            "cpus": 2, "machine": "x86_64", "runs": 40, "finished": "2026-01-01 10:00"}  # fmt: skip
    text = ablation.footer_text(info, "python x --table-only")
    assert text.startswith(
        "Command: `python -m benchmarks.ablation`; wall time 51.0 min with --cores 2 --parallel 2"
    )


def test_run_one_copies_and_drops_checkpoints_of_finished_runs(tmp_path, monkeypatch):
    base = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    work = tmp_path / "work"
    (work / "seed0" / "data" / "results").mkdir(parents=True)
    (work / "seed0" / "data" / "results" / "sites.csv").write_text("x")
    calls = []

    def fake_snakemake(wd, targets, cores, log):
        calls.append((wd.name, list(targets)))
        ck = wd / "results" / "checkpoints" / "round0" / "m1" / "all"
        ck.mkdir(parents=True, exist_ok=True)
        (ck / "last.pt").write_text("x")
        return 1.0

    monkeypatch.setattr(ablation, "snakemake", fake_snakemake)
    study = {**STUDY, "runs": {"a": {"rounds": 2}}}
    got = ablation.run_one(base, study, work, "a", 0, 1)
    wd = work / "seed0" / "a"
    assert got["run"] == "a" and calls == [
        ("a", ["results/round0/metrics.json", "results/round1/metrics.json"])
    ]
    assert (wd / "results" / "sites.csv").exists() and (wd / "config.yaml").exists()
    assert not (wd / "results" / "checkpoints").exists()
    ablation.run_one(base, {**study, "keep_checkpoints": True}, work, "a", 0, 1)
    assert (wd / "results" / "checkpoints" / "round0").exists()


# ---------------------------------------------------------------- runs of another checkout
def _large():
    base = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    return base, ablation.load_study(REPO / "config" / "ablation-large.yaml")


def test_design_fingerprint_ignores_runtime_keys_only():
    base, study = _large()
    fp = ablation.design_fingerprint(study, base)
    runtime = copy.deepcopy(study) | {"cores": 16, "parallel": 8, "seeds": 10, "out": "elsewhere"}
    assert ablation.design_fingerprint(runtime, base) == fp
    other = copy.deepcopy(study)
    other["overrides"]["train.epochs"] = 31
    assert ablation.design_fingerprint(other, base) != fp
    base2 = copy.deepcopy(base)
    base2["train"]["lr"] = 1.0
    assert ablation.design_fingerprint(study, base2) != fp
    small = ablation.load_study(REPO / "config" / "ablation.yaml")
    assert ablation.design_fingerprint(small, base) != fp


def _ledger(tmp_path, lines, design):
    tmp_path.mkdir(parents=True, exist_ok=True)
    cols = ["id", "seed", *ablation.METRICS]
    pd.DataFrame(lines, columns=cols).to_csv(tmp_path / "runs.tsv", sep="\t", index=False)
    (tmp_path / "run.json").write_text(json.dumps({"design": design}))
    return tmp_path / "runs.tsv"


def _line(row, seed, test, **kw):
    return {"id": row, "seed": seed, "test": test, "validation": test + 1, "student": np.nan,
            "teacher": np.nan, "pseudo_validation": np.nan, "pseudo_test": np.nan,
            "pseudo_changed": np.nan, "pseudo_selected_validation": np.nan,
            "pseudo_selected_test": np.nan} | kw  # fmt: skip


def test_read_ledger_checks_its_design_and_columns(tmp_path):
    path = _ledger(tmp_path / "a", [_line("a1", 0, 40.0)], "abc")
    assert ablation.read_ledger(path, "abc")["test"].tolist() == [40.0]
    with pytest.raises(ValueError, match="design 'abc'.*is not this design 'xyz'"):
        ablation.read_ledger(path, "xyz")
    (tmp_path / "a" / "run.json").unlink()
    with pytest.raises(ValueError, match="no run.json beside it"):
        ablation.read_ledger(path, "abc")
    bad = _ledger(tmp_path / "b", [_line("a1", 0, 40.0)], "abc")
    pd.read_csv(bad, sep="\t").drop(columns="teacher").to_csv(bad, sep="\t", index=False)
    with pytest.raises(ValueError, match="missing columns teacher"):
        ablation.read_ledger(bad, "abc")
    # a ledger committed before the selected-label precision existed: read, those metrics NaN
    old = _ledger(tmp_path / "c", [_line("a1", 0, 40.0)], "abc")
    pd.read_csv(old, sep="\t").drop(columns=list(ablation.OPTIONAL_METRICS)).to_csv(
        old, sep="\t", index=False
    )
    got = ablation.read_ledger(old, "abc")
    assert got[list(ablation.OPTIONAL_METRICS)].isna().all().all()
    committed = REPO / "docs" / "ablation-large" / "runs.tsv"
    info = json.loads((committed.parent / "run.json").read_text())
    assert len(ablation.read_ledger(committed, info["design"])) == 55


def test_ledger_fills_missing_seeds_and_flags_reruns_that_differ():
    study = copy.deepcopy(STUDY)
    mine = pd.DataFrame([_line("a1", 1, 41.0), _line("b1", 1, 61.0), _line("a1", 2, 42.0)])
    ledger = pd.DataFrame(
        [
            _line("b1", 0, 60.0), _line("a1", 0, 40.0),  # seed 0: only in the ledger
            _line("a1", 1, 41.0004),  # a rerun within the tsv's rounding: agrees
            _line("b1", 1, 63.5, pseudo_test=70.0),  # a rerun that differs
            _line("a1", 9, 1.0),  # outside the seeds asked for
            _line("gone", 0, 1.0),  # a row the study no longer has
        ]
    )  # fmt: skip
    merged, mismatches = ablation.merge_ledger(mine, ledger, study, [0, 1, 2])
    assert list(zip(merged["id"], merged["seed"], strict=True)) == [
        ("a1", 0),
        ("b1", 0),
        ("a1", 1),
        ("b1", 1),
        ("a1", 2),
    ]
    assert merged.set_index(["id", "seed"]).loc[("b1", 1), "test"] == 61.0  # this checkout wins
    assert len(mismatches) == 1
    assert "row 'b1' seed 1" in mismatches[0] and "test 61 vs 63.5" in mismatches[0]
    assert "pseudo_test nan vs 70" in mismatches[0] and "student" not in mismatches[0]


def test_a_table_rebuilt_from_its_ledger_equals_the_runs_table(tmp_path):
    """runs.tsv keeps 4 decimals; the run's own statistics must use the same values, else a table
    rebuilt from the committed ledger differs from the run's (it did in the 5th decimal, and one
    rounded Δ flipped from -0.3 to -0.2)."""
    study = copy.deepcopy(STUDY)
    acc = {"a1": [10 + 100 * k / 240 for k in (26, 21, 39)], "b1": [10 + 100 * k / 240 for k in (20, 23, 33)]}
    acc["c1"] = [x + 100 / 240 for x in acc["b1"]]

    def read(row, seed):
        return {m: None for m in ablation.METRICS} | {"test": acc[row["id"]][seed], "validation": 1 / 3}

    long = ablation.long_table(study, read, [0, 1, 2])
    assert long["test"].tolist()[0] == 20.8333 and long["validation"].tolist()[0] == 0.3333
    ablation.write_runs(long, tmp_path / "runs.tsv")
    again = pd.read_csv(tmp_path / "runs.tsv", sep="\t")
    pd.testing.assert_frame_equal(
        ablation.step_table(long, study["steps"], "test"),
        ablation.step_table(again, study["steps"], "test"),
        check_exact=True,
    )


def test_table_only_joins_a_ledger_of_the_same_design(tmp_path):
    base, study = _large()
    fp = ablation.design_fingerprint(study, base)
    lines = [_line(r["id"], s, 10.0 + s + (5.0 if r["id"] == "plate" else 0.0)) for s in range(3)
             for r in study["rows"]]  # fmt: skip
    path = _ledger(tmp_path / "ledger", lines, fp)
    out = tmp_path / "out"
    args = ["--config", str(REPO / "config" / "ablation-large.yaml"), "--out", str(out), "--table-only"]
    assert ablation.main([*args, "--ledger", str(path)]) == 0
    runs = pd.read_csv(out / "runs.tsv", sep="\t")
    assert sorted(runs["seed"].unique()) == [0, 1, 2] and len(runs) == 3 * len(study["rows"])
    info = json.loads((out / "run.json").read_text())
    assert info["design"] == fp and info["seeds_with_results"] == [0, 1, 2]
    md = (out / "table.md").read_text()
    assert "over 3 seeds" in md and f"(design {fp})" in md
    steps = pd.read_csv(out / "steps.tsv", sep="\t").set_index(["higher", "metric"])
    assert steps.loc[("plate", "test"), "mean"] == pytest.approx(5.0)
    _ledger(tmp_path / "partial", [*lines, _line("plate", 3, 1.0)], fp)
    assert ablation.main([*args, "--ledger", str(tmp_path / "partial" / "runs.tsv")]) == 0
    md = (out / "table.md").read_text()
    assert "over 3 seeds" in md and "Seeds [3] are partial" in md
    assert json.loads((out / "run.json").read_text())["seeds_complete"] == [0, 1, 2]
    _ledger(tmp_path / "other", lines, "0" * 16)
    with pytest.raises(SystemExit):
        ablation.main([*args, "--ledger", str(tmp_path / "other" / "runs.tsv")])
    with pytest.raises(SystemExit):
        ablation.main([*args, "--run-seeds", "5"])


def test_cpu_kernels_names_atens_capability_and_onednns_cap(monkeypatch):
    import torch

    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    assert ablation.cpu_kernels() == f"{torch.backends.cpu.get_cpu_capability()}, ONEDNN_MAX_CPU_ISA=unset"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert ablation.cpu_kernels().endswith("ONEDNN_MAX_CPU_ISA=AVX2")
