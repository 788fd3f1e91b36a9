"""``deepnoise plan``: what a config will cost before anything runs.

The jobs are the workflow's own: one ``snakemake -n`` of the config (the dry run's jobs, rule by rule,
with their wildcards), and the screen's facts (experiments, validation split, every model's merged
training keys) written by the Snakefile at parse time (``common.smk``: ``DEEPNOISE_PLAN_FACTS``).
Per job it counts the images a training step or a prediction processes and turns them into hours
with the throughput table ``throughput.csv`` (device x backbone x input size x mean teacher).

Torch-free: ``common.smk`` imports it to set each GPU job's Slurm time limit from the forecast.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import heapq
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from deepnoise import layout
from deepnoise.errors import InputError

THROUGHPUT = Path(__file__).with_name("throughput.csv")
FIELDS = [
    "device",
    "backbone",
    "input_size",
    "mean_teacher",
    "batch_size",
    "unlabelled_batch_size",
    "images_per_s",
    "startup_s",
    "source",
]
DEFAULT_DEVICE = "NVIDIA H100 80GB HBM3"
# A forward pass alone (prediction, validation) costs about a third of a training step's
# forward + backward + optimiser step; no forward-only figure is measured yet.
FORWARD_SPEEDUP = 3.0
GPU_RULES = ("train", "finetune", "predict")


# ---------------------------------------------------------------------------------- throughput table
@dataclass(frozen=True)
class Rate:
    images_per_s: float
    startup_s: float
    row: str  # the table row used
    extrapolated: str = ""  # empty when the row matches exactly; else how it was scaled


def read_table(path: str | os.PathLike = THROUGHPUT) -> list[dict]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(line for line in f if not line.startswith("#")))
    for i, r in enumerate(rows):
        try:
            r["input_size"] = int(r["input_size"])
            r["mean_teacher"] = r["mean_teacher"].strip().lower() == "true"
            r["images_per_s"] = float(r["images_per_s"])
            r["startup_s"] = float(r["startup_s"])
        except (KeyError, ValueError) as exc:
            raise InputError(f"{path}: row {i + 1}: {exc}") from exc
    return rows


def _describe(r: dict) -> str:
    mt = " + mean teacher" if r["mean_teacher"] else ""
    return f"{r['device']} {r['backbone']} {r['input_size']}px{mt}"


def lookup(table: list[dict], device: str, backbone: str, input_size: int, mean_teacher: bool) -> Rate:
    """The training rate for this combination: the exact row, else the nearest row of the device
    scaled by pixels (and by the device's mean-teacher cost ratio), marked extrapolated."""
    rows = [r for r in table if r["device"] == device]
    if not rows:
        devices = sorted({r["device"] for r in table})
        raise InputError(f"throughput table: no row for device {device!r}; devices: {', '.join(devices)}")

    def pick(cands):
        return min(cands, key=lambda r: abs(math.log(r["input_size"] / input_size)))

    same = [r for r in rows if r["backbone"] == backbone]
    notes = []
    exact = [r for r in same if r["mean_teacher"] == mean_teacher]
    if exact:
        r = pick(exact)
        rate = r["images_per_s"]
    elif same:
        r = pick(same)
        rate = r["images_per_s"] * _teacher_ratio(rows, mean_teacher, r["mean_teacher"])
        notes.append("mean teacher " + ("added" if mean_teacher else "removed"))
    else:
        cands = [r for r in rows if r["mean_teacher"] == mean_teacher] or rows
        r = pick(cands)
        rate = r["images_per_s"] * _teacher_ratio(rows, mean_teacher, r["mean_teacher"])
        notes.append(f"backbone {r['backbone']} for {backbone}")
    if r["input_size"] != input_size:
        rate *= (r["input_size"] / input_size) ** 2
        notes.append(f"scaled by pixels from {r['input_size']}px")
    return Rate(rate, r["startup_s"], _describe(r), "; ".join(notes))


def _teacher_ratio(rows: list[dict], want: bool, have: bool) -> float:
    """Rate with/without mean teacher, from the device's pairs (H100 legacy_xception: 391/545)."""
    if want == have:
        return 1.0
    pairs = [
        (a["images_per_s"], b["images_per_s"])
        for a in rows
        for b in rows
        if a["backbone"] == b["backbone"]
        and a["input_size"] == b["input_size"]
        and not a["mean_teacher"]
        and b["mean_teacher"]
    ]
    ratio = sum(b / a for a, b in pairs) / len(pairs) if pairs else 391 / 545
    return ratio if want else 1 / ratio


def record_row(path: str | os.PathLike, row: dict) -> None:
    """Add the row, or replace the row of the same device x backbone x size x mean teacher."""
    from deepnoise.atomic import atomic_path

    path = Path(path)
    header = [line for line in path.read_text().splitlines(keepends=True) if line.startswith("#")]
    key = ("device", "backbone", "input_size", "mean_teacher")
    rows = [r for r in read_table(path) if any(str(r[k]) != str(row[k]) for k in key)]
    rows.append(row)
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        f.writelines(header)
        w = csv.DictWriter(f, fieldnames=FIELDS, lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({k: (str(r[k]).lower() if isinstance(r[k], bool) else r[k]) for k in FIELDS})


# ---------------------------------------------------------------------------------- the screen
@dataclass
class Screen:
    """What the Snakefile knows at parse time (``facts()``), plus wells per experiment."""

    experiments: dict[str, tuple[str, str]]  # experiment -> (cell_type, dataset)
    val_experiments: list[str]
    cell_types: list[str]
    hparams: dict[str, dict]  # model -> merged train keys
    finetune_hparams: dict[str, dict]
    wells: dict[str, tuple[int, int]] = field(default_factory=dict)  # experiment -> (all, treatment)
    sites_per_well: int = 2
    tta_views: int = layout.TTA_VIEWS  # views per site at prediction (config predict.tta: 8, else 1)
    gpus_train: int = 1  # GPUs per train / finetune job (config gpus.train; DDP inside the job)


def well_counts(source: str, root: str, synthetic: dict, experiments) -> tuple[dict, int]:
    """Wells per experiment (all, treatment) and sites per well, from the config or the metadata."""
    if source == "synthetic":
        per_plate = (int(synthetic["n_treatments"]) // 4, int(synthetic.get("n_positive_controls", 30)) + 1)
        wells = {e: (4 * (per_plate[0] + per_plate[1]), 4 * per_plate[0]) for e in experiments}
        return wells, int(synthetic.get("sites_per_well", 2))
    return _metadata_counts(source, str(root))


@lru_cache(maxsize=4)
def _metadata_counts(source: str, root: str) -> tuple[dict, int]:
    import pandas as pd

    files = (
        [Path(root) / "metadata.csv"]
        if source == "rxrx1"
        else [Path(root) / "train.csv", Path(root) / "test.csv"]
    )
    frames = []
    for path in files:
        cols = {"experiment", "plate", "well", "well_type", "site", "id_code", "sirna"}
        df = pd.read_csv(path, usecols=lambda c, cols=cols: c in cols, dtype=str, keep_default_na=False)
        frames.append(df)
    df = pd.concat(frames, ignore_index=True)
    key = ["experiment", "plate", "well"] if "well" in df.columns else ["id_code"]
    if "experiment" not in df.columns:
        df["experiment"] = df["id_code"].str.rsplit("_", n=2).str[0]
    sites = int(df.groupby(key).size().max()) if "site" in df.columns else 2
    wells = df.drop_duplicates(key)
    if "well_type" in wells.columns:
        treat = wells[wells["well_type"] == "treatment"].groupby("experiment").size()
    else:  # kaggle train.csv/test.csv list treatment wells only
        treat = wells.groupby("experiment").size()
    total = wells.groupby("experiment").size()
    return {e: (int(n), int(treat.get(e, 0))) for e, n in total.items()}, sites


# ---------------------------------------------------------------------------------- per job
@dataclass
class JobCost:
    rule: str
    wildcards: dict
    train_images: int = 0  # through a training step (labelled + unlabelled)
    forward_images: int = 0  # forward passes only (prediction views, validation)
    seconds: float = 0.0  # wall seconds of the job
    rate: Rate | None = None
    gpus: int = 1  # devices the job holds

    @property
    def device_seconds(self) -> float:
        return self.seconds * self.gpus

    @property
    def images(self) -> int:
        return self.train_images + self.forward_images


def _scope(screen: Screen, scope: str) -> list[str]:
    return [e for e, (ct, _) in screen.experiments.items() if scope == "all" or ct == scope]


def training_images(screen: Screen, hp: dict, scope: str, round_: int) -> tuple[int, int]:
    """(images through training steps, validation forward images) of one training job, as
    ``train.run_training`` counts them: epochs x (labelled wells // batch) steps x (batch + unlabelled)."""
    exps = _scope(screen, scope)
    val = set(screen.val_experiments)
    n_lab = sum(
        screen.wells[e][0 if hp.get("controls_as_classes", True) else 1]
        for e in exps
        if screen.experiments[e][1] == "train" and e not in val
    )
    n_unl = sum(
        screen.wells[e][0]
        for e in exps
        if screen.experiments[e][1] == "test" or (e in val and hp.get("unlabelled_include_validation", True))
    )
    n_val = sum(screen.wells[e][1] for e in exps if e in val)
    if n_lab < 2:
        return 0, 0
    b_lab = min(int(hp.get("batch_size", 64)), n_lab)
    steps = n_lab // b_lab
    if hp.get("unlabelled_batch_size") is not None:
        b_unl = int(hp["unlabelled_batch_size"])
    else:
        b_unl = int(round(float(hp.get("unlabelled_ratio", 1.0)) * b_lab))
    uses_unl = n_unl > 0 and b_unl > 0 and (hp.get("mean_teacher", True) or round_ > 0)
    epochs = int(hp.get("epochs", 160))
    per_step = b_lab + (b_unl if uses_unl else 0)
    # validation: each epoch, student and teacher, both sites of every validation well
    return epochs * steps * per_step, epochs * 2 * n_val * screen.sites_per_well


# Speed-up of a training job on g GPUs (DDP, one process per GPU, the batch per process unchanged):
# g x DDP_EFFICIENCY for g >= 2. Stated, not measured: no multi-GPU device was lent to this project
# (the lent machine has one H200); replace it by a measured value when one is.
DDP_EFFICIENCY = 0.9


def ddp_speedup(gpus: int) -> float:
    return 1.0 if gpus <= 1 else gpus * DDP_EFFICIENCY


def job_cost(screen: Screen, table: list[dict], device: str, rule: str, wildcards: dict) -> JobCost:
    model, round_ = wildcards["model"], int(wildcards["round"])
    scope = wildcards.get("cell_type", "all")
    hp = screen.finetune_hparams[model] if rule in ("finetune", "predict") else screen.hparams[model]
    job = JobCost(rule, dict(wildcards))
    if rule == "predict":
        exps = [
            e
            for e in _scope(screen, scope)
            if screen.experiments[e][1] == "test" or e in screen.val_experiments
        ]
        job.forward_images = sum(screen.wells[e][1] for e in exps) * screen.sites_per_well * screen.tta_views
        mean_teacher = False
    else:
        job.train_images, job.forward_images = training_images(screen, hp, scope, round_)
        mean_teacher = bool(hp.get("mean_teacher", True))
    size = int(hp.get("input_size", 512))
    backbone = str(hp.get("backbone", "legacy_xception"))
    step = lookup(table, device, backbone, size, mean_teacher)
    fwd = lookup(table, device, backbone, size, False)
    job.rate = step
    job.gpus = screen.gpus_train if rule in ("train", "finetune") else 1
    work = job.train_images / step.images_per_s + job.forward_images / (FORWARD_SPEEDUP * fwd.images_per_s)
    job.seconds = step.startup_s + work / ddp_speedup(job.gpus)
    return job


def runtime_minutes(seconds: float, margin: float, attempt: int, minimum: int = 10) -> int:
    """A Slurm time limit: the forecast x margin, at least ``minimum`` minutes, x attempt."""
    return max(int(math.ceil(seconds * margin / 60)), minimum) * int(attempt)


# ---------------------------------------------------------------------------------- the workflow
@dataclass(frozen=True)
class PlannedJob:
    rule: str
    wildcards: tuple[tuple[str, str], ...]
    reason: str
    output: tuple[str, ...]

    @property
    def wc(self) -> dict:
        return dict(self.wildcards)


_BLOCK = re.compile(r"^(?:local)?rule (\w+):\n((?:    .*\n?)*)", re.M)


def parse_dry_run(text: str) -> list[PlannedJob]:
    """The jobs of a ``snakemake -n`` output (rule blocks), target rule ``all`` left out."""
    jobs = []
    for rule, body in _BLOCK.findall(text):
        fields = dict(re.findall(r"^    (\w+): (.*)$", body, re.M))
        wildcards = tuple(
            tuple(kv.split("=", 1)) for kv in fields.get("wildcards", "").split(", ") if "=" in kv
        )
        output = tuple(o for o in fields.get("output", "").split(", ") if o)
        if rule != "all":
            jobs.append(PlannedJob(rule, wildcards, fields.get("reason", ""), output))
    return jobs


def default_snakefile() -> Path:
    return Path(__file__).resolve().parents[2] / "workflow" / "Snakefile"


def dry_run(
    configfile: str | None, snakefile: str | os.PathLike, directory: str, extra: list[str] = ()
) -> tuple[list[PlannedJob], dict, str]:
    """(planned jobs, the Snakefile's facts, the dry run's text) of one ``snakemake -n``."""
    with tempfile.TemporaryDirectory(prefix="deepnoise-plan-") as tmp:
        facts_path = Path(tmp) / "facts.json"
        env = {**os.environ, "DEEPNOISE_PLAN_FACTS": str(facts_path)}
        cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(snakefile), "--directory", directory]
        cmd += ["-n", "--cores", "1", *(["--configfile", configfile] if configfile else []), *extra]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        text = proc.stdout + proc.stderr
        if proc.returncode != 0:
            raise InputError(f"snakemake -n failed ({proc.returncode}):\n{text[-4000:]}")
        if not facts_path.exists():
            raise InputError("snakemake -n: the Snakefile wrote no plan facts (common.smk plan_facts)")
        facts = json.loads(facts_path.read_text())
    return parse_dry_run(text), facts, text


def screen_from_facts(facts: dict) -> Screen:
    screen = Screen(
        experiments={e: (ct, ds) for e, ct, ds in facts["experiments"]},
        val_experiments=list(facts["val_experiments"]),
        cell_types=list(facts["cell_types"]),
        hparams=facts["hparams"],
        finetune_hparams=facts["finetune_hparams"],
        tta_views=layout.TTA_VIEWS if facts["config"]["predict"]["tta"] else 1,
        gpus_train=int((facts["config"].get("gpus") or {}).get("train", 1)),
    )
    screen.wells, screen.sites_per_well = well_counts(
        facts["source"], facts["root"], facts["synthetic"], list(screen.experiments)
    )
    return screen


# ---------------------------------------------------------------------------------- the forecast
@dataclass
class RuleForecast:
    rule: str
    jobs: int = 0
    images: int = 0
    seconds: float = 0.0
    longest_s: float = 0.0
    wall_s: float = 0.0
    gpus: int = 1  # devices per job
    notes: set = field(default_factory=set)


def makespan(durations: list[float], n: int) -> float:
    """Longest-first list scheduling of independent jobs on n devices."""
    loads = [0.0] * max(n, 1)
    for d in sorted(durations, reverse=True):
        heapq.heapreplace(loads, loads[0] + d)
    return max(loads)


def forecast(jobs: list[PlannedJob], screen: Screen, table: list[dict], device: str, n_gpus: int):
    """Per rule: jobs, images, device-hours, the longest job and the wall time on n devices (the
    rounds and stages one after another, the jobs of one stage of a round side by side, a job on
    g devices taking g of them)."""
    out: dict[str, RuleForecast] = {}
    stage: dict[tuple[str, str], list[JobCost]] = defaultdict(list)
    costs = []
    for j in jobs:
        f = out.setdefault(j.rule, RuleForecast(j.rule))
        f.jobs += 1
        if j.rule in GPU_RULES:
            c = job_cost(screen, table, device, j.rule, j.wc)
            costs.append(c)
            f.images += c.images
            f.seconds += c.device_seconds
            f.longest_s = max(f.longest_s, c.seconds)
            f.gpus = c.gpus
            f.notes.add((c.rate.row, c.rate.extrapolated))
            stage[(j.rule, j.wc["round"])].append(c)
    for (rule, _), cs in stage.items():
        slots = max(1, n_gpus // max(c.gpus for c in cs))
        out[rule].wall_s += makespan([c.seconds for c in cs], slots)
    return out, costs


def critical_path_s(costs: list[JobCost]) -> float:
    """The run's critical path: per round its longest train, finetune and predict job one after
    another (a stage cannot start before the longest job of the one before ends); no number of
    devices makes the run shorter than this."""
    longest: dict[tuple[str, str], float] = defaultdict(float)
    for c in costs:
        key = (c.rule, c.wildcards["round"])
        longest[key] = max(longest[key], c.seconds)
    return sum(longest.values())


def _hours(s: float) -> str:
    h = s / 3600
    return f"{h:.3f}" if h < 0.1 else f"{h:.1f}"


def format_forecast(out: dict[str, RuleForecast], device: str, n_gpus: int, margin: float) -> str:
    unit = "CPU" if device == "cpu" else "GPU"
    lines = [
        f"Forecast on {device}, {n_gpus} device(s) ({sum(f.jobs for f in out.values())} jobs planned)",
        "",
        f"{'rule':<18} {'jobs':>5} {unit + 's/job':>8} {'images':>14} {unit + '-h':>9} {'wall h':>8}"
        f" {'longest job h':>14} {'limit (min)':>11}",
    ]
    for rule in sorted(
        out, key=lambda r: (r not in GPU_RULES, GPU_RULES.index(r) if r in GPU_RULES else 0, r)
    ):
        f = out[rule]
        if rule in GPU_RULES:
            lines.append(
                f"{rule:<18} {f.jobs:>5} {f.gpus:>8} {f.images:>14,} {_hours(f.seconds):>9}"
                f" {_hours(f.wall_s):>8} {_hours(f.longest_s):>14}"
                f" {runtime_minutes(f.longest_s, margin, 1):>11}"
            )
        else:
            lines.append(f"{rule:<18} {f.jobs:>5} {'(CPU)':>14}")
    gpu = [out[r] for r in GPU_RULES if r in out]
    total_s, wall = sum(f.seconds for f in gpu), sum(f.wall_s for f in gpu)
    lines += [
        "",
        f"train/finetune/predict: {_hours(total_s)} {unit}-hours,"
        f" {_hours(wall)} h wall on {n_gpus} device(s)",
    ]
    notes = sorted({n for f in gpu for n in f.notes})
    if notes:
        lines.append("Throughput rows used (throughput.csv):")
        for row, extra in notes:
            lines.append(f"  {row}" + (f"  [extrapolated: {extra}]" if extra else ""))
    lines.append(
        f"images: training-step images (labelled + unlabelled) x epochs, plus forward-only images"
        f" (validation, {layout.TTA_VIEWS} test-time views per site at prediction with predict.tta, else 1;"
        f" at {FORWARD_SPEEDUP:g}x the training rate); limit: the Slurm time limit of the longest job"
        f" (forecast x {margin:g}, attempt 1)"
    )
    return "\n".join(lines)


def shortening(
    out: dict[str, RuleForecast],
    costs: list[JobCost],
    jobs: list[PlannedJob],
    screen: Screen,
    table: list[dict],
    device: str,
    n_gpus: int,
) -> str:
    """The critical path of a forecast (``out``, ``costs`` of ``forecast(jobs, screen, ...)``), and
    what shortens the run: more GPUs per training job (``gpus.train`` doubled), with the wall time
    and critical path that forecast gives."""
    now = critical_path_s(costs)
    wall = sum(f.wall_s for f in out.values())
    g = screen.gpus_train
    more = dataclasses.replace(screen, gpus_train=2 * g)
    out2, costs2 = forecast(jobs, more, table, device, n_gpus)
    lines = [
        f"critical path: {_hours(now)} h (per round the longest train, finetune and predict job one"
        f" after another); the {_hours(wall)} h wall on {n_gpus} device(s) cannot go below it with"
        " more devices.",
        f"gpus.train: {g} -> {2 * g} GPUs per training job:"
        f" critical path {_hours(critical_path_s(costs2))} h,"
        f" wall {_hours(sum(f.wall_s for f in out2.values()))} h on {n_gpus} device(s)"
        f" (DDP speed-up {DDP_EFFICIENCY:g} x GPUs, stated, not measured).",
    ]
    return "\n".join(lines)


def _run(args: argparse.Namespace) -> int:
    table = read_table(args.table)
    extra = ["--forceall"] if args.all else []
    jobs, facts, _ = dry_run(args.configfile, args.snakefile, args.directory, extra)
    screen = screen_from_facts(facts)
    out, costs = forecast(jobs, screen, table, args.device, args.gpus)
    print(format_forecast(out, args.device, args.gpus, args.margin))
    if args.device != "cpu":
        print(shortening(out, costs, jobs, screen, table, args.device, args.gpus))
    if args.json:
        from deepnoise.atomic import write_text

        payload = {
            r: {
                "jobs": f.jobs,
                "images": f.images,
                "gpu_hours": f.seconds / 3600,
                "wall_hours": f.wall_s / 3600,
            }
            for r, f in out.items()
        }
        write_text(args.json, json.dumps(payload, indent=2) + "\n")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("plan", help="jobs and cost forecast of a config", description=__doc__)
    p.add_argument("--configfile", help="the workflow config (as for snakemake)")
    p.add_argument("--snakefile", default=str(default_snakefile()))
    p.add_argument("--directory", default=".", help="working directory of the run")
    p.add_argument("--device", default=DEFAULT_DEVICE, help="a device of the throughput table (or cpu)")
    p.add_argument("--gpus", type=int, default=8, help="devices running jobs side by side")
    p.add_argument("--margin", type=float, default=1.5, help="Slurm time limit = forecast x margin")
    p.add_argument("--all", action="store_true", help="every job, also those already done (--forceall)")
    p.add_argument("--table", default=str(THROUGHPUT), help="throughput table (CSV)")
    p.add_argument("--json", help="also write the per-rule figures as JSON")
    p.set_defaults(func=_run)
