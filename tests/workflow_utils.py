"""Run the real workflow with `snakemake` and read back the jobs it plans (no mocks)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SNAKEFILE = REPO / "workflow" / "Snakefile"
TINY = REPO / "tests" / "configs" / "tiny.yaml"
SNAKEMAKE = [sys.executable, "-m", "snakemake"]


@dataclass(frozen=True)
class Job:
    rule: str
    wildcards: tuple[tuple[str, str], ...]
    reason: str

    def wc(self, key: str) -> str | None:
        return dict(self.wildcards).get(key)


def load_tiny(**overrides) -> dict:
    cfg = yaml.safe_load(TINY.read_text())
    for dotted, value in overrides.items():
        node = cfg
        *path, last = dotted.split(".")
        for key in path:
            node = node[key]
        node[last] = value
    return cfg


def write_config(workdir: Path, cfg: dict) -> Path:
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def snakemake(workdir: Path, *args: str, timeout: float = 1800, check: bool = True):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # the venv's bin first, so the jobs' `python` is this interpreter
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    cmd = [*SNAKEMAKE, "--snakefile", str(SNAKEFILE), "--directory", str(workdir), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"snakemake failed ({proc.returncode}): {' '.join(cmd)}\n"
            f"--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-6000:]}"
        )
    return proc


_BLOCK = re.compile(r"^(?:local)?rule (\w+):\n((?:    .*\n?)*)", re.M)


def plan(workdir: Path, configfile: Path, *targets: str) -> list[Job]:
    """The jobs `snakemake -n` would run, with their wildcards and reason."""
    proc = snakemake(workdir, "-n", "--cores", "1", "--configfile", str(configfile), *targets)
    text = proc.stdout + proc.stderr
    jobs = []
    for rule, body in _BLOCK.findall(text):
        fields = dict(re.findall(r"^    (\w+): (.*)$", body, re.M))
        wildcards = tuple(
            tuple(kv.split("=", 1)) for kv in fields.get("wildcards", "").split(", ") if "=" in kv
        )
        jobs.append(Job(rule, wildcards, fields.get("reason", "")))
    if not jobs and "Nothing to be done" not in text:
        raise AssertionError(f"could not read the dry run:\n{text[-4000:]}")
    return [j for j in jobs if j.rule != "all"]


def copy_run(src: Path, dst: Path) -> Path:
    """A copy of a finished run (outputs, logs and Snakemake's metadata), timestamps kept."""
    shutil.copytree(src, dst, symlinks=True)
    return dst
