"""Interrupted runs: the workflow killed mid-run (SIGTERM, SIGKILL) resumes and ends where an
uninterrupted run ends, reusing every finished output; a training killed mid-epoch resumes from its
last epoch checkpoint.

Real `snakemake` runs of tests/configs/tiny.yaml restricted to one cell type and one round (~35 s
each on 2 cores). The kill goes to snakemake's whole process group, as when Slurm ends, pre-empts or
times out the job that runs snakemake, or an OOM killer takes its cgroup: the running job dies with it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.fixtures.workflow import (
    SNAKEFILE,
    load_tiny,
    plan,
    result_files,
    same_content,
    snakemake,
    write_config,
)

pytestmark = pytest.mark.slow

CHECKPOINTS = "results/checkpoints/round0"


def tiny_config(workdir: Path) -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    return write_config(workdir, load_tiny(cell_types=["HUVEC"], rounds=1))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run."""
    workdir = tmp_path_factory.mktemp("reference")
    snakemake(workdir, "--cores", "2", "--configfile", str(tiny_config(workdir)))
    return workdir


def start(workdir: Path, configfile: Path, log: Path, *args: str) -> subprocess.Popen:
    """snakemake in a session of its own (so the test can signal its whole process group)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(SNAKEFILE), "--directory", str(workdir)]
    cmd += ["--configfile", str(configfile), "--cores", "1", *args]
    with log.open("w") as out:
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def training_in_progress(workdir: Path, after_finished: int) -> Path | None:
    """A training of the shared model (2 epochs in the tiny config) whose first epoch checkpoint
    exists but whose weights do not, i.e. one in its second epoch, once ``after_finished`` such
    trainings have finished; its checkpoint directory."""
    finished = list(workdir.glob("results/round0/models/*/all/weights.pt"))
    if len(finished) < after_finished:
        return None
    for ckpt in workdir.glob(f"{CHECKPOINTS}/*/all/last.pt"):
        model, scope = ckpt.parent.parent.name, ckpt.parent.name
        if not (workdir / f"results/round0/models/{model}/{scope}/weights.pt").exists():
            return ckpt.parent
    return None


def interrupt(workdir: Path, sig: signal.Signals, after_finished: int, log: Path, *args: str) -> Path:
    """Run the workflow and send ``sig`` to its process group while a training is mid-run; the
    checkpoint directory of that training."""
    proc = start(workdir, tiny_config(workdir), log, *args)
    deadline = time.monotonic() + 300
    try:
        while (running := training_in_progress(workdir, after_finished)) is None:
            assert proc.poll() is None, f"the run ended before the interruption:\n{log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, log.read_text()[-4000:]
            time.sleep(0.02)
        os.killpg(proc.pid, sig)
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert rc != 0, "the interrupted run reported success"
    return running


def finished_outputs(workdir: Path) -> dict[str, int]:
    """Results present after the interruption (written atomically, so complete), by mtime."""
    return {
        str(p.relative_to(workdir)): p.stat().st_mtime_ns
        for p in (workdir / "results").rglob("*")
        if p.is_file() and "checkpoints" not in p.parts and not p.name.startswith(".")
    }


def log_of(workdir: Path, ckpt_dir: Path) -> Path:
    """The log of the `train` job that owns a checkpoint directory."""
    return workdir / f"logs/round0/train/{ckpt_dir.parent.name}.log"


def assert_same_results(workdir: Path, reference: Path) -> None:
    ours, theirs = result_files(workdir), result_files(reference)
    assert ours.keys() == theirs.keys(), sorted(set(ours) ^ set(theirs))
    differ = [k for k in ours if not same_content(ours[k], theirs[k])]
    assert not differ, f"results differ from the uninterrupted run: {differ}"


def assert_resumed(log: Path) -> None:
    text = log.read_text()
    assert "resuming from" in text and "after epoch" in text, text[-3000:]
    resumed_after = int(text.split("after epoch ", 1)[1].split()[0])
    trained = [
        int(line.split(" epoch ", 1)[1].split()[0])
        for line in text.splitlines()
        if " epoch " in line and " lr " in line
    ]
    # the rerun trains only the epochs after the checkpoint, not from scratch
    assert trained and min(trained) == resumed_after + 1, (resumed_after, trained)


def unchanged(before: dict[str, int], workdir: Path) -> None:
    after = finished_outputs(workdir)
    touched = [k for k, mtime in before.items() if after.get(k) != mtime]
    assert not touched, f"finished outputs were redone: {touched}"


def test_killed_runs_resume_and_equal_an_uninterrupted_run(reference, tmp_path):
    """SIGKILL mid-training, unlock, rerun; SIGTERM mid-training of the next model, rerun; done."""
    workdir = tmp_path / "run"
    configfile = str(workdir / "config.yaml")

    # 1. SIGKILL while the first training is in its second epoch: snakemake's lock stays behind
    first = interrupt(workdir, signal.SIGKILL, after_finished=0, log=tmp_path / "run1.log")
    finished1 = finished_outputs(workdir)
    assert any(k.startswith("results/stacks/") for k in finished1), sorted(finished1)
    locked = snakemake(workdir, "--cores", "1", "--configfile", configfile, check=False)
    assert locked.returncode != 0 and "cannot be locked" in locked.stdout + locked.stderr
    snakemake(workdir, "--unlock", "--configfile", configfile)
    jobs = plan(workdir, workdir / "config.yaml")
    assert not {j.rule for j in jobs} & {"synthesize", "sites", "stack", "plate_stats"}, jobs
    assert any(j.rule == "train" and j.wc("model") == first.parent.name for j in jobs), jobs

    # 2. the rerun resumes that training from its checkpoint; SIGTERM while the next one is running
    second = interrupt(workdir, signal.SIGTERM, 1, tmp_path / "run2.log", "--rerun-incomplete")
    assert second != first
    assert_resumed(log_of(workdir, first))
    unchanged(finished1, workdir)
    finished2 = finished_outputs(workdir)
    assert f"results/round0/models/{first.parent.name}/all/weights.pt" in finished2

    # 3. SIGTERM let snakemake exit cleanly (no lock): the rerun completes the workflow
    snakemake(workdir, "--cores", "2", "--configfile", configfile, "--rerun-incomplete")
    assert_resumed(log_of(workdir, second))
    unchanged(finished2, workdir)
    assert_same_results(workdir, reference)
