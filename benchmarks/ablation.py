"""Ablation of the DeepNoise recipe on the synthetic screen: the paper's ladder, paired over seeds.

The design (arms, paper values, statistics, verdict rule) is fixed in docs/ablation.md; the arms and
the screen's size in config/ablation-calibrated.yaml (CPU, the default), config/ablation.yaml and
-large.yaml (the hard screen) or config/ablation-gpu.yaml (device).

1. Seed ``s`` (0..N-1) is one replicate: ``synthetic.seed`` = base + s (a different screen) and every
   training seed shifted by ``s * seed_stride``. Its data stage (synthesize -> sites -> stacks ->
   statistics) runs once in ``<out>/work/seed<s>/data``.
2. Each run of the config gets a copy of its seed's data stage (Snakemake metadata included, so
   nothing reruns), or, with ``from: <run>``, a copy of that finished run with its rounds >= 1
   removed (round 0 is trained once and shared); it then runs ``snakemake`` up to its metrics.
3. Rows read a stage of a round's ``metrics.json`` (a model, ``ensemble``, ``balanced``) or
   ``balance:<method>`` (the round's ensemble re-balanced post hoc with ``deepnoise balance``, scored
   with ``deepnoise.evaluate``), plus student/teacher accuracy at the selected epoch (``log.csv``) and
   the round's ``pseudo_labels`` entry when present.
4. Steps (row b vs its predecessor a): per-seed paired differences of the primary metric (test
   accuracy), mean, 95 % t-interval, Holm correction across steps, verdict holds / reversed /
   undecided. Outputs in ``<out>``: ``table.md`` (printed), ``table.tsv``, ``steps.tsv``,
   ``runs.tsv``, ``timings.tsv``, ``run.json``.

Every run config is checked (``deepnoise.configcheck``) before anything trains: an unknown key stops
the harness with the key and the run named. Finished runs are reused (only what is missing runs);
``--fresh`` starts over; ``--table-only`` rebuilds the tables from finished runs.

    python -m benchmarks.ablation [--config config/ablation-calibrated.yaml] [--seeds N]
        [--cores 2] [--parallel 2]
    python -m benchmarks.ablation --table-only
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import copy
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from scipy import stats

REPO = Path(__file__).resolve().parents[1]
SNAKEFILE = REPO / "workflow" / "Snakefile"
SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"
DEFAULT_CONFIG = REPO / "config" / "ablation-calibrated.yaml"  # make ablation
DEFAULT_OUT = REPO / "results" / "ablation"

# sections every run of a seed shares (the screen and the split): set by `screen`, never by a run
SHARED_SECTIONS = ("data", "synthetic", "split")
SPLITS = ("validation", "test")
PRIMARY = "test"
ALPHA = 0.05
# per-row, per-seed metrics (runs.tsv); accuracies in %
METRICS = (
    "test",
    "validation",
    "student",
    "teacher",
    "pseudo_validation",
    "pseudo_test",
    "pseudo_changed",
    "pseudo_selected_validation",
    "pseudo_selected_test",
)
# metrics added after ledgers were committed: a ledger without them reads them as NaN
OPTIONAL_METRICS = ("pseudo_selected_validation", "pseudo_selected_test")
# decimals of every metric in runs.tsv, and in the tables computed from this checkout's runs
RUNS_DECIMALS = 4
STEP_COLUMNS = (
    "lower", "higher", "metric", "n", "mean", "sd", "se", "t", "p", "ci_low", "ci_high",
    "p_holm", "level_holm", "ci_low_holm", "ci_high_holm", "verdict",
)  # fmt: skip


# ---------------------------------------------------------------- statistics (pure, unit-tested)
def paired_stats(diffs: Sequence[float], level: float = 0.95) -> dict:
    """Mean, sd, standard error, two-sided t-test of mean 0 and ``level`` t-interval of paired
    differences (NaNs dropped). With fewer than 2 values everything but ``n`` and ``mean`` is NaN;
    with zero spread the interval is the point and p is 0 (mean != 0) or 1 (mean == 0)."""
    # rounded: accuracies are multiples of 1/wells, and equal differences must have zero spread,
    # not a spread of float rounding errors (which gave t ~ 1e15)
    d = np.round(np.asarray([x for x in diffs if not (x is None or math.isnan(x))], dtype=float), 9)
    n = len(d)
    out = {"n": n, "mean": float(d.mean()) if n else math.nan}
    nan = dict.fromkeys(("sd", "se", "t", "p", "ci_low", "ci_high"), math.nan)
    if n < 2:
        return out | nan
    sd = float(d.std(ddof=1))
    se = sd / math.sqrt(n)
    mean = out["mean"]
    if se == 0.0:
        t = math.copysign(math.inf, mean) if mean else 0.0
        p = 0.0 if mean else 1.0
        half = 0.0
    else:
        t = mean / se
        p = float(2 * stats.t.sf(abs(t), n - 1))
        half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * se
    return out | {"sd": sd, "se": se, "t": t, "p": p, "ci_low": mean - half, "ci_high": mean + half}


def holm(pvalues: Sequence[float], alpha: float = ALPHA) -> tuple[np.ndarray, np.ndarray]:
    """Holm's step-down correction: ``(adjusted p, level)`` per input p-value (NaN stays NaN).

    Adjusted ``p_(i) = max_{j<=i} min(1, (m - j + 1) p_(j))`` over the ``m`` non-NaN values sorted
    ascending; ``level`` is the per-test level Holm compares the raw p with, ``alpha / (m - i + 1)``
    for rank ``i`` (1-based); ties keep input order.
    """
    p = np.asarray(pvalues, dtype=float)
    adj = np.full(p.shape, np.nan)
    lev = np.full(p.shape, np.nan)
    idx = np.flatnonzero(~np.isnan(p))
    m = len(idx)
    order = idx[np.argsort(p[idx], kind="stable")]
    running = 0.0
    for rank, i in enumerate(order):
        factor = m - rank
        running = max(running, min(1.0, factor * p[i]))
        adj[i] = running
        lev[i] = alpha / factor
    return adj, lev


# Fewest paired seeds for a verdict other than undecided (docs/ablation.md, "Statistics"): with 2
# seeds, two equal differences of a discrete score (whole wells) have zero spread and p = 0 with one
# degree of freedom, which is a tie, not evidence. It can only take a verdict away.
MIN_SEEDS_FOR_VERDICT = 3


def verdict(
    mean: float,
    p_holm: float,
    n: int,
    alpha: float = ALPHA,
    interval: tuple[float, float] | None = None,
    margin: float | None = None,
) -> str:
    """holds / reversed when the Holm-adjusted p is below ``alpha`` (sign of the mean); else small
    when a ``margin`` (points) is given and the Holm-adjusted ``interval`` lies inside
    ``[-margin, +margin]`` (the step is shown to be smaller than the margin either way); else
    undecided. missing with fewer than 2 paired seeds; undecided with fewer than
    ``MIN_SEEDS_FOR_VERDICT``."""
    if n < 2 or math.isnan(p_holm):
        return "missing"
    if n < MIN_SEEDS_FOR_VERDICT:
        return "undecided"
    if p_holm < alpha and mean > 0:
        return "holds"
    if p_holm < alpha and mean < 0:
        return "reversed"
    if margin is not None and interval is not None and -margin <= interval[0] and interval[1] <= margin:
        return "small"
    return "undecided"


def step_table(
    long: pd.DataFrame,
    steps: Sequence[Sequence[str]],
    metric: str = PRIMARY,
    alpha: float = ALPHA,
    margin: float | None = None,
) -> pd.DataFrame:
    """One line per step ``[a, b]``: paired differences b - a of ``metric`` over the seeds where both
    rows have a value, raw and Holm-adjusted (across all steps) p-values and intervals, verdict
    (``small`` only with an equivalence ``margin``, in points)."""
    wide = long.pivot_table(index="seed", columns="id", values=metric, aggfunc="first")
    lines = []
    for a, b in steps:
        if a in wide and b in wide:
            diffs = (wide[b] - wide[a]).dropna().tolist()
        else:
            diffs = []
        lines.append({"lower": a, "higher": b, "metric": metric} | paired_stats(diffs, 1 - alpha))
    table = pd.DataFrame(lines)
    adj, lev = holm(table["p"].to_numpy(float), alpha) if len(table) else ([], [])
    table["p_holm"], table["level_holm"] = adj, lev
    lo, hi = [], []
    for r in table.itertuples():
        if r.n < 2 or math.isnan(r.level_holm):
            lo.append(math.nan)
            hi.append(math.nan)
            continue
        half = 0.0 if r.se == 0 else float(stats.t.ppf(1 - r.level_holm / 2, r.n - 1)) * r.se
        lo.append(r.mean - half)
        hi.append(r.mean + half)
    table["ci_low_holm"], table["ci_high_holm"] = lo, hi
    table["verdict"] = [
        verdict(r.mean, r.p_holm, r.n, alpha, (r.ci_low_holm, r.ci_high_holm), margin)
        for r in table.itertuples()
    ]
    return table.reindex(columns=list(STEP_COLUMNS))


# ---------------------------------------------------------------- configs
def set_dotted(cfg: dict, dotted: str, value) -> None:
    """``cfg[a][b] = value`` for ``dotted == "a.b"``; missing parents are created (the workflow's
    config check then names an unknown section), a parent that is not a mapping is an error."""
    node = cfg
    *path, last = dotted.split(".")
    for key in path:
        if key not in node:
            node[key] = {}
        if not isinstance(node[key], dict):
            raise KeyError(f"override {dotted!r}: {key!r} is not a mapping of the base config")
        node = node[key]
    node[last] = copy.deepcopy(value)


# keys of a study that `extends:` merges key by key (dotted config keys); every other key replaces
MERGED_SECTIONS = ("screen", "overrides")


def read_study(path: str | os.PathLike, _chain: tuple[Path, ...] = ()) -> dict:
    """The ablation config at ``path``, with ``extends: <design>`` (relative to the repository)
    resolved: the extended design's keys, then this file's; ``screen`` and ``overrides`` merge key by
    key, any other key (runs, rows, steps, seeds...) replaces the extended one."""
    path = Path(path).resolve()
    if path in _chain:
        raise ValueError(f"{path}: `extends` cycle: {' -> '.join(str(p) for p in (*_chain, path))}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        where = f" (extended by {_chain[-1]})" if _chain else ""
        raise ValueError(f"{path}: cannot read the ablation design{where}: {exc.strerror}") from exc
    parent = raw.pop("extends", None)
    if parent is None:
        return raw
    study = read_study(REPO / parent, (*_chain, path))
    for key, value in raw.items():
        if key in MERGED_SECTIONS:
            study[key] = {**(study.get(key) or {}), **(value or {})}
        else:
            study[key] = value
    return study


def load_study(path: str | os.PathLike) -> dict:
    """The ablation config (``extends`` resolved), checked: rows name runs, steps name rows, runs
    keep the screen shared."""
    study = read_study(path)
    for key in ("base", "runs", "rows", "steps"):
        if key not in study:
            raise ValueError(f"{path}: missing key {key!r}")
    ids = set()
    for row in study["rows"]:
        for key in ("id", "label", "run", "stage"):
            if key not in row:
                raise ValueError(f"{path}: row {row} lacks {key!r}")
        if row["run"] not in study["runs"]:
            raise ValueError(f"{path}: row {row['id']!r} reads unknown run {row['run']!r}")
        if row["id"] in ids:
            raise ValueError(f"{path}: duplicate row id {row['id']!r}")
        ids.add(row["id"])
    for step in study["steps"]:
        if len(step) != 2:
            raise ValueError(f"{path}: step {step} is not a pair [predecessor, arm]")
        for i in step:
            if i not in ids:
                raise ValueError(f"{path}: step {step} names unknown row {i!r}")
    for name, over in study["runs"].items():
        over = over or {}
        for key in over:
            if key.split(".")[0] in SHARED_SECTIONS:
                raise ValueError(
                    f"{path}: run {name!r} overrides {key!r}: the runs of a seed share the screen "
                    f"({', '.join(SHARED_SECTIONS)}); set it under `screen`"
                )
        src = over.get("from")
        if src is not None and (src not in study["runs"] or (study["runs"][src] or {}).get("from")):
            raise ValueError(f"{path}: run {name!r}: `from: {src}` must name a run without `from`")
    for key in study.get("screen") or {}:
        if key.split(".")[0] not in SHARED_SECTIONS or key == "synthetic.seed":
            raise ValueError(
                f"{path}: screen key {key!r}: only {', '.join(SHARED_SECTIONS)} keys other than "
                "synthetic.seed (set per seed) belong there"
            )
    margin = study.get("equivalence_margin")
    if margin is not None and (
        isinstance(margin, bool) or not isinstance(margin, int | float) or margin <= 0
    ):
        raise ValueError(f"{path}: equivalence_margin must be a positive number of points, got {margin!r}")
    if int(study.get("seeds", 5)) < 2:
        raise ValueError(f"{path}: seeds must be >= 2 for paired intervals")
    return study


def run_config(base: dict, study: dict, run: str, seed: int) -> dict:
    """The workflow config of ``run`` for replicate ``seed`` (0-based): screen, shared overrides,
    the run's overrides; then the screen seed and every training seed shifted by the replicate."""
    cfg = copy.deepcopy(base)
    for section in (study.get("screen"), study.get("overrides"), study["runs"][run]):
        for key, value in (section or {}).items():
            if key != "from":
                set_dotted(cfg, key, value)
    set_dotted(cfg, "synthetic.seed", int(base["synthetic"].get("seed", 0)) + int(seed))
    shift = int(seed) * int(study.get("seed_stride", 100))
    if shift:
        cfg["train"]["seed"] = int(cfg["train"].get("seed", 0)) + shift
        for model in cfg["models"].values():
            if "seed" in model:
                model["seed"] = int(model["seed"]) + shift
    return cfg


def check_run_configs(base: dict, study: dict, runs: Sequence[str]) -> None:
    """``deepnoise.configcheck`` on every run's config (seed 0): the first problem stops the
    harness, naming the run and the workflow's message (which names the key)."""
    from deepnoise import configcheck

    schema = configcheck.load_schema(SCHEMA)
    for run in runs:
        try:
            configcheck.check_config(run_config(base, study, run, 0), schema)
        except Exception as exc:  # ConfigError / InputError: both name the key
            raise SystemExit(
                f"ablation run {run!r}: its config is not accepted by the workflow:\n{exc}"
            ) from exc


def rounds_needed(study: dict, run: str) -> int:
    return 1 + max((int(r.get("round", 0)) for r in study["rows"] if r["run"] == run), default=0)


def data_targets(cfg: dict) -> list[str]:
    """The data stage's outputs (site table, stacks, statistics) of a synthetic-screen config."""
    from deepnoise import layout, paths

    exps = layout.synthetic_experiments(cfg["synthetic"])
    return paths.data_outputs([e.experiment for e in exps], sorted({e.cell_type for e in exps}))


# ---------------------------------------------------------------- running the workflow
def snakemake(workdir: Path, targets: Sequence[str], cores: int, log: Path) -> float:
    """Run the workflow in ``workdir`` (its config.yaml) up to ``targets``; returns seconds."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    cmd = [
        sys.executable, "-m", "snakemake", "--snakefile", str(SNAKEFILE), "--directory", str(workdir),
        "--configfile", str(workdir / "config.yaml"), "--cores", str(cores), "--rerun-incomplete", *targets,
    ]  # fmt: skip
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"snakemake failed in {workdir} (log {log}):\n{tail}")
    return seconds


def write_config(workdir: Path, cfg: dict) -> None:
    path = workdir / "config.yaml"
    text = yaml.safe_dump(cfg, sort_keys=False)
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def copy_workdir(src: Path, dst: Path, drop_rounds_from: int | None = None) -> None:
    """Copy ``src`` to ``dst`` once (timestamps and .snakemake metadata kept, so nothing reruns);
    with ``drop_rounds_from=k`` the copy loses rounds >= k and all resume checkpoints (undeclared,
    only needed by an interrupted training; most of a finished run's size)."""
    if dst.exists():
        return
    tmp = dst.with_name(dst.name + ".copying")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src, tmp, symlinks=True, ignore=shutil.ignore_patterns("ablation.log", ".copying"))
    (tmp / "config.yaml").unlink(missing_ok=True)
    if drop_rounds_from is not None:
        shutil.rmtree(tmp / "results" / "checkpoints", ignore_errors=True)
        for parent in (tmp / "results", tmp / "logs"):
            for d in parent.glob("round*"):
                if d.name[5:].isdigit() and int(d.name[5:]) >= drop_rounds_from:
                    shutil.rmtree(d)
        shutil.rmtree(tmp / "results" / "ablation", ignore_errors=True)  # derived stages
    tmp.rename(dst)


def prepare_data(base: dict, study: dict, work: Path, seed: int, cores: int) -> dict:
    data = work / f"seed{seed}" / "data"
    data.mkdir(parents=True, exist_ok=True)
    cfg = run_config(base, study, next(iter(study["runs"])), seed)
    write_config(data, cfg)
    seconds = snakemake(data, data_targets(cfg), cores, work / f"seed{seed}" / "data.log")
    print(f"  data seed {seed}: {seconds:.0f} s", flush=True)
    return {"run": "data", "seed": seed, "seconds": round(seconds, 1)}


def run_one(base: dict, study: dict, work: Path, run: str, seed: int, cores: int) -> dict:
    """Copy the seed's data stage (or the ``from`` run) into the run's work dir, run snakemake."""
    wd = work / f"seed{seed}" / run
    src = (study["runs"][run] or {}).get("from")
    if src:
        copy_workdir(work / f"seed{seed}" / src, wd, drop_rounds_from=1)
    else:
        copy_workdir(work / f"seed{seed}" / "data", wd)
    cfg = run_config(base, study, run, seed)
    write_config(wd, cfg)
    from deepnoise import paths

    targets = [paths.METRICS.format(round=r) for r in range(int(cfg["rounds"]))]
    seconds = snakemake(wd, targets, cores, wd / "ablation.log")
    if not study.get("keep_checkpoints", False):
        # resume checkpoints of a finished run: ~0.6 of its size (76 MB per resnet10t training)
        shutil.rmtree(wd / "results" / "checkpoints", ignore_errors=True)
    print(f"  {run} seed {seed}: {seconds:.0f} s", flush=True)
    return {"run": run, "seed": seed, "seconds": round(seconds, 1), "workdir": str(wd)}


def schedule(tasks: dict, parallel: int) -> list[dict]:
    """Run ``tasks`` (key -> (callable, [dependency keys], priority)) with ``parallel`` workers,
    each as soon as its dependencies finished, highest priority first; returns their results.
    A failed task stops the scheduling of new ones and re-raises once the running ones end."""
    done: dict = {}
    running: dict = {}
    pending = dict(tasks)
    error = None
    with cf.ThreadPoolExecutor(max(1, parallel)) as pool:
        while pending or running:
            if error is None:
                ready = [k for k, (_, deps, _) in pending.items() if all(d in done for d in deps)]
                ready.sort(key=lambda k: -pending[k][2])
                for k in ready[: max(0, parallel - len(running))]:
                    fn = pending.pop(k)[0]
                    running[pool.submit(fn)] = k
            elif not running:
                break
            if not running:
                raise RuntimeError(f"tasks wait on unknown dependencies: {sorted(pending)}")
            finished, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
            for fut in finished:
                key = running.pop(fut)
                try:
                    done[key] = fut.result()
                except Exception as exc:  # noqa: BLE001 - re-raised below
                    error = error or exc
    if error is not None:
        raise error
    return [done[k] for k in tasks if k in done]


# ---------------------------------------------------------------- reading runs
def rebalanced_stage(workdir: Path, round_: int, method: str) -> dict:
    """A metrics stage of the round's ensemble re-balanced with ``method`` (``deepnoise balance``,
    the workflow's own command), scored with ``deepnoise.evaluate``.

    Cached as ``<workdir>/results/ablation/round{r}/balance_{method}.json`` (the balanced npz next to
    it), recomputed when an ensemble file is newer.
    """
    from deepnoise.evaluate import compute_metrics, read_truth
    from deepnoise.metadata import read_sites

    res = workdir / "results"
    ensembles = sorted((res / f"round{round_}" / "ensemble").glob("*.npz"))
    if not ensembles:
        raise FileNotFoundError(f"{res}/round{round_}/ensemble/: no ensemble npz to re-balance")
    out = res / "ablation" / f"round{round_}"
    cache = out / f"balance_{method}.json"
    newest = max(p.stat().st_mtime for p in ensembles)
    if cache.exists() and cache.stat().st_mtime >= newest:
        return json.loads(cache.read_text())
    files = []
    for path in ensembles:
        dst = out / method / path.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable, "-m", "deepnoise", "balance", "--predictions", str(path),
            "--sites", str(res / "sites.csv"), "--method", method, "--out", str(dst),
        ]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(REPO / "scripts")}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(
                f"balance:{method} of {path} failed (method {method!r} unknown to this workflow?):\n"
                f"{proc.stderr[-2000:]}"
            )
        files.append(str(dst))
    name = f"balance:{method}"
    metrics = compute_metrics(round_, [(name, "balanced", files)], read_sites(res / "sites.csv"),
                              read_truth(res / "test_truth.csv"))  # fmt: skip
    stage = metrics["stages"][0]
    cache.write_text(json.dumps(stage, indent=1) + "\n")
    return stage


def stage_accuracy(metrics: dict, stage: str, split: str) -> float:
    """Accuracy (%) of a stage and split of a metrics dict; NaN when the split is not scored."""
    for st in metrics.get("stages", []):
        if st["stage"] == stage:
            s = (st["splits"].get(split) or {}).get("overall")
            acc = None if s is None else s.get("accuracy")
            return math.nan if acc is None else 100.0 * float(acc)
    raise KeyError(
        f"round {metrics.get('round')}: no stage {stage!r} (has {[s['stage'] for s in metrics['stages']]})"
    )


def selected_epoch(log: pd.DataFrame) -> pd.Series:
    """The log row of the saved weights: the epoch with the best teacher validation accuracy (the
    first such epoch) when a teacher was validated, else the last epoch."""
    teacher = pd.to_numeric(log.get("val_acc_teacher"), errors="coerce")
    if teacher is not None and teacher.notna().any():
        return log.loc[teacher.idxmax()]
    return log.iloc[-1]


def student_teacher(workdir: Path, round_: int, models: Sequence[str]) -> tuple[float, float]:
    """Mean student and teacher validation accuracy (%) at the selected epoch over ``models`` and
    their fine-tuned scopes (``all`` when a model has no fine-tuned scope); NaN when absent."""
    students, teachers = [], []
    for m in models:
        root = workdir / "results" / f"round{round_}" / "models" / m
        logs = sorted(p for p in root.glob("*/log.csv") if p.parent.name != "all")
        logs = logs or sorted(root.glob("all/log.csv"))
        for path in logs:
            row = selected_epoch(pd.read_csv(path))
            students.append(float(row.get("val_acc_student", np.nan)))
            teachers.append(float(row.get("val_acc_teacher", np.nan)))

    def mean(xs: list[float]) -> float:
        xs = [x for x in xs if not math.isnan(x)]
        return 100.0 * float(np.mean(xs)) if xs else math.nan

    return mean(students), mean(teachers)


def pseudo_entry(metrics: dict) -> dict:
    """``pseudo_validation``, ``pseudo_test`` (accuracy %, of the round's pseudo labels against the
    held-out truth) and ``pseudo_changed`` (labels changed vs the previous round) from the metrics'
    ``pseudo_labels`` entry; NaN when the entry or a field is absent. A split may be a number or a
    mapping with ``accuracy``."""
    entry = metrics.get("pseudo_labels") or {}

    def acc(split: str) -> float:
        v = entry.get(split)
        if isinstance(v, dict):  # deepnoise metrics: {"all": {n, correct, accuracy}, "selected": ...}
            v = (v.get("all") or {}).get("accuracy") if "all" in v else v.get("accuracy")
        return math.nan if v is None else 100.0 * float(v)

    changed = entry.get("changed", entry.get("n_changed"))
    if isinstance(changed, dict):
        changed = changed.get("n", changed.get("count"))

    def selected(split: str) -> float:
        v = entry.get(split)
        v = (v.get("selected") or {}).get("accuracy") if isinstance(v, dict) else None
        return math.nan if v is None else 100.0 * float(v)

    return {
        "pseudo_validation": acc("validation"),
        "pseudo_test": acc("test"),
        "pseudo_changed": math.nan if changed is None else float(changed),
        "pseudo_selected_validation": selected("validation"),
        "pseudo_selected_test": selected("test"),
    }


def row_models(row: dict, cfg: dict) -> list[str]:
    """The models behind a row: its stage when that is a model, else all of the run's models."""
    return [row["stage"]] if row["stage"] in cfg["models"] else list(cfg["models"])


def read_row(workdir: Path, row: dict, cfg: dict, metrics: dict) -> dict:
    """All metrics of one row for one seed (accuracies in %)."""
    stage, round_ = row["stage"], int(row.get("round", 0))
    if stage.startswith("balance:"):
        st = rebalanced_stage(workdir, round_, stage.split(":", 1)[1])
        metrics = {**metrics, "stages": [*metrics.get("stages", []), st]}
    line = {split: stage_accuracy(metrics, stage, split) for split in SPLITS}
    line["student"], line["teacher"] = student_teacher(workdir, round_, row_models(row, cfg))
    return line | pseudo_entry(metrics)


def long_table(study: dict, read: Callable[[dict, int], dict | None], seeds: Sequence[int]) -> pd.DataFrame:
    """One line per row and seed with every metric, to ``RUNS_DECIMALS``; ``read(row, seed)`` returns
    None when the run or round has no metrics yet (that line is left out)."""
    lines = []
    for seed in seeds:
        for row in study["rows"]:
            got = read(row, seed)
            if got is not None:
                lines.append({"id": row["id"], "seed": seed} | got)
    # rounded to runs.tsv's precision, so a table rebuilt from a ledger equals the run's own table
    return pd.DataFrame(lines, columns=["id", "seed", *METRICS]).round(RUNS_DECIMALS)


def write_runs(long: pd.DataFrame, path: Path) -> None:
    """``runs.tsv``: the long table at the precision its statistics used (``RUNS_DECIMALS``)."""
    long.to_csv(path, sep="\t", index=False, float_format=f"%.{RUNS_DECIMALS}f")


# ---------------------------------------------------------------- runs of another checkout
# Study keys that say how the harness runs, not what a seed's runs compute: left out of the design's
# fingerprint, so a ledger from a run with other --cores, --parallel or --seeds still joins.
RUNTIME_KEYS = ("out", "cores", "parallel", "keep_checkpoints", "seeds")
# runs.tsv keeps 4 decimals: a rerun agrees with its ledger line when every metric is within this
LEDGER_TOLERANCE = 1e-3


def design_fingerprint(study: dict, base: dict) -> str:
    """sha256 of what a seed's runs compute: the study (``extends`` resolved) without its runtime
    keys, and the base workflow config. Equal fingerprints = the same screen, arms and rows."""
    import hashlib

    design = {k: v for k, v in study.items() if k not in RUNTIME_KEYS}
    text = json.dumps({"study": design, "base": base}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_ledger(path: str | os.PathLike, fingerprint: str) -> pd.DataFrame:
    """``runs.tsv`` of an earlier run of this design (another checkout, e.g. committed to docs/):
    its lines, after checking that the ``run.json`` beside it names the same design fingerprint."""
    path = Path(path)
    info_path = path.parent / "run.json"
    try:
        info = json.loads(info_path.read_text())
    except OSError as exc:
        raise ValueError(f"ledger {path}: no {info_path.name} beside it to say its design") from exc
    if info.get("design") != fingerprint:
        raise ValueError(
            f"ledger {path}: design {info.get('design')!r} (in {info_path}) is not this design "
            f"{fingerprint!r}: its runs computed another screen, arms or rows"
        )
    lines = pd.read_csv(path, sep="\t")
    for c in OPTIONAL_METRICS:
        if c not in lines.columns:
            lines[c] = math.nan
    missing = [c for c in ("id", "seed", *METRICS) if c not in lines.columns]
    if missing:
        raise ValueError(f"ledger {path}: missing columns {', '.join(missing)}")
    return lines[["id", "seed", *METRICS]]


def merge_ledger(
    long: pd.DataFrame, ledger: pd.DataFrame, study: dict, seeds: Sequence[int]
) -> tuple[pd.DataFrame, list[str]]:
    """``long`` (this checkout's runs) with the ledger's lines for the (row, seed) pairs it lacks,
    over ``seeds`` only, in seed then study-row order; plus one message for every pair both have
    whose metrics differ by more than ``LEDGER_TOLERANCE`` (a rerun that did not reproduce)."""
    ledger = ledger[ledger["seed"].isin(seeds)].drop_duplicates(["id", "seed"], keep="first")
    mine = long.set_index(["id", "seed"])
    theirs = ledger.set_index(["id", "seed"])
    mismatches = []
    for key in mine.index.intersection(theirs.index):
        a = mine.loc[key, list(METRICS)].astype(float).to_numpy()
        b = theirs.loc[key, list(METRICS)].astype(float).to_numpy()
        same = (np.isnan(a) & np.isnan(b)) | (np.abs(a - b) <= LEDGER_TOLERANCE)
        if not same.all():
            diff = ", ".join(
                f"{m} {x:g} vs {y:g}" for m, x, y, ok in zip(METRICS, a, b, same, strict=True) if not ok
            )
            mismatches.append(f"row {key[0]!r} seed {key[1]}: this run vs ledger: {diff}")
    extra = ledger[~theirs.index.isin(mine.index)]
    merged = pd.concat([long, extra], ignore_index=True) if len(extra) else long.copy()
    order = {row["id"]: i for i, row in enumerate(study["rows"])}
    merged = merged[merged["id"].isin(order)]
    merged = merged.assign(_o=merged["id"].map(order)).sort_values(["seed", "_o"], kind="stable")
    return merged.drop(columns="_o").reset_index(drop=True)[["id", "seed", *METRICS]], mismatches


# ---------------------------------------------------------------- the table
def summarise(study: dict, long: pd.DataFrame, steps: pd.DataFrame) -> pd.DataFrame:
    """One line per row (study order): paper value, seeds, mean and sd of every metric, and the
    step that leads to it (its predecessor, paired difference, Holm interval, verdict)."""
    by_higher = {r.higher: r for r in steps.itertuples()}
    out = []
    for row in study["rows"]:
        g = long[long["id"] == row["id"]]
        line = {k: row.get(k, "") for k in ("id", "label", "run", "stage")}
        line |= {"round": int(row.get("round", 0)), "paper": row.get("paper", "not reported")}
        line["seeds"] = len(g)
        for m in METRICS:
            vals = g[m].dropna()
            line[f"{m}_mean"] = vals.mean() if len(vals) else np.nan
            line[f"{m}_sd"] = vals.std(ddof=1) if len(vals) > 1 else np.nan
        s = by_higher.get(row["id"])
        line["vs"] = s.lower if s else ""
        for k in ("n", "mean", "ci_low", "ci_high", "p", "p_holm", "ci_low_holm", "ci_high_holm"):
            line[f"step_{k}"] = getattr(s, k) if s else np.nan
        line["verdict"] = s.verdict if s else ""
        out.append(line)
    return pd.DataFrame(out)


def _num(x: float, fmt: str = "{:.1f}") -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else fmt.format(x)


def _pm(mean: float, sd: float) -> str:
    if math.isnan(mean):
        return "–"
    return f"{mean:.1f}" if math.isnan(sd) else f"{mean:.1f} ± {sd:.1f}"


def markdown(
    table: pd.DataFrame, steps: pd.DataFrame, n_seeds: int, footer: str = "", margin: float | None = None
) -> str:
    """The table as GitHub markdown: the ladder with verdicts, then the diagnostics."""
    lines = [
        "| step | paper | test acc. % | Δ vs | Δ test pp [Holm 95 % CI] | p (Holm) | verdict |",
        "| --- | --- | ---: | --- | ---: | ---: | --- |",
    ]
    for r in table.itertuples():
        paper = r.paper if isinstance(r.paper, str) else f"{r.paper:g}"
        delta = (
            ""
            if not r.vs
            else f"{_num(r.step_mean, '{:+.1f}')} [{_num(r.step_ci_low_holm, '{:+.1f}')}, "
            f"{_num(r.step_ci_high_holm, '{:+.1f}')}]"
        )
        p = "" if not r.vs else _num(r.step_p_holm, "{:.3g}")
        lines.append(
            f"| {r.label} | {paper} | {_pm(r.test_mean, r.test_sd)} | {r.vs} | {delta} | {p} | {r.verdict} |"
        )
    lines += [
        "",
        f"Primary metric: test accuracy (%) of the fine-tuned per-cell-type predictions, mean ± sd over "
        f"{n_seeds} seeds (each seed a different synthetic screen). Δ: per-seed paired difference to "
        "the row named in `Δ vs`, mean and Holm-adjusted 95 % t-interval (Holm across all "
        f"{len(steps)} steps; `p (Holm)` = Holm-adjusted p-value). Verdict `holds` when the adjusted "
        "p < 0.05 with a gain (the adjusted interval excludes 0 on the positive side), `reversed` "
        "with a loss, "
        + (
            f"`small` when the adjusted interval lies inside ±{margin:g} points, "
            if margin is not None
            else ""
        )
        + "else `undecided`. Paper: accuracy on RxRx1 or, for balancing, its gain.",
        "",
        "| step | validation acc. % | student % | teacher % | pseudo-label acc. val / test % "
        "| selected labels' precision val / test % | labels changed |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in table.itertuples():
        pseudo = f"{_num(r.pseudo_validation_mean)} / {_num(r.pseudo_test_mean)}"
        chosen = f"{_num(r.pseudo_selected_validation_mean)} / {_num(r.pseudo_selected_test_mean)}"
        lines.append(
            f"| {r.label} | {_pm(r.validation_mean, r.validation_sd)} | {_num(r.student_mean)} | "
            f"{_num(r.teacher_mean)} | {pseudo} | {chosen} | {_num(r.pseudo_changed_mean, '{:.0f}')} |"
        )
    lines += [
        "",
        "Student / teacher: validation accuracy at the selected epoch (best teacher epoch; the last "
        "epoch without a teacher) from `log.csv`, mean over the row's models and fine-tuned scopes "
        "and over seeds. Pseudo labels: the round's `pseudo_labels` entry of `metrics.json` (the "
        "labels this round hands to the next: all wells, and the wells selected by margin).",
    ]
    if footer:
        lines += ["", footer]
    return "\n".join(lines) + "\n"


def footer_text(info: dict, cmd: str) -> str:
    """The command and wall time of the last run that trained (``info`` = ``run.json``), else just ``cmd``."""
    if "wall_minutes" not in info:
        text = f"Command: `{cmd}`."
    else:
        text = (
            f"Command: `{info['command']}`; wall time {info['wall_minutes']:.1f} min with --cores "
            f"{info['cores']} --parallel {info.get('parallel', '?')} ({info['cpus']} CPUs, "
            f"{info['machine']}), {info['runs']} runs, finished {info['finished']}"
            + (f" at commit {info['commit']}." if info.get("commit") else ".")
        )
    if info.get("ledger"):
        text += f" Seeds not run here come from {', '.join(f'`{p}`' for p in info['ledger'])}"
        text += f" (design {info['design']})."
    if info.get("ledger_mismatches"):
        text += " Reruns that differ from the ledger: " + "; ".join(info["ledger_mismatches"]) + "."
    partial = sorted(set(info.get("seeds_with_results", [])) - set(info.get("seeds_complete", [])))
    if partial:
        text += f" Seeds {partial} are partial: `table.tsv` column `seeds` counts each row's."
    return text


def cpu_kernels() -> str:
    """The CPU kernels the runs' torch dispatches to (ATen's capability, oneDNN's ISA cap): a CPU
    result is the same bit for bit only with the same ones (docs/figures.md)."""
    import torch

    cap = torch.backends.cpu.get_cpu_capability()
    return f"{cap}, ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA', 'unset')}"


def git_commit() -> str | None:
    """The checkout's commit (short), ``+dirty`` with uncommitted changes to tracked files."""
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


# ---------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--config", default=str(DEFAULT_CONFIG), help="ablation config (screen, runs, rows, steps)"
    )
    ap.add_argument(
        "--out", default=None, help="output folder (default: results/ablation, or the config's `out`)"
    )
    ap.add_argument("--seeds", type=int, default=None, help="replicates (default: the config's `seeds`)")
    ap.add_argument(
        "--run-seeds", type=int, nargs="+", default=None,
        help="train only these of the seeds (default: all); the table covers every seed with results",
    )  # fmt: skip
    ap.add_argument("--cores", type=int, default=None, help="snakemake --cores of each run (default: config)")
    ap.add_argument("--parallel", type=int, default=None, help="runs side by side (default: config)")
    ap.add_argument("--runs", nargs="*", help="only these runs (default: all)")
    ap.add_argument("--table-only", action="store_true", help="only rebuild the tables from finished runs")
    ap.add_argument("--fresh", action="store_true", help="delete <out>/work first")
    ap.add_argument(
        "--ledger", nargs="+", default=[], metavar="RUNS_TSV",
        help="runs.tsv of earlier runs of this design (another checkout; a run.json with the same "
        "design fingerprint beside it): their seeds join the table where this checkout has none",
    )  # fmt: skip
    args = ap.parse_args(argv)

    study = load_study(args.config)
    base = yaml.safe_load((REPO / study["base"]).read_text())
    out = Path(args.out or REPO / study.get("out", DEFAULT_OUT)).resolve()
    work = out / "work"
    n_seeds = int(args.seeds or study.get("seeds", 5))
    if n_seeds < 2:
        ap.error("--seeds must be >= 2 (paired intervals)")
    seeds = list(range(n_seeds))
    run_seeds = seeds if args.run_seeds is None else sorted(set(args.run_seeds))
    if not set(run_seeds) <= set(seeds):
        ap.error(f"--run-seeds {run_seeds}: seeds are 0..{n_seeds - 1} (--seeds {n_seeds})")
    cores = int(args.cores or study.get("cores", 2))
    parallel = int(args.parallel or study.get("parallel", 2))
    runs = list(args.runs or study["runs"])
    for r in runs:
        if r not in study["runs"]:
            ap.error(f"unknown run {r!r} (runs: {', '.join(study['runs'])})")
        if int(run_config(base, study, r, 0)["rounds"]) < rounds_needed(study, r):
            ap.error(f"run {r!r}: its rows read round {rounds_needed(study, r) - 1}, set its rounds")
    check_run_configs(base, study, runs)
    fingerprint = design_fingerprint(study, base)
    try:
        ledger = [read_ledger(p, fingerprint) for p in args.ledger]
    except ValueError as exc:
        ap.error(str(exc))

    t0 = time.perf_counter()
    timings = []
    if not args.table_only:
        if args.fresh:
            shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True, exist_ok=True)
        tasks = {}

        def cost(r: str) -> int:
            cfg = run_config(base, study, r, 0)
            return int(cfg["rounds"]) * len(cfg["models"]) * (2 if cfg["train"].get("mean_teacher") else 1)

        for s in run_seeds:
            tasks[("data", s)] = (
                lambda s=s: prepare_data(base, study, work, s, cores),
                [],
                1000 * (n_seeds - s) + 500,
            )
            for r in runs:
                src = (study["runs"][r] or {}).get("from")
                deps = [("data", s)] + ([(src, s)] if src else [])
                if src and src not in runs:
                    ap.error(f"run {r!r} starts from run {src!r}: include it in --runs")
                fn = lambda r=r, s=s: run_one(base, study, work, r, s, cores)  # noqa: E731
                # seed by seed (a run cut short leaves whole seeds, every step paired on them); in a
                # seed, runs that others start from first, then the costly ones
                feeds = any((study["runs"][x] or {}).get("from") == r for x in runs)
                tasks[(r, s)] = (fn, deps, 1000 * (n_seeds - s) + cost(r) + (100 if feeds else 0))
        print(f"{len(tasks)} tasks, seeds {run_seeds}, {parallel} at a time, --cores {cores}", flush=True)
        timings = schedule(tasks, parallel)
    wall = time.perf_counter() - t0

    cfg_cache: dict = {}

    def read(row: dict, seed: int) -> dict | None:
        wd = work / f"seed{seed}" / row["run"]
        path = wd / "results" / f"round{int(row.get('round', 0))}" / "metrics.json"
        if not path.exists():
            return None
        key = (row["run"], seed)
        if key not in cfg_cache:
            cfg_cache[key] = run_config(base, study, row["run"], seed)
        return read_row(wd, row, cfg_cache[key], json.loads(path.read_text()))

    long = long_table(study, read, seeds)
    mismatches: list[str] = []
    if ledger:
        long, mismatches = merge_ledger(long, pd.concat(ledger, ignore_index=True), study, seeds)
        for m in mismatches:
            print(f"WARNING: a rerun differs from its ledger: {m}", file=sys.stderr)
    with_results = sorted(int(x) for x in long["seed"].unique())
    per_seed = long.groupby("seed")["id"].nunique()
    complete = [s for s in with_results if per_seed[s] == len(study["rows"])]
    margin = study.get("equivalence_margin")
    steps = step_table(long, study["steps"], PRIMARY, margin=margin)
    steps_val = step_table(long, study["steps"], "validation", margin=margin)
    table = summarise(study, long, steps)
    out.mkdir(parents=True, exist_ok=True)
    write_runs(long, out / "runs.tsv")
    table.to_csv(out / "table.tsv", sep="\t", index=False, float_format="%.4f")
    pd.concat([steps, steps_val]).to_csv(out / "steps.tsv", sep="\t", index=False, float_format="%.6g")
    cmd = ("python -m benchmarks.ablation " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    info = json.loads((out / "run.json").read_text()) if (out / "run.json").exists() else {}
    if timings:
        pd.DataFrame(timings).to_csv(out / "timings.tsv", sep="\t", index=False)
        info = {
            "command": cmd, "wall_minutes": round(wall / 60, 1), "cores": cores, "parallel": parallel,
            "cpus": os.cpu_count(), "machine": platform.machine(), "runs": len(timings),
            "finished": time.strftime("%Y-%m-%d %H:%M"), "commit": git_commit(),
            "cpu_kernels": cpu_kernels(),
        }  # fmt: skip
    info |= {
        "design": fingerprint, "seeds_with_results": with_results, "seeds_complete": complete,
        "ledger": [str(p) for p in args.ledger], "ledger_mismatches": mismatches,
    }  # fmt: skip
    (out / "run.json").write_text(json.dumps(info, indent=1) + "\n")
    md = markdown(table, steps, len(complete), footer_text(info, cmd), margin)
    (out / "table.md").write_text(md)
    print()
    print(md)
    print(f"wrote {out}/table.md, table.tsv, steps.tsv (test and validation), runs.tsv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
