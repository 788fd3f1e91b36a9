"""The workflow end to end on a tiny synthetic screen, and targeted reruns read from real dry runs.

One real run (module fixture, ~2 minutes on 2 cores) of tests/configs/tiny.yaml restricted to one
cell type; every test then changes one config value in a copy of that finished run and reads the
jobs that `snakemake -n` plans.
"""

from __future__ import annotations

import json

import pandas as pd
import pytest

from tests.fixtures.workflow import (
    copy_run,
    load_tiny,
    plan,
    result_files,
    same_content,
    snakemake,
    write_config,
)

pytestmark = pytest.mark.slow

DATA_RULES = {"synthesize", "sites", "stack", "plate_stats", "experiment_stats", "cell_type_stats"}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    cfg = load_tiny(cell_types=["HUVEC"])
    configfile = write_config(workdir, cfg)
    snakemake(workdir, "--cores", "2", "--configfile", str(configfile))
    return workdir, cfg


def changed(finished, tmp_path, **overrides):
    workdir, cfg = finished
    run = copy_run(workdir, tmp_path / "run")
    new = load_tiny(cell_types=["HUVEC"], **overrides)
    return plan(run, write_config(run, new))


def test_run_outputs(finished):
    workdir, cfg = finished
    summary = pd.read_csv(workdir / "results/summary.tsv", sep="\t")
    assert set(summary["round"]) == {0, 1}
    assert "balanced" in (workdir / "results/summary.txt").read_text()
    sub = pd.read_csv(workdir / "results/submission.csv")
    assert list(sub.columns) == ["id_code", "sirna"]
    truth = pd.read_csv(workdir / "results/test_truth.csv")
    huvec = truth[truth["cell_type"] == "HUVEC"]
    assert set(sub["id_code"]) == set(huvec["well_id"])
    for r in (0, 1):
        m = json.loads((workdir / f"results/round{r}/metrics.json").read_text())
        assert m
    for png in ("accuracy", "balancing", "plates", "composites", "training_round0"):
        assert (workdir / f"results/plots/{png}.png").stat().st_size > 1000


def test_results_do_not_depend_on_cores_job_order_or_loader_workers(finished, tmp_path):
    """Bit-reproducible CPU runs: the fixture's run (``--cores 2``, two jobs at a time, one loader
    worker per loader) and a run with ``--cores 1`` (one job at a time: another job order) and no
    loader worker processes write the same results, weights and probabilities bit for bit. What a
    result does depend on besides the config: the threads of its job (``threads.*``, capped by
    ``--cores``), see docs/figures.md."""
    workdir, cfg = finished
    other = tmp_path / "serial"
    other.mkdir()
    cfg = load_tiny(cell_types=["HUVEC"], **{"train.num_workers": 0})
    snakemake(other, "--cores", "1", "--configfile", str(write_config(other, cfg)))
    ours, theirs = result_files(other), result_files(workdir)
    assert ours.keys() == theirs.keys(), sorted(set(ours) ^ set(theirs))
    assert any(k.endswith("weights.pt") and "round1" in k for k in ours), sorted(ours)
    differ = [k for k in ours if not same_content(ours[k], theirs[k])]
    assert not differ, f"results differ between --cores 2 and --cores 1 / no loader workers: {differ}"


def test_nothing_to_do_after_a_run(finished, tmp_path):
    assert changed(finished, tmp_path) == []


def test_one_models_learning_rate_reruns_only_that_model_and_downstream(finished, tmp_path):
    jobs = changed(finished, tmp_path, **{"models.r18.lr": 0.002})
    rules = {j.rule for j in jobs}
    assert not rules & DATA_RULES
    round0 = [j for j in jobs if j.wc("round") == "0"]
    # round 0: only r18's jobs and what consumes them (the ensemble onward)
    assert {j.wc("model") for j in round0 if j.wc("model")} == {"r18"}
    assert {"train", "finetune", "predict", "ensemble", "balance", "metrics"} <= {j.rule for j in round0}
    # every rerun is caused by the changed params or by an upstream job, never by anything else
    for j in jobs:
        if j.rule == "train" and j.wc("round") == "0":
            assert "params" in j.reason.lower(), j
        else:
            assert "updated by another job" in j.reason or "params" in j.reason.lower(), j


def test_runtime_knobs_plan_no_job(finished, tmp_path):
    """Loader workers, validation batch, AMP, ... change speed, never results: not a rerun trigger."""
    _, cfg = finished
    knobs = {
        "train.num_workers": cfg["train"]["num_workers"] + 2,
        "train.val_batch_size": 8,
        "train.amp": False,
        "train.channels_last": False,
        "train.cudnn_benchmark": False,
        "train.compile": True,
    }
    assert changed(finished, tmp_path, **knobs) == []


def test_one_models_finetune_setting_reruns_only_its_finetunes_and_downstream(finished, tmp_path):
    jobs = changed(finished, tmp_path, **{"models.r18.finetune": {"lr": 0.0005}})
    round0 = [j for j in jobs if j.wc("round") == "0"]
    assert not {j.rule for j in jobs} & DATA_RULES
    assert {j.wc("model") for j in round0 if j.wc("model")} == {"r18"}
    assert "train" not in {j.rule for j in round0}  # the shared model is not fine-tuning
    assert {"finetune", "predict", "ensemble", "balance", "metrics"} <= {j.rule for j in round0}


def test_normalisation_reruns_training_not_ingestion(finished, tmp_path):
    jobs = changed(finished, tmp_path, **{"train.normalization": "experiment"})
    rules = {j.rule for j in jobs}
    assert not rules & DATA_RULES
    trains = {(j.wc("round"), j.wc("model")) for j in jobs if j.rule == "train"}
    assert trains == {("0", "r10"), ("0", "r18"), ("1", "r10"), ("1", "r18")}


def test_balancing_method_reruns_only_balancing_onward(finished, tmp_path):
    jobs = changed(finished, tmp_path, **{"balance.method": "paper"})
    rules = {j.rule for j in jobs}
    assert not rules & DATA_RULES
    round0 = {j.rule for j in jobs if j.wc("round") == "0"}
    assert "balance" in round0
    assert not round0 & {"train", "finetune", "predict", "ensemble"}


def test_soft_targets_come_from_the_balanced_ensemble_and_their_source_reruns_round_1(finished, tmp_path):
    """pseudo.soft_source: balanced (the paper's order, the default) feeds round 1 the balanced
    ensemble of round 0; switching to the unbalanced ensemble reruns round 1's training onward
    and nothing of round 0."""
    jobs = changed(finished, tmp_path, **{"pseudo.soft_source": "ensemble"})
    assert {j.wc("round") for j in jobs if j.rule in ("train", "finetune", "predict")} == {"1"}
    trains = [j for j in jobs if j.rule == "train"]
    assert trains and all("results/round0/ensemble/" in j.input for j in trains)
    assert not any("results/round0/balanced/" in j.input for j in trains)
    workdir, _ = finished
    again = copy_run(workdir, tmp_path / "again")
    default = plan(again, write_config(again, load_tiny(cell_types=["HUVEC"])), "--forcerun", "train")
    round1 = [j for j in default if j.rule == "train" and j.wc("round") == "1"]
    assert round1 and all("results/round0/balanced/" in j.input for j in round1)


def test_adding_a_cell_type_adds_only_its_jobs(finished, tmp_path):
    workdir, _ = finished
    run = copy_run(workdir, tmp_path / "run")
    jobs = plan(run, write_config(run, load_tiny(cell_types=["HUVEC", "RPE"])))
    rules = {j.rule for j in jobs}
    assert not rules & DATA_RULES
    round0 = [j for j in jobs if j.wc("round") == "0"]
    assert not [j for j in round0 if j.rule == "train"]
    per_cell_type = [j for j in round0 if j.wc("cell_type")]
    assert {j.wc("cell_type") for j in per_cell_type} == {"RPE"}
    assert {j.rule for j in per_cell_type} == {"finetune", "predict", "ensemble", "balance"}


def test_report_of_a_finished_run(finished, tmp_path):
    workdir, cfg = finished
    run = copy_run(workdir, tmp_path / "run")
    configfile = write_config(run, cfg)
    snakemake(run, "--cores", "1", "--configfile", str(configfile), "--report", "report.html")
    html = (run / "report.html").read_text(errors="replace")
    for name in ("accuracy.png", "balancing.png", "plates.png", "composites.png", "summary.tsv"):
        assert name in html, name
    assert "training_round1.png" in html
