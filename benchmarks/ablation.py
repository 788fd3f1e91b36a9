"""Ablation study of the DeepNoise recipe on the synthetic screen (the paper's Fig. 3, CPU-sized).

Runs the workflow once per run of ``config/ablation.yaml`` (and per seed), all on the same synthetic
screen with the same epochs, then builds one table and one bar chart of validation and test
accuracy per step: normalisation per cell type / experiment / plate (/ negative controls), softmax
vs ArcFace, + mean teacher, + second model, + balancing (paper, groups), + pseudo-label rounds.

1. The data stage (synthesize -> sites -> stacks -> statistics) runs once in ``<out>/work/data``.
2. Each run gets a copy of it (Snakemake's metadata included, so nothing reruns) in
   ``<out>/work/seed<s>/<run>`` with its config, and runs ``snakemake`` up to its metrics files.
3. Rows that need no training are derived from a run's outputs: each model, the ensemble and the
   balanced ensemble are stages of a round's metrics JSON; ``balance:<method>`` rows re-balance the
   round's ensemble npz (``deepnoise.balance``) and score it (``deepnoise.evaluate``).
4. ``<out>/table.tsv``, ``table.md`` (also printed), ``runs.tsv`` (one line per row and seed),
   ``ordering.tsv`` (the paper's expected order, checked), ``timings.tsv``, ``run.json`` (command,
   wall time) and ``ablation.png`` (mean over seeds, error bars = standard deviation).

Finished runs are reused: rerunning the command only runs what is missing (``--fresh`` starts over).

    python benchmarks/ablation.py [--seeds 1] [--cores 2] [--parallel 2] [--runs full arcface]

Jobs use one thread each (config/ablation.yaml), so a run keeps up to ``--cores`` jobs busy; with
``--parallel 2`` a one-model run trains beside the two-model run, which keeps both cores of a
2-core machine busy most of the time.
    python benchmarks/ablation.py --table-only     # rebuild the table from the finished runs
"""

from __future__ import annotations

import argparse
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

REPO = Path(__file__).resolve().parents[1]
SNAKEFILE = REPO / "workflow" / "Snakefile"
DEFAULT_CONFIG = REPO / "config" / "ablation.yaml"
DEFAULT_OUT = REPO / "results" / "ablation"
SHARED_SECTIONS = ("data", "synthetic", "split")
SPLITS = ("validation", "test")
# the accuracies of a row: each split, and both pooled (twice the wells: the ordering verdicts use it)
SCORES = (*SPLITS, "pooled")
TABLE_COLUMNS = (
    "id", "group", "label", "run", "stage", "round", "seeds",
    "validation_mean", "validation_sd", "test_mean", "test_sd", "pooled_mean", "pooled_sd",
    "n_validation", "n_test", "n_pooled", "paper",
)  # fmt: skip


# ---------------------------------------------------------------- configs
def set_dotted(cfg: dict, dotted: str, value) -> None:
    """``cfg[a][b] = value`` for ``dotted == "a.b"``; the value replaces what was there."""
    node = cfg
    *path, last = dotted.split(".")
    for key in path:
        if not isinstance(node.get(key), dict):
            raise KeyError(f"override {dotted!r}: {key!r} is not a mapping of the base config")
        node = node[key]
    node[last] = copy.deepcopy(value)


def load_study(path: str | os.PathLike) -> dict:
    """The ablation config, checked: runs exist for every row, rows exist for every expectation."""
    study = yaml.safe_load(Path(path).read_text())
    for key in ("base", "runs", "rows"):
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
    for a, b in study.get("expect", []):
        for i in (a, b):
            if i not in ids:
                raise ValueError(f"{path}: expect names unknown row {i!r}")
    for name, over in study["runs"].items():
        for key in over or {}:
            if key.split(".")[0] in SHARED_SECTIONS:
                raise ValueError(
                    f"{path}: run {name!r} overrides {key!r}: every run must share the screen "
                    f"({', '.join(SHARED_SECTIONS)})"
                )
    return study


def run_config(base: dict, study: dict, run: str, seed: int) -> dict:
    """The workflow config of ``run`` for repeat ``seed`` (0-based)."""
    cfg = copy.deepcopy(base)
    for key, value in (study.get("overrides") or {}).items():
        set_dotted(cfg, key, value)
    for key, value in (study["runs"][run] or {}).items():
        set_dotted(cfg, key, value)
    shift = int(seed) * int(study.get("seed_stride", 100))
    if shift:
        cfg["train"]["seed"] = int(cfg["train"].get("seed", 0)) + shift
        for model in cfg["models"].values():
            if "seed" in model:
                model["seed"] = int(model["seed"]) + shift
    return cfg


def rounds_needed(study: dict, run: str) -> int:
    return 1 + max(int(r.get("round", 0)) for r in study["rows"] if r["run"] == run)


def data_targets(cfg: dict) -> list[str]:
    """The data stage's outputs (site table, stacks, statistics) of a synthetic-screen config."""
    sys.path.insert(0, str(REPO / "scripts"))
    from deepnoise import layout

    exps = layout.synthetic_experiments(cfg["synthetic"])
    cell_types = sorted({e.cell_type for e in exps})
    return (
        ["results/sites.csv", "results/test_truth.csv", "results/classes.json"]
        + [f"results/stacks/{e.experiment}/Plate{p}.h5" for e in exps for p in layout.PLATES]
        + [f"results/stats/plate/{e.experiment}/Plate{p}.json" for e in exps for p in layout.PLATES]
        + [f"results/stats/experiment/{e.experiment}.json" for e in exps]
        + [f"results/stats/cell_type/{ct}.json" for ct in cell_types]
    )


# ---------------------------------------------------------------- running the workflow
def snakemake(workdir: Path, targets: Sequence[str], cores: int, log: Path) -> float:
    """Run the workflow in ``workdir`` (its config.yaml) up to ``targets``; returns seconds."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    cmd = [
        sys.executable, "-m", "snakemake", "--snakefile", str(SNAKEFILE), "--directory", str(workdir),
        "--configfile", str(workdir / "config.yaml"), "--cores", str(cores), *targets,
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


def prepare_data(base_cfg: dict, study: dict, work: Path, cores: int) -> float:
    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    cfg = run_config(base_cfg, study, next(iter(study["runs"])), 0)
    write_config(data, cfg)
    return snakemake(data, data_targets(cfg), cores, work / "data.log")


def run_one(base_cfg: dict, study: dict, work: Path, run: str, seed: int, cores: int) -> dict:
    """Copy the data stage into the run's work dir (once), write its config, run snakemake."""
    wd = work / f"seed{seed}" / run
    if not wd.exists():
        tmp = wd.with_name(wd.name + ".copying")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(work / "data", tmp, symlinks=True)  # timestamps and .snakemake metadata kept
        (tmp / "config.yaml").unlink()
        tmp.rename(wd)
    cfg = run_config(base_cfg, study, run, seed)
    write_config(wd, cfg)
    targets = [f"results/round{r}/metrics.json" for r in range(int(cfg["rounds"]))]
    seconds = snakemake(wd, targets, cores, wd / "ablation.log")
    print(f"  {run} seed {seed}: {seconds:.0f} s", flush=True)
    return {"run": run, "seed": seed, "seconds": round(seconds, 1), "workdir": str(wd)}


# ---------------------------------------------------------------- derived stages
def rebalanced_stage(workdir: Path, round_: int, method: str) -> dict:
    """A metrics stage (metrics JSON format) of the round's ensemble re-balanced with ``method``.

    Cached as ``<workdir>/results/ablation/round{r}/balance_{method}.json`` (the balanced npz next
    to it), recomputed when an ensemble file is newer.
    """
    sys.path.insert(0, str(REPO / "scripts"))
    from deepnoise.balance import balance_predictions, infer_plate_groups
    from deepnoise.ensemble import load_predictions, save_predictions
    from deepnoise.evaluate import compute_metrics, read_sites, read_truth

    res = workdir / "results"
    ensembles = sorted((res / f"round{round_}" / "ensemble").glob("*.npz"))
    if not ensembles:
        raise FileNotFoundError(f"{res}/round{round_}/ensemble/: no ensemble npz to re-balance")
    out = res / "ablation" / f"round{round_}"
    cache = out / f"balance_{method}.json"
    newest = max(p.stat().st_mtime for p in ensembles)
    if cache.exists() and cache.stat().st_mtime >= newest:
        return json.loads(cache.read_text())
    sites = read_sites(res / "sites.csv")
    groups = infer_plate_groups(sites) if method != "none" else None
    files = []
    for path in ensembles:
        balanced, _ = balance_predictions(load_predictions(path), groups, method)
        dst = out / method / path.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        save_predictions(balanced, dst)
        files.append(str(dst))
    name = f"balance:{method}"
    metrics = compute_metrics(round_, [(name, "balanced", files)], sites, read_truth(res / "test_truth.csv"))
    stage = metrics["stages"][0]
    cache.write_text(json.dumps(stage, indent=1) + "\n")
    return stage


def load_run_metrics(workdir: Path, study: dict, run: str) -> dict[int, dict]:
    """``{round: metrics}`` of a finished run, with the ``balance:<method>`` stages its rows need."""
    out = {}
    rows = [r for r in study["rows"] if r["run"] == run]
    for round_ in sorted({int(r.get("round", 0)) for r in rows}):
        path = workdir / "results" / f"round{round_}" / "metrics.json"
        if not path.exists():
            continue
        m = json.loads(path.read_text())
        for stage in sorted({r["stage"] for r in rows if int(r.get("round", 0)) == round_}):
            if stage.startswith("balance:"):
                m["stages"].append(rebalanced_stage(workdir, round_, stage.split(":", 1)[1]))
        out[round_] = m
    return out


# ---------------------------------------------------------------- the table (pure, unit-tested)
def stage_accuracy(metrics: dict, stage: str, split: str) -> dict | None:
    """``{"n", "correct", "accuracy"}`` of a stage and split of a metrics dict (None if absent)."""
    for st in metrics.get("stages", []):
        if st["stage"] == stage:
            s = st["splits"].get(split)
            return s["overall"] if s else None
    raise KeyError(
        f"round {metrics.get('round')}: no stage {stage!r} (has {[s['stage'] for s in metrics['stages']]})"
    )


def long_table(
    study: dict, metrics_of: Callable[[str, int], dict[int, dict]], seeds: Sequence[int]
) -> pd.DataFrame:
    """One line per row and seed: accuracy (%) and wells per split and pooled over both splits.

    Runs or rounds without metrics are skipped; a split that is not scored is NaN with 0 wells.
    """
    lines = []
    cache: dict[tuple[str, int], dict[int, dict]] = {}
    for seed in seeds:
        for row in study["rows"]:
            key = (row["run"], seed)
            if key not in cache:
                cache[key] = metrics_of(row["run"], seed)
            m = cache[key].get(int(row.get("round", 0)))
            if m is None:
                continue
            line = {"id": row["id"], "seed": seed}
            correct = n = 0
            for split in SPLITS:
                acc = stage_accuracy(m, row["stage"], split)
                ok = acc is not None and acc["accuracy"] is not None
                line[split] = 100.0 * acc["accuracy"] if ok else np.nan
                line[f"n_{split}"] = acc["n"] if ok else 0
                if ok:
                    correct, n = correct + acc["correct"], n + acc["n"]
            line["pooled"] = 100.0 * correct / n if n else np.nan
            line["n_pooled"] = n
            lines.append(line)
    return pd.DataFrame(lines, columns=["id", "seed", *SCORES, *(f"n_{s}" for s in SCORES)])


def summarise(study: dict, long: pd.DataFrame) -> pd.DataFrame:
    """Mean and standard deviation (ddof=1; NaN for one seed) over seeds, rows in study order."""
    out = []
    for row in study["rows"]:
        g = long[long["id"] == row["id"]]
        line = {k: row.get(k) for k in ("id", "group", "label", "run", "stage")}
        line |= {"round": int(row.get("round", 0)), "seeds": len(g), "paper": row.get("paper", np.nan)}
        for split in SCORES:
            vals = g[split].dropna()
            line[f"{split}_mean"] = vals.mean() if len(vals) else np.nan
            line[f"{split}_sd"] = vals.std(ddof=1) if len(vals) > 1 else np.nan
            line[f"n_{split}"] = int(g[f"n_{split}"].iloc[0]) if len(g) else 0
        out.append(line)
    return pd.DataFrame(out, columns=list(TABLE_COLUMNS))


def binomial_se(acc_pct: float, n_wells: int) -> float:
    """Standard error (percentage points) of an accuracy measured on ``n_wells`` wells."""
    if not n_wells or math.isnan(acc_pct):
        return math.nan
    p = acc_pct / 100.0
    return 100.0 * math.sqrt(max(p * (1 - p), 0.25 / n_wells) / n_wells)


def check_ordering(study: dict, table: pd.DataFrame, split: str = "pooled") -> pd.DataFrame:
    """The paper's expected ``a < b`` pairs on ``split``: difference and a noise scale.

    ``noise`` is the larger of the seed spread of the difference and the binomial standard error of
    the difference (wells pooled over seeds); ``verdict`` is ``holds`` (b > a by more than noise),
    ``within noise`` (|b - a| <= noise), ``reversed`` (b < a by more than noise) or ``missing``.
    """
    by_id = table.set_index("id")
    out = []
    for a, b in study.get("expect", []):
        ra, rb = by_id.loc[a], by_id.loc[b]
        ma, mb = ra[f"{split}_mean"], rb[f"{split}_mean"]
        line = {"lower": a, "higher": b, "split": split, "a": ma, "b": mb}
        if math.isnan(ma) or math.isnan(mb):
            out.append(line | {"diff": np.nan, "noise": np.nan, "verdict": "missing"})
            continue
        n_a = ra[f"n_{split}"] * max(ra["seeds"], 1)
        n_b = rb[f"n_{split}"] * max(rb["seeds"], 1)
        se = math.hypot(binomial_se(ma, n_a), binomial_se(mb, n_b))
        sd = math.hypot(*(0.0 if math.isnan(s) else s for s in (ra[f"{split}_sd"], rb[f"{split}_sd"])))
        seeds = min(ra["seeds"], rb["seeds"])
        noise = max(se, sd / math.sqrt(seeds) if seeds > 1 else 0.0)
        diff = mb - ma
        verdict = "holds" if diff > noise else "reversed" if diff < -noise else "within noise"
        out.append(line | {"diff": diff, "noise": noise, "verdict": verdict})
    return pd.DataFrame(out, columns=["lower", "higher", "split", "a", "b", "diff", "noise", "verdict"])


def _fmt(mean: float, sd: float) -> str:
    if math.isnan(mean):
        return "–"
    return f"{mean:.1f}" if math.isnan(sd) else f"{mean:.1f} ± {sd:.1f}"


def markdown(table: pd.DataFrame, checks: pd.DataFrame | None = None, footer: str = "") -> str:
    """The table as GitHub markdown (accuracy %, mean ± sd over seeds), then the ordering checks."""
    seeds = sorted({int(n) for n in table["seeds"] if n > 0})
    lines = [
        "| step | run | stage | round | validation acc. % | test acc. % | both % | paper % |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in table.itertuples():
        paper = (
            "" if r.paper is None or (isinstance(r.paper, float) and math.isnan(r.paper)) else f"{r.paper:g}"
        )
        lines.append(
            f"| {r.label} | {r.run} | {r.stage} | {r.round} | {_fmt(r.validation_mean, r.validation_sd)}"
            f" | {_fmt(r.test_mean, r.test_sd)} | {_fmt(r.pooled_mean, r.pooled_sd)} | {paper} |"
        )
    n_val = int(table["n_validation"].max()) if len(table) else 0
    n_test = int(table["n_test"].max()) if len(table) else 0
    lines.append("")
    lines.append(
        f"Seeds per row: {'/'.join(map(str, seeds)) or 'none'} (± = standard deviation over seeds); "
        f"{n_val} validation and {n_test} test wells per seed."
    )
    if checks is not None and len(checks):
        lines += [
            "",
            "| paper's ordering | validation Δ pp | test Δ pp | both Δ pp (noise) | verdict (both) |",
            "| --- | ---: | ---: | ---: | --- |",
        ]
        for (lower, higher), g in checks.groupby(["lower", "higher"], sort=False):
            by = g.set_index("split")
            cells = []
            for split in SCORES:
                d = by["diff"].get(split, np.nan)
                cells.append("–" if math.isnan(d) else f"{d:+.1f}")
            pooled = by.loc["pooled"] if "pooled" in by.index else None
            if pooled is not None and not math.isnan(pooled["diff"]):
                cells[-1] += f" ({pooled['noise']:.1f})"
            cells.append(pooled["verdict"] if pooled is not None else "missing")
            lines.append(f"| {lower} < {higher} | " + " | ".join(cells) + " |")
        lines += [
            "",
            "Verdicts on both splits pooled: `holds` when the gain exceeds the noise (binomial standard error"
            " of the difference, or the seed spread when larger), `within noise` otherwise, `reversed` when"
            " the loss exceeds it.",
        ]
    if footer:
        lines += ["", footer]
    return "\n".join(lines) + "\n"


def plot(table: pd.DataFrame, path: Path) -> None:
    """Horizontal bars per row: validation and test accuracy, error bars = sd over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(table)
    fig, ax = plt.subplots(figsize=(8, 0.45 * n + 1.5))
    y = np.arange(n)[::-1]
    h = 0.38
    for k, (split, colour) in enumerate((("validation", "#4c72b0"), ("test", "#dd8452"))):
        mean = table[f"{split}_mean"].to_numpy(float)
        sd = np.nan_to_num(table[f"{split}_sd"].to_numpy(float))
        ax.barh(y + (0.5 - k) * h, mean, h, xerr=sd, color=colour, label=split, capsize=2)
        for yi, m in zip(y + (0.5 - k) * h, mean, strict=True):
            if not math.isnan(m):
                ax.text(m + 0.5, yi, f"{m:.1f}", va="center", fontsize=7)
    paper = pd.to_numeric(table["paper"], errors="coerce").to_numpy(float)
    has = ~np.isnan(paper)
    if has.any():
        ax.scatter(paper[has], y[has], marker="|", s=200, color="k", label="paper", zorder=3)
    ax.set_yticks(y, table["label"])
    ax.set_xlim(0, 105)
    ax.set_xlabel("accuracy (%)")
    seeds = int(table["seeds"].max()) if n else 0
    ax.set_title(f"Ablation on the synthetic screen (mean ± sd over {seeds} seed{'s' * (seeds != 1)})")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def footer_text(run_json: Path, cmd: str) -> str:
    """The command and wall time of the last run that trained (``run.json``), else just ``cmd``."""
    if not run_json.exists():
        return f"Command: `{cmd}`"
    info = json.loads(run_json.read_text())
    return (
        f"Command: `{info['command']}`; wall time {info['wall_minutes']:.1f} min with --cores {info['cores']}"
        f" ({info['cpus']} CPUs, {info['machine']}), {info['runs']} runs, finished {info['finished']}."
    )


# ---------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(DEFAULT_CONFIG), help="ablation config (runs, rows)")
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="output folder (work dirs under <out>/work)")
    ap.add_argument("--seeds", type=int, default=1, help="repeats of every run with shifted training seeds")
    ap.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="snakemake --cores of each run")
    ap.add_argument(
        "--parallel",
        type=int,
        default=2,
        help="runs side by side (the longest first; one-model runs fill the cores the two-model run leaves)",
    )
    ap.add_argument("--runs", nargs="*", help="only these runs (default: all)")
    ap.add_argument("--table-only", action="store_true", help="only rebuild the table from finished runs")
    ap.add_argument("--fresh", action="store_true", help="delete <out>/work first")
    args = ap.parse_args(argv)

    study = load_study(args.config)
    base_cfg = yaml.safe_load((REPO / study["base"]).read_text())
    out = Path(args.out).resolve()
    work = out / "work"
    seeds = list(range(args.seeds))
    runs = list(args.runs or study["runs"])
    for r in runs:
        if r not in study["runs"]:
            ap.error(f"unknown run {r!r} (runs: {', '.join(study['runs'])})")
    for r in runs:
        if int(run_config(base_cfg, study, r, 0)["rounds"]) < rounds_needed(study, r):
            ap.error(f"run {r!r}: its rows read round {rounds_needed(study, r) - 1}, set its rounds")

    t0 = time.perf_counter()
    timings = []
    if not args.table_only:
        if args.fresh:
            shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True, exist_ok=True)
        print(f"data stage -> {work / 'data'}", flush=True)
        timings.append(
            {"run": "data", "seed": "", "seconds": round(prepare_data(base_cfg, study, work, args.cores), 1)}
        )
        # longest first: runs with more rounds and models
        jobs = sorted(
            ((r, s) for s in seeds for r in runs),
            key=lambda rs: (
                -int(run_config(base_cfg, study, rs[0], 0)["rounds"])
                * len(run_config(base_cfg, study, rs[0], 0)["models"])
            ),
        )
        parallel = max(1, min(args.parallel, len(jobs)))
        print(f"{len(jobs)} runs, {parallel} at a time, --cores {args.cores} each", flush=True)
        with ThreadPoolExecutor(parallel) as pool:
            futures = [pool.submit(run_one, base_cfg, study, work, r, s, args.cores) for r, s in jobs]
            timings += [f.result() for f in futures]
    wall = time.perf_counter() - t0

    def metrics_of(run: str, seed: int) -> dict[int, dict]:
        wd = work / f"seed{seed}" / run
        return load_run_metrics(wd, study, run) if wd.exists() else {}

    long = long_table(study, metrics_of, seeds)
    table = summarise(study, long)
    checks = pd.concat([check_ordering(study, table, s) for s in SCORES], ignore_index=True)
    out.mkdir(parents=True, exist_ok=True)
    long.to_csv(out / "runs.tsv", sep="\t", index=False, float_format="%.4f")
    table.to_csv(out / "table.tsv", sep="\t", index=False, float_format="%.4f")
    checks.to_csv(out / "ordering.tsv", sep="\t", index=False, float_format="%.4f")
    cmd = ("python benchmarks/ablation.py " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    if timings:
        pd.DataFrame(timings).to_csv(out / "timings.tsv", sep="\t", index=False)
        run_info = {
            "command": cmd,
            "wall_minutes": round(wall / 60, 1),
            "cores": args.cores,
            "cpus": os.cpu_count(),
            "machine": platform.machine(),
            "runs": len(timings) - 1,
            "finished": time.strftime("%Y-%m-%d %H:%M"),
        }
        (out / "run.json").write_text(json.dumps(run_info, indent=1) + "\n")
    footer = footer_text(out / "run.json", cmd)
    md = markdown(table, checks, footer)
    (out / "table.md").write_text(md)
    plot(table, out / "ablation.png")
    print()
    print(md)
    print(f"wrote {out}/table.tsv, table.md, runs.tsv, ordering.tsv, ablation.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
