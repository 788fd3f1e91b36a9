"""Sizing pilot of an ablation design: the learning curve of one arm on a screen no replicate uses.

An ablation can only decide a step whose effect shows once its models have learnt; a design whose
base arm stays near chance decides nothing (docs/ablation.md). This pilot trains one arm of a
design (default ``softmax_plate``, one model, round 0, no fine-tuning or prediction) for ``--epochs``
epochs on the pilot replicate ``--seed`` (a synthetic screen of its own, outside the design's
``seeds``, so no replicate of the analysis is looked at) and reports validation accuracy and
seconds per epoch. The step schedule keeps the paper's proportions (lr drops at 100/160 and 140/160
of the epochs) unless ``--milestones`` is given.

``--set KEY=VALUE`` changes the arm's config further (a candidate design's size: experiments,
treatments, image size); the pilot's folder name carries it.

Outputs in ``<--out>/seed<seed>-<run>-<epochs>ep[-<set>]/`` (``--out`` default ``results/pilot``), beside the
pilot's workflow directory: ``curve.tsv`` (epoch, lr, loss, validation
accuracy in %, seconds), ``pilot.json`` (the design, the arm, epochs to reach each accuracy level,
wall and CPU seconds of the train job) and the printed table. Finished work is reused.

    python -m benchmarks.learning_curve [--config config/ablation.yaml] [--run softmax_plate]
        [--seed 99] [--epochs 40] [--cores 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import yaml

from benchmarks.ablation import (
    REPO,
    SCHEMA,
    load_study,
    run_config,
    set_dotted,
    snakemake,
    write_config,
)

DEFAULT_OUT = REPO / "results" / "pilot"
# accuracy levels (multiples of chance) whose first epoch the pilot reports
LEVELS = (2, 5, 10, 20)


def paper_milestones(epochs: int) -> list[int]:
    """The paper's lr drops (epoch 100 and 140 of 160) scaled to ``epochs``, each >= 1, increasing."""
    first = max(1, round(epochs * 100 / 160))
    second = max(first + 1, min(epochs - 1, round(epochs * 140 / 160)))
    return [m for m in (first, second) if m < epochs]


def pilot_config(
    base: dict, study: dict, run: str, seed: int, epochs: int, milestones: Sequence[int]
) -> dict:
    """The arm's workflow config on replicate ``seed`` with the pilot's epochs: one round, no
    fine-tuning epochs matter (only the train job runs)."""
    cfg = run_config(base, study, run, seed)
    set_dotted(cfg, "train.epochs", int(epochs))
    set_dotted(cfg, "train.lr_milestones", [int(m) for m in milestones])
    set_dotted(cfg, "rounds", 1)
    return cfg


def set_label(item: str) -> str:
    """The folder-name part of a ``--set KEY=VALUE``: the key's last component and the value
    (``synthetic.nuisance_scale=0.25`` -> ``nuisance_scale=0.25``)."""
    key, _, value = item.partition("=")
    return f"{key.rpartition('.')[2]}={value}"


def epochs_to_reach(
    curve: pd.DataFrame, chance: float, levels: Sequence[int] = LEVELS
) -> dict[str, int | None]:
    """First epoch (1-based) whose validation accuracy reaches ``level * chance``, per level."""
    out = {}
    for level in levels:
        hit = curve.index[curve["val_acc"] >= level * chance - 1e-5]  # log.csv keeps 8 decimals
        out[f"{level}x_chance"] = int(curve.loc[hit[0], "epoch"]) if len(hit) else None
    return out


def read_curve(log: Path) -> pd.DataFrame:
    """``log.csv`` of the train job as the pilot's curve (1-based epochs, accuracy in %)."""
    df = pd.read_csv(log)
    return pd.DataFrame(
        {
            "epoch": df["epoch"].astype(int) + 1,
            "lr": df["lr"],
            "loss": df["loss"],
            "val_acc": 100 * df["val_acc_student"],
            "seconds": df["seconds"],
        }
    )


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--config", default=str(REPO / "config" / "ablation-calibrated.yaml"), help="ablation design"
    )
    ap.add_argument("--run", default="softmax_plate", help="the arm whose curve is measured (one model)")
    ap.add_argument("--seed", type=int, default=99, help="pilot replicate (outside the design's seeds)")
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--milestones", type=int, nargs="*", help="lr drops (default: the paper's proportions)")
    ap.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="dotted config keys (YAML values) set after the design: a candidate design's size, "
        "e.g. synthetic.train_experiments_per_cell_type=9",
    )
    ap.add_argument("--cores", type=int, default=1, help="snakemake --cores")
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    args = ap.parse_args(argv)

    study = load_study(args.config)
    if args.run not in study["runs"]:
        ap.error(f"unknown run {args.run!r} (runs: {', '.join(study['runs'])})")
    if args.seed < int(study.get("seeds", 5)):
        ap.error(
            f"--seed {args.seed} is a replicate of the design (seeds 0..{int(study.get('seeds', 5)) - 1})"
        )
    base = yaml.safe_load((REPO / study["base"]).read_text())
    milestones = paper_milestones(args.epochs) if args.milestones is None else args.milestones
    cfg = pilot_config(base, study, args.run, args.seed, args.epochs, milestones)
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            ap.error(f"--set {item!r}: expected KEY=VALUE")
        set_dotted(cfg, key, yaml.safe_load(value))
    if len(cfg["models"]) != 1:
        ap.error(f"run {args.run!r} has {len(cfg['models'])} models; the pilot measures one")
    from deepnoise import configcheck, paths

    try:
        configcheck.check_config(cfg, configcheck.load_schema(SCHEMA))
    except Exception as exc:  # ConfigError / InputError: both name the key
        raise SystemExit(f"pilot of run {args.run!r}: config not accepted by the workflow:\n{exc}") from exc

    out = Path(args.out).resolve()
    sets = "".join(f"-{set_label(item)}" for item in args.set)  # e.g. -image_size=64
    wd = out / f"seed{args.seed}-{args.run}-{args.epochs}ep{sets}"
    wd.mkdir(parents=True, exist_ok=True)
    write_config(wd, cfg)
    (model,) = cfg["models"]
    log = paths.TRAINING_LOG.format(round=0, model=model, scope="all")
    snakemake(wd, [log], args.cores, wd / "pilot.log")
    job = pd.read_csv(wd / paths.TRAIN_BENCHMARK.format(round=0, model=model), sep="\t").iloc[-1]

    curve = read_curve(wd / log)
    from deepnoise.data import read_classes

    n_classes = int(read_classes(wd / paths.CLASSES)["n_treatments"])  # validation scores treatments
    chance = 100 / n_classes
    info = {
        "command": "python -m benchmarks.learning_curve " + " ".join(sys.argv[1:] if argv is None else argv),
        "design": str(Path(args.config).resolve().relative_to(REPO)),
        "run": args.run,
        "seed": args.seed,
        "epochs": args.epochs,
        "milestones": list(milestones),
        "set": list(args.set),
        "classes": n_classes,
        "chance_pct": round(chance, 3),
        "best_val_acc_pct": round(float(curve["val_acc"].max()), 2),
        "best_epoch": int(curve.loc[curve["val_acc"].idxmax(), "epoch"]),
        "epochs_to_reach": epochs_to_reach(curve, chance),
        "median_seconds_per_epoch": round(float(curve["seconds"].median()), 2),
        "train_job_seconds": round(float(job["s"]), 1),  # the Snakemake benchmark of the train job
        "train_job_cpu_seconds": round(float(job["cpu_time"]), 1),
        "machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} CPUs",
    }
    curve.to_csv(wd / "curve.tsv", sep="\t", index=False, float_format="%.4g")
    (wd / "pilot.json").write_text(json.dumps(info, indent=2) + "\n")
    print(curve.to_string(index=False, float_format=lambda x: f"{x:.3g}"))
    print(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
