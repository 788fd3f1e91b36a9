"""The workflow on a real Slurm 22.05 cluster through profiles/slurm and the official executor plugin.

A module fixture starts a single-node cluster on loopback (tests/slurm/start-cluster.sh: munged,
MariaDB on its socket only, slurmdbd, slurmctld, slurmd, two fake GPUs; installs the Debian packages
when missing) and stops exactly its daemons afterwards. One cluster serves every test and both of the
plugin's status modes: the workflow runs with `sacct` (the plugin's default on clusters with
accounting), the retry workflow once per mode, all at the same time.

What the jobs did is read back from the scheduler, not from snakemake: the job
completion log (JobCompType=jobcomp/filetxt: JobId, Name, JobState, ExitCode, TimeLimit, ProcCnt) and
`scontrol -d show job` (Comment = the rule, JOB_GRES = the GPUs allocated).

Needs root. Not root, no apt-get, or a cluster that does not start: the tests fail with the reason.
DEEPNOISE_SKIP_SLURM=1 skips them explicitly (for machines where that is known and accepted).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.fixtures.workflow import result_files, same_content

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]
SLURM_TESTS = REPO / "tests" / "slurm"
PROFILE = REPO / "profiles" / "slurm"
SNAKEFILE = REPO / "workflow" / "Snakefile"
TINY = REPO / "tests" / "configs" / "tiny.yaml"
GPU_RULES = {"train", "finetune", "predict"}

# Test-speed overrides of the profile: first status query after 2 s instead of 40 s (the plugin adds
# 10 s per query that sees no job finish, so queries come 2, 14, 36 s after a submission: 2 s catches the
# ~12 s jobs of the tiny config at the second query, 1 s would miss them until the third), and at most
# 4 jobs at once on this small machine. Everything else comes from profiles/slurm.
FAST = ["--slurm-init-seconds-before-status-checks", "2", "--seconds-between-status-checks", "2"]
JOBS = ["--jobs", "4"]
# The plugin's other status mode (the profile sets squeue): sacct, answered by slurmdbd.
SACCT = ["--slurm-status-command", "sacct"]
MODES = {"squeue": [], "sacct": SACCT}


# --- the cluster -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cluster:
    state: Path

    def jobcomp(self) -> dict[str, dict[str, str]]:
        """The job completion log: one record per finished job, by Slurm job id."""
        path = self.state / "jobcomp.log"
        records = {}
        for line in path.read_text().splitlines() if path.exists() else []:
            fields = dict(re.findall(r"(\w+)=(\S*)", line))
            records[fields["JobId"]] = fields
        return records


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if os.environ.get("DEEPNOISE_SKIP_SLURM") == "1":
        pytest.skip("DEEPNOISE_SKIP_SLURM=1: the Slurm tests were skipped on purpose")
    if os.geteuid() != 0:
        pytest.fail(
            "the Slurm tests need root (they install slurmctld/slurmd/munge with apt-get, start the "
            "daemons and write /etc/slurm). Run them as root, or set DEEPNOISE_SKIP_SLURM=1 to skip "
            "them explicitly.",
            pytrace=False,
        )
    state = tmp_path_factory.mktemp("slurm")
    start = subprocess.run(
        [str(SLURM_TESTS / "start-cluster.sh"), str(state)], capture_output=True, text=True, timeout=600
    )
    if start.returncode != 0:
        stop = subprocess.run(
            [str(SLURM_TESTS / "stop-cluster.sh"), str(state)], capture_output=True, text=True
        )
        pytest.fail(
            f"could not start the loopback Slurm cluster (start-cluster.sh exit {start.returncode}):\n"
            f"{start.stdout}{start.stderr}{stop.stderr}",
            pytrace=False,
        )
    yield Cluster(state)
    stop = subprocess.run(
        [str(SLURM_TESTS / "stop-cluster.sh"), str(state)], capture_output=True, text=True, timeout=120
    )
    assert stop.returncode == 0, f"stop-cluster.sh failed:\n{stop.stdout}{stop.stderr}"


# --- snakemake and what it says it did ------------------------------------------------------------


@dataclass
class Run:
    """A snakemake process started in the background, its working directory and its log."""

    workdir: Path
    log: Path
    proc: subprocess.Popen

    def wait(self) -> tuple[int, str]:
        rc = self.proc.wait()
        return rc, self.log.read_text()


def start_snakemake(workdir: Path, log: Path, *args: str, timeout: int) -> Run:
    """Start snakemake from the repository root, as users do; SIGINT at the timeout cancels its jobs."""
    workdir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # the venv's bin first: sbatch exports this environment, so the jobs find the same python/snakemake
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    cmd = ["timeout", "-s", "INT", "-k", "30", str(timeout), sys.executable, "-m", "snakemake"]
    cmd += [*args, "--directory", str(workdir)]
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    return Run(workdir, log, proc)


@dataclass(frozen=True)
class Submission:
    job: str  # snakemake's job id (a number; a UUID for a group job)
    slurm: str  # Slurm's job id
    rule: str  # the rule, from snakemake's job header; "group_<name>" for a group job
    log: Path  # the job's Slurm log (kept by the plugin when the job failed)


_HEADER = re.compile(r"^(local)?rule (\w+):\n((?:    .*\n)*)", re.M)
_SUBMITTED = re.compile(r"Job (\S+) has been submitted with SLURM jobid (\d+) \(log: (\S+)\)")
GROUPED = {"stack", "plate_stats"}  # group "plate" (profiles/slurm: groups)
GROUP_COMPONENTS = 8  # profiles/slurm: group-components plate=8


def read_log(text: str) -> tuple[dict[int, str], set[int], list[Submission]]:
    """Snakemake's log: rule of each job id, the job ids run locally, and the sbatch submissions."""
    rules, local = {}, set()
    for is_local, rule, body in _HEADER.findall(text):
        jobid = re.search(r"^    jobid: (\d+)$", body, re.M)
        assert jobid, f"no jobid in the header of rule {rule}:\n{body}"
        rules[int(jobid[1])] = rule
        if is_local:
            local.add(int(jobid[1]))
    subs = [
        Submission(j, s, rules[int(j)] if j.isdigit() else f"group_{_group_of(text, s)}", Path(log))
        for j, s, log in _SUBMITTED.findall(text)
    ]
    return rules, local, subs


def _group_of(text: str, slurm_jobid: str) -> str:
    """The group name of a group job's submission, from its Slurm log path (logs/slurm/group_<name>/)."""
    m = re.search(rf"SLURM jobid {slurm_jobid} \(log: \S*/group_(\w+)/", text)
    assert m, f"group submission {slurm_jobid} without a group log path"
    return m[1]


def scontrol(slurm_jobid: str) -> dict[str, str]:
    """`scontrol -d show job` (jobs stay there for MinJobAge=3600 s after they end)."""
    out = subprocess.run(
        ["scontrol", "-d", "-o", "show", "job", slurm_jobid], capture_output=True, text=True, check=True
    ).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def explain(text: str, cluster: Cluster) -> str:
    return f"--- snakemake (tail) ---\n{text[-8000:]}\n--- jobcomp ---\n" + "\n".join(
        " ".join(f"{k}={r.get(k)}" for k in ("JobId", "JobState", "TimeLimit", "Tres"))
        for r in cluster.jobcomp().values()
    )


def check_submissions(subs: list[Submission], cluster: Cluster) -> dict[str, dict[str, str]]:
    """Every submission is in the scheduler's records, all of one run, with the rule as its comment."""
    records = cluster.jobcomp()
    missing = [s for s in subs if s.slurm not in records]
    assert not missing, f"submitted but never finished in Slurm: {missing}"
    names = {records[s.slurm]["Name"] for s in subs}
    assert len(names) == 1, f"one snakemake run submits under one job name (its run id), got {names}"
    run_jobs = {jid for jid, r in records.items() if r["Name"] in names}
    assert run_jobs == {s.slurm for s in subs}, "Slurm ran jobs of this run that snakemake did not report"
    for s in subs:
        comment = scontrol(s.slurm)["Comment"]
        # the plugin comments a group job as rule_<group>_<its rules>, like a rule's rule_<rule>
        want = f"rule_{s.rule.removeprefix('group_')}"
        assert re.fullmatch(rf"{want}(_wildcards_.*)?", comment), (s, comment)
    return records


# --- the workflow on Slurm gives what it gives locally ---------------------------------------------


def test_workflow_on_slurm_equals_local_run(cluster, retry_runs, tmp_path):
    # retry_runs: started first so that their sleeping jobs overlap with this test
    missing = [str(p.relative_to(REPO)) for p in (SNAKEFILE, TINY) if not p.exists()]
    if missing:
        pytest.fail(f"the workflow to run is missing: {missing}", pytrace=False)
    # a frozen copy: Slurm jobs re-read the config file when they start, the local run only once
    config = tmp_path / "tiny.yaml"
    shutil.copyfile(TINY, config)
    common = ["--snakefile", str(SNAKEFILE), "--configfile", str(config)]
    on_slurm, local = tmp_path / "slurm", tmp_path / "local"

    # Both runs at once: the Slurm run mostly waits (submission, polling, job start-up), the local run
    # fills those gaps on the CPUs.
    slurm_run = start_snakemake(
        on_slurm,
        tmp_path / "slurm.log",
        *common,
        "--profile",
        str(PROFILE),
        *FAST,
        *JOBS,
        *SACCT,
        timeout=1200,
    )
    local_run = start_snakemake(local, tmp_path / "local.log", *common, "--cores", "2", timeout=1200)
    rc, text = slurm_run.wait()
    rc_local, text_local = local_run.wait()
    assert rc == 0, explain(text, cluster)
    assert rc_local == 0, text_local[-8000:]
    rules, local_ids, subs = read_log(text)
    remote_ids = set(rules) - local_ids
    assert remote_ids, "no job was submitted to Slurm"
    # every non-local job went through sbatch exactly once and COMPLETED (no retry was needed); the
    # per-plate jobs (stack, plate_stats) as groups of GROUP_COMPONENTS plates
    # (members of a group job are logged with indented headers, which read_log does not collect)
    grouped = {j for j in remote_ids if rules[j] in GROUPED}
    assert not grouped, f"stack/plate_stats submitted alone: {sorted(grouped)}"
    plates = len(set(re.findall(r"^ +output: (results/stacks/\S+\.h5)$", text, re.M)))
    alone = sorted(int(s.job) for s in subs if s.job.isdigit())
    assert alone == sorted(remote_ids - grouped), (sorted(remote_ids - grouped), subs)
    groups = [s for s in subs if not s.job.isdigit()]
    assert plates == 24 and len(groups) == -(-plates // GROUP_COMPONENTS), (plates, groups)
    assert all(s.rule.startswith("group_plate_") for s in groups), groups  # group_plate_<its rules>
    print(f"sbatch submissions: {len(subs)} with groups, {len(alone) + 2 * plates} without")
    records = check_submissions(subs, cluster)
    failed = {s: records[s.slurm]["JobState"] for s in subs if records[s.slurm]["JobState"] != "COMPLETED"}
    assert not failed, failed
    assert GPU_RULES <= {s.rule for s in subs}, Counter(s.rule for s in subs)

    # the profile's resources reached sbatch: GPU rules got a GPU and cpus_per_gpu CPUs, the others none
    for s in subs:
        job, rec = scontrol(s.slurm), records[s.slurm]
        if s.rule in GPU_RULES:
            assert job["JOB_GRES"] == "gpu:1" and job["TresPerJob"] == "gres:gpu:1", (s, job)
            # jobcomp's Tres is the request (cpu=1 for --cpus-per-gpu); ProcCnt is what was allocated
            assert rec["ProcCnt"] == "8" and job["CpusPerTres"] == "gres:gpu:8", (s, rec, job)
            # the time limit comes from the rule's forecast (deepnoise plan): a tiny job's forecast is
            # seconds, so it gets the 10-minute minimum (first attempt)
            assert rec["TimeLimit"] == "10", (s, rec)
        else:
            assert job.get("JOB_GRES", "(null)") == "(null)", (s, job)

    ours, theirs = result_files(on_slurm), result_files(local)
    assert ours.keys() == theirs.keys()
    assert any(k.endswith("metrics.json") for k in ours) and "results/submission.csv" in ours, sorted(ours)
    differ = [k for k in ours if not same_content(ours[k], theirs[k])]
    assert not differ, f"results differ between the Slurm run and the local run: {differ}"


# --- a failing job and a job over its time limit are retried ----------------------------------------


@pytest.fixture(scope="module")
def retry_runs(cluster, tmp_path_factory):
    """tests/slurm/retry/Snakefile through the profile, once per status mode, all started in the
    background: their jobs mostly sleep (about 3 minutes), so they run while the workflow test runs.

    In sacct mode the `cancelled` job is left out: plugin 2.8.0 reads sacct's `CANCELLED by <uid>`
    as still running, so snakemake would wait forever (see docs/cluster.md)."""
    runs = {}
    for mode, flags in MODES.items():
        tmp = tmp_path_factory.mktemp(f"retry-{mode}")
        targets = ["flaky.txt", "slow.txt", "gpu.txt"] if mode == "sacct" else []
        runs[mode] = start_snakemake(
            tmp / "run",
            tmp / "snakemake.log",
            "--snakefile",
            str(SLURM_TESTS / "retry" / "Snakefile"),
            "--profile",
            str(PROFILE),
            *FAST,
            *flags,
            *targets,
            timeout=420,
        )
    yield runs
    for run in runs.values():
        if run.proc.poll() is None:  # the test did not wait (it failed or was deselected)
            run.proc.send_signal(signal.SIGINT)
            run.proc.wait(timeout=120)


@pytest.mark.parametrize("mode", MODES)
def test_failed_and_timed_out_jobs_are_retried(cluster, retry_runs, mode):
    run = retry_runs[mode]
    workdir = run.workdir
    rc, text = run.wait()
    assert rc == 0, explain(text, cluster)
    # squeue mode stayed squeue (MinJobAge=3600 >= 3 x the initial delay)
    assert "Falling back to 'sacct'" not in text
    rules, local, subs = read_log(text)
    assert {rules[j] for j in local} == ({"all"} if mode == "squeue" else set())
    records = check_submissions(subs, cluster)
    rules_ = ("flaky", "slow", "cancelled", "gpu")
    by_rule = {rule: [records[s.slurm] for s in subs if s.rule == rule] for rule in rules_}
    expected = {"flaky": 2, "slow": 2, "cancelled": 2, "gpu": 1}
    if mode == "sacct":
        del expected["cancelled"]
    assert Counter(s.rule for s in subs) == expected, subs

    # flaky exits 3 on attempt 1: FAILED, resubmitted, COMPLETED
    assert [r["JobState"] for r in by_rule["flaky"]] == ["FAILED", "COMPLETED"]
    assert by_rule["flaky"][0]["ExitCode"] != "0:0"
    first_flaky = next(s for s in subs if s.rule == "flaky")
    assert "failing on purpose" in first_flaky.log.read_text()  # the plugin keeps a failed job's log
    assert (workdir / "flaky.txt").read_text().strip() == "2"

    # slow sleeps 70 s: killed at its 1-minute limit, resubmitted with 2 minutes, COMPLETED
    first, second = by_rule["slow"]
    assert (first["JobState"], first["TimeLimit"]) == ("TIMEOUT", "1")
    assert (second["JobState"], second["TimeLimit"]) == ("COMPLETED", "2")
    assert (workdir / "slow.txt").read_text().strip() == "2"

    # cancelled runs scancel on itself on attempt 1: CANCELLED is a failure, resubmitted, COMPLETED
    if mode == "squeue":
        assert [r["JobState"] for r in by_rule["cancelled"]] == ["CANCELLED", "COMPLETED"]
        assert (workdir / "cancelled.txt").read_text().strip() == "2"

    # gpu=1 becomes a GPU allocation that the job step sees
    assert [r["JobState"] for r in by_rule["gpu"]] == ["COMPLETED"]
    gpu_job = next(s for s in subs if s.rule == "gpu")
    assert scontrol(gpu_job.slurm)["JOB_GRES"] == "gpu:1"
    # one of the node's 2 fake GPUs (the other status mode's retry run may hold the other one)
    devices = [w for w in (workdir / "gpu.txt").read_text().split() if w.startswith("CUDA_VISIBLE_DEVICES=")]
    assert len(devices) == 1 and devices[0] in {"CUDA_VISIBLE_DEVICES=0", "CUDA_VISIBLE_DEVICES=1"}, devices
    for s in subs:
        if s.rule != "gpu":
            assert scontrol(s.slurm).get("JOB_GRES", "(null)") == "(null)", s
