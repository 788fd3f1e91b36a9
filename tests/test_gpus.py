"""GPU jobs on one multi-GPU machine: each job is pinned to its own free device (runtime.claim_gpus),
and the rules declare their `gpu` resource, so `snakemake --resources gpu=N` runs N GPU jobs at once.

No GPU is needed: the devices are fake ids in CUDA_VISIBLE_DEVICES (the claim narrows that list and
never touches CUDA itself)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SNAKEFILE = REPO / "workflow" / "Snakefile"
TINY = REPO / "tests" / "configs" / "tiny.yaml"

# A job: claim through setup_runtime (what predict and a one-GPU training do), write the devices it
# got, hold them until the file `release-<name>` appears (or for `hold` seconds), record its interval.
JOB = textwrap.dedent(
    """
    import json, os, sys, time
    from pathlib import Path
    from deepnoise import runtime
    name, out, hold = sys.argv[1], Path(sys.argv[2]), float(sys.argv[3])
    start = time.time()
    (out / f"ready-{name}").write_text("ready")
    rt = runtime.setup_runtime("auto", 1)
    got = time.time()
    (out / f"claimed-{name}").write_text(os.environ["CUDA_VISIBLE_DEVICES"])
    while time.time() - got < hold and not (out / f"release-{name}").exists():
        time.sleep(0.05)
    rec = dict(name=name, devices=os.environ["CUDA_VISIBLE_DEVICES"], device=str(rt.device),
               start=got, end=time.time(), waited=got - start)
    (out / f"job-{name}.json").write_text(json.dumps(rec))
    """
)


def _env(tmp_path: Path, visible: str, gpus: int | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(CUDA_VISIBLE_DEVICES=visible, DEEPNOISE_GPU_LOCK_DIR=str(tmp_path / "locks"))
    env["PYTHONPATH"] = f"{REPO / 'scripts'}{os.pathsep}{env.get('PYTHONPATH', '')}"
    if gpus is None:
        env.pop("DEEPNOISE_GPUS", None)
    else:
        env["DEEPNOISE_GPUS"] = str(gpus)
    return env


def _start(tmp_path: Path, name: str, env: dict[str, str], hold: float = 60) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", JOB, name, str(tmp_path), str(hold)], env=env)


def _wait_for(path: Path, timeout: float = 60) -> str:
    end = time.time() + timeout
    while time.time() < end:
        if path.exists() and path.read_text():
            return path.read_text()
        time.sleep(0.05)
    raise AssertionError(f"{path} did not appear within {timeout} s")


def test_concurrent_jobs_get_distinct_free_devices_and_wait_when_none_is_free(tmp_path):
    env = _env(tmp_path, "0,1,2,3", 1)
    procs = {n: _start(tmp_path, n, env) for n in "abcd"}
    claimed = {n: _wait_for(tmp_path / f"claimed-{n}") for n in procs}
    assert sorted(claimed.values()) == ["0", "1", "2", "3"], claimed
    # a fifth job finds every device taken and waits ...
    fifth = _start(tmp_path, "e", env)
    _wait_for(tmp_path / "ready-e")  # imports done (seconds on a busy machine), claiming now
    time.sleep(3)
    assert not (tmp_path / "claimed-e").exists() and fifth.poll() is None
    # ... until a job ends: then it gets exactly the freed device
    (tmp_path / "release-b").touch()
    assert procs["b"].wait(timeout=30) == 0
    assert _wait_for(tmp_path / "claimed-e") == claimed["b"]
    for n in "acde":
        (tmp_path / f"release-{n}").touch()
    for p in [*procs.values(), fifth]:
        assert p.wait(timeout=30) == 0
    rec = json.loads((tmp_path / "job-e.json").read_text())
    assert rec["waited"] > 2.5 and rec["device"] == "cpu"  # fake ids: CUDA is never available


def test_a_two_gpu_job_gets_two_devices_and_what_is_not_claimed(tmp_path):
    def claim(visible, gpus, **extra):
        code = "import os; from deepnoise import runtime; r = runtime.claim_gpus(); "
        code += "print(r, os.environ.get('CUDA_VISIBLE_DEVICES'))"
        env = {**_env(tmp_path, visible, gpus), **extra}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    assert claim("0,1,2,3", 2) == "['0', '1'] 0,1"
    assert claim("GPU-aaaa,GPU-bbbb", 1) == "['GPU-aaaa'] GPU-aaaa"  # UUIDs work too
    # nothing to narrow: as many devices as asked, no request, or Slurm (which pins the job itself)
    assert claim("0,1", 2) == "None 0,1"
    assert claim("0,1,2,3", None) == "None 0,1,2,3"
    assert claim("0,1,2,3", 1, SLURM_JOB_ID="7") == "None 0,1,2,3"
    # --device cpu claims nothing
    code = "import os; from deepnoise import runtime; runtime.setup_runtime('cpu'); "
    code += "print(os.environ['CUDA_VISIBLE_DEVICES'])"
    out = subprocess.run(
        [sys.executable, "-c", code], env=_env(tmp_path, "0,1,2,3", 1), capture_output=True, text=True
    )
    assert out.stdout.strip() == "0,1,2,3", out.stderr


def test_gpu_rules_declare_the_configured_gpu_count(tmp_path):
    """The dry run's shell commands carry each GPU rule's `gpu` resource (config `gpus: train:`)."""
    config = tmp_path / "two.yaml"
    config.write_text(TINY.read_text() + "\ngpus:\n  train: 2\n")
    counts = {}
    for cfg, want in ((TINY, "1"), (config, "2")):
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "snakemake",
                "-n",
                "-p",
                "--snakefile",
                str(SNAKEFILE),
                "--configfile",
                str(cfg),
            ]
            + ["--directory", str(tmp_path / "wd"), "--cores", "1"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        cmds = re.findall(
            r"DEEPNOISE_GPUS=(\d+) python -m deepnoise (train|predict)", out.stdout + out.stderr
        )
        counts[want] = cmds
        assert {c for _, c in cmds} == {"train", "predict"}, out.stdout[-3000:]
        assert all(n == ("1" if c == "predict" else want) for n, c in cmds), cmds


def test_snakemake_resources_gpu_runs_that_many_jobs_at_once_on_distinct_devices(tmp_path):
    """Six GPU jobs, four fake GPUs, `--resources gpu=4`: never two overlapping jobs on one device."""
    work = tmp_path / "wd"
    work.mkdir()
    (work / "job.py").write_text(JOB)
    (work / "Snakefile").write_text(
        textwrap.dedent(
            """
            rule all:
                input: expand("job-{n}.json", n=range(6))

            rule job:
                output: "job-{n}.json"
                resources: gpu=1
                shell: "DEEPNOISE_GPUS={resources.gpu} {PY} job.py {wildcards.n} . 4"
            """
        ).replace("{PY}", sys.executable)
    )
    env = _env(tmp_path, "0,1,2,3", None)
    out = subprocess.run(
        [sys.executable, "-m", "snakemake", "--cores", "6", "--resources", "gpu=4", "--quiet", "rules"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    jobs = [json.loads((work / f"job-{n}.json").read_text()) for n in range(6)]
    assert all(len(j["devices"].split(",")) == 1 for j in jobs), jobs
    for i, a in enumerate(jobs):
        for b in jobs[i + 1 :]:
            overlap = a["start"] < b["end"] and b["start"] < a["end"]
            assert not (overlap and a["devices"] == b["devices"]), (a, b)
    # at most 4 at once (snakemake's limit), and more than one at once (the pinning allowed it)
    events = sorted([(j["start"], 1) for j in jobs] + [(j["end"], -1) for j in jobs])
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    assert 2 <= peak <= 4, jobs
