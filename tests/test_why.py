"""`deepnoise why`: after a real tiny run, one model's learning rate changed reads as one grouped line
with its old and new values and the number of jobs; with no change it says so."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from deepnoise import why
from deepnoise.plan import PlannedJob
from tests.fixtures.workflow import SNAKEFILE, copy_run, load_tiny, plan, snakemake, write_config


def run_why(workdir, configfile) -> str:
    cmd = [sys.executable, "-m", "deepnoise", "why", "--configfile", str(configfile)]
    cmd += ["--snakefile", str(SNAKEFILE), "--directory", str(workdir)]
    return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600).stdout


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("why")
    configfile = write_config(workdir, load_tiny(cell_types=["HUVEC"]))
    snakemake(workdir, "--cores", "2", "--configfile", str(configfile))
    return workdir


@pytest.mark.slow
def test_nothing_changed(finished):
    out = run_why(finished, finished / "config.yaml")
    assert out.startswith("Nothing to do: no job is planned"), out


@pytest.mark.slow
def test_one_models_learning_rate(finished, tmp_path):
    run = copy_run(finished, tmp_path / "run")
    cfg = load_tiny(cell_types=["HUVEC"])
    cfg["models"]["r10"]["lr"] = 0.002
    configfile = write_config(run, cfg)
    out = run_why(run, configfile)
    jobs = plan(run, configfile)  # the dry run as the other workflow tests read it
    params_jobs = [j for j in jobs if "Params have changed" in j.reason]
    assert {(j.rule, j.wc("model")) for j in params_jobs} == {("train", "r10")}
    # Snakemake checks params only of jobs that would not rerun anyway: round 1's train r10 reruns
    # because round 0's does, so only round 0's shows the change (1 job)
    n = len(params_jobs)
    assert n == 1
    assert f"  models.r10.lr: 0.001 -> 0.002: {n} job{'s' if n != 1 else ''} (train {n})" in out, out
    assert "train.lr" not in out and "r18" not in out.split("other reasons")[0], out
    assert f"{len(jobs)} jobs planned in all." in out
    # the other jobs rerun because an upstream job does, counted apart
    others = len(jobs) - len(params_jobs)
    assert "job(s) planned for other reasons" in out and others > 0


@pytest.mark.slow
def test_the_old_values_are_read_from_snakemakes_metadata(finished):
    weights = "results/round0/models/r10/all/weights.pt"
    recorded = why.recorded_params(finished, weights)
    hp = [json.loads(v) for v in recorded if isinstance(v, str) and v.startswith("{")]
    assert len(hp) == 1 and hp[0]["lr"] == 0.001 and hp[0]["backbone"] == "resnet10t"


def _job(rule, reason, **wc):
    return PlannedJob(rule, tuple(wc.items()), reason, ())


def test_reason_parsing_and_key_names():
    old = json.dumps({"lr": 0.001, "epochs": 2, "backbone": "resnet10t"}, sort_keys=True)
    new = json.dumps({"lr": 0.002, "epochs": 2, "backbone": "resnet10t"}, sort_keys=True)
    reason = (
        "Input files updated by another job: a; Params have changed since last execution: Union of "
        f"exclusive params before and now across all output: before: {old!r},64 now: {new!r},32 "
    )
    before, now = why.params_change(reason)
    assert before == [old, 64] and now == [new, 32]
    config = {
        "train": {"lr": 0.001},
        "models": {"r10": {"backbone": "resnet10t"}},
        "predict": {"batch_size": 32},
    }
    lines = why.changes(_job("train", reason, round="0", model="r10"), before, now, config)
    assert lines == ["train.lr of model r10: 0.001 -> 0.002", "predict.batch_size: 64 -> 32"]
    config["models"]["r10"]["lr"] = 0.002
    assert why.changes(_job("train", reason, round="0", model="r10"), before, now, config)[0] == (
        "models.r10.lr: 0.001 -> 0.002"
    )
    config["finetune"] = {"lr": 0.002}
    ft = why.changes(_job("finetune", reason, round="0", model="r10", cell_type="HUVEC"), before, now, config)
    assert ft[0] == "finetune.lr of model r10: 0.001 -> 0.002"
    nothing = why.params_change(
        "Params have changed since last execution: u: before: <nothing exclusive> now: 'x' "
    )
    assert nothing == ([], ["x"])
    assert why.params_change("Missing output files: a") is None


def test_grouping():
    reason = "Params have changed since last execution: u: before: '{\"lr\": 1}' now: '{\"lr\": 2}' "
    jobs = [_job("train", reason, round=str(r), model="m") for r in range(3)]
    jobs.append(_job("predict", "Input files updated by another job: x", round="0", model="m", cell_type="A"))
    w = why.explain(jobs, {"train": {"lr": 1}, "models": {"m": {}}}, "/nonexistent")
    text = why.format_why(w)
    assert "  train.lr of model m: 1 -> 2: 3 jobs (train 3)" in text
    assert "  an upstream job reruns: 1 job (predict 1)" in text
    assert "4 jobs planned in all." in text
