"""The plan is exactly the config a user gives: planned from the repository root (where the demo
config lives), `config/rxrx1.yaml` trains its own two models only, a model removed from a config is
gone from the plan, and a run with no --configfile is the demo. The full-RxRx1 DAG is planned from
the metadata alone (no images on disk)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import yaml

from tests.fixtures.rxrx1 import metadata
from tests.fixtures.workflow import REPO, Job, plan, snakemake


def plan_from_repo_root(configfile: Path) -> list[Job]:
    """The dry run a user gets in the repository root (--forceall: whatever results/ holds there)."""
    return plan(REPO, configfile, "--forceall")


def models_of(jobs: list[Job]) -> set[str]:
    return {j.wc("model") for j in jobs if j.wc("model")}


def test_rxrx1_config_plans_exactly_its_models_from_the_repository_root(tmp_path: Path):
    data = tmp_path / "rxrx1"
    data.mkdir()
    metadata(51).to_csv(data / "metadata.csv", index=False)
    cfg = yaml.safe_load((REPO / "config/rxrx1.yaml").read_text())
    cfg["data"]["root"] = str(data)
    configfile = tmp_path / "config.yaml"
    configfile.write_text(yaml.safe_dump(cfg))

    planned = plan_from_repo_root(configfile)
    jobs = Counter(j.rule for j in planned)

    assert models_of(planned) == {"xception", "xception-wide"}  # not the demo's r10, r18
    plates, experiments, cell_types, models, rounds = 51 * 4, 51, 4, 2, 3
    assert not (data / "images").exists()
    assert jobs["synthesize"] == 0
    assert jobs["sites"] == 1
    assert jobs["stack"] == jobs["plate_stats"] == plates
    assert jobs["experiment_stats"] == experiments
    assert jobs["cell_type_stats"] == cell_types
    assert jobs["train"] == models * rounds
    assert jobs["finetune"] == jobs["predict"] == models * cell_types * rounds
    assert jobs["ensemble"] == jobs["balance"] == cell_types * rounds
    assert jobs["metrics"] == rounds
    # every round's pseudo labels: the next round learns from them, metrics score them
    assert jobs["pseudo_labels"] == rounds
    assert jobs["submission"] == jobs["summary"] == 1
    assert jobs["plot_training"] == rounds
    assert jobs["accuracy_table"] == jobs["provenance"] == 1  # the report's table and provenance
    # 560 jobs, less the `all` target
    assert sum(jobs.values()) == 559

    # A fine-tune and a prediction declare their own cell type's stacks and statistics only (what
    # they read): the DAG of full RxRx1 stays small enough to plan in seconds (docs/figures.md).
    def stacks_and_stats(job: Job) -> tuple[set[str], set[str]]:
        files = job.input.split(", ")
        stacks = {f.split("/")[2] for f in files if f.startswith("results/stacks/")}
        stats = {f.split("/")[-1].split(".")[0] for f in files if f.startswith("results/stats/cell_type/")}
        return {s.split("-")[0] for s in stacks}, stats

    train = next(j for j in planned if j.rule == "train")
    assert stacks_and_stats(train) == ({"HUVEC", "RPE", "HEPG2", "U2OS"},) * 2
    for job in planned:
        if job.rule in ("finetune", "predict"):
            assert stacks_and_stats(job) == ({job.wc("cell_type")},) * 2, job


def test_a_model_removed_from_the_config_is_gone_from_the_plan(tmp_path: Path):
    cfg = yaml.safe_load((REPO / "config/config.yaml").read_text())
    assert {"r10", "r18"} <= set(cfg["models"])
    del cfg["models"]["r18"]
    configfile = tmp_path / "config.yaml"
    configfile.write_text(yaml.safe_dump(cfg))

    planned = plan_from_repo_root(configfile)

    assert models_of(planned) == {"r10"}
    assert Counter(j.rule for j in planned)["train"] == cfg["rounds"]


def test_no_configfile_runs_the_demo_and_config_options_change_it(tmp_path: Path):
    """`snakemake` alone plans the demo config; `--config key=value` alone changes the demo's key."""
    demo = yaml.safe_load((REPO / "config/config.yaml").read_text())
    proc = snakemake(tmp_path, "-n", "--cores", "1", "--config", "rounds=1", "--quiet", "rules")
    rows = (line.split() for line in proc.stdout.splitlines())
    counts = {row[0]: int(row[1]) for row in rows if len(row) == 2 and row[1].isdigit()}
    assert counts["train"] == len(demo["models"]) * 1
    assert counts["finetune"] == len(demo["models"]) * len(demo["synthetic"]["cell_types"])
