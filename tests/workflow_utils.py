"""Run the real workflow with `snakemake` and read back the jobs it plans (no mocks)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
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
    input: str = ""  # the job's input files, as the dry run prints them

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
    """The jobs `snakemake -n` would run, with their wildcards, reason and input (``targets`` may
    include options such as ``--forceall``)."""
    proc = snakemake(workdir, "-n", "--cores", "1", "--configfile", str(configfile), *targets)
    text = proc.stdout + proc.stderr
    jobs = []
    for rule, body in _BLOCK.findall(text):
        fields = dict(re.findall(r"^    (\w+): (.*)$", body, re.M))
        wildcards = tuple(
            tuple(kv.split("=", 1)) for kv in fields.get("wildcards", "").split(", ") if "=" in kv
        )
        jobs.append(Job(rule, wildcards, fields.get("reason", ""), fields.get("input", "")))
    if not jobs and "Nothing to be done" not in text:
        raise AssertionError(f"could not read the dry run:\n{text[-4000:]}")
    return [j for j in jobs if j.rule != "all"]


def copy_run(src: Path, dst: Path) -> Path:
    """A copy of a finished run (outputs, logs and Snakemake's metadata), timestamps kept.

    The resume checkpoints (results/checkpoints, two thirds of a tiny run's 0.9 GB) are left out:
    Snakemake does not know them, so dry runs and reports of the copy are the same without them.
    """
    top = src / "results" / "checkpoints"
    shutil.copytree(
        src, dst, symlinks=True, ignore=lambda d, names: ["checkpoints"] if Path(d) == top.parent else []
    )
    return dst


# Columns of the training logs (log.csv) that measure time, not results.
TIMING_COLUMNS = ["seconds", "images_per_s"]


def result_files(root: Path) -> dict[str, Path]:
    """The workflow's results (figures excluded), by path relative to the working directory."""
    keep = {".json", ".csv", ".tsv", ".npz", ".pt"}
    return {
        str(p.relative_to(root)): p
        for p in sorted((root / "results").rglob("*"))
        if p.is_file() and p.suffix in keep and "checkpoints" not in p.parts
    }


def same_content(a: Path, b: Path) -> bool:
    if a.suffix == ".npz":
        with np.load(a) as x, np.load(b) as y:
            return set(x.files) == set(y.files) and all(np.array_equal(x[k], y[k]) for k in x.files)
    if a.suffix == ".pt":
        import torch

        x, y = (torch.load(p, map_location="cpu", weights_only=True) for p in (a, b))
        # `runtime`: the runtime knobs the training ran with (loader workers, AMP, ...), a record of
        # how, not part of the result
        if isinstance(x, dict) and isinstance(y, dict):
            x, y = ({k: v for k, v in d.items() if k != "runtime"} for d in (x, y))
        return _same_tree(x, y)
    if a.suffix == ".json":
        return json.loads(a.read_text()) == json.loads(b.read_text())
    if a.name == "log.csv":
        x, y = (pd.read_csv(p).drop(columns=TIMING_COLUMNS, errors="ignore") for p in (a, b))
        return x.equals(y)
    return a.read_bytes() == b.read_bytes()


def _same_tree(x, y) -> bool:
    """Exact equality of nested dicts/lists of tensors and plain values (a checkpoint's content)."""
    import torch

    if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
        return isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and torch.equal(x, y)
    if isinstance(x, dict):
        return isinstance(y, dict) and x.keys() == y.keys() and all(_same_tree(x[k], y[k]) for k in x)
    if isinstance(x, list | tuple):
        return type(x) is type(y) and len(x) == len(y) and all(map(_same_tree, x, y))
    return x == y
