"""Figures for the Snakemake report (matplotlib, Agg backend). No torch here.

- ``plot-training``: per-epoch curves of training log CSVs: every column whose name contains
  ``loss`` (left panel) and every column whose name contains ``acc`` (right panel).
- ``plot-summary``: from ``summary.tsv`` (``--kind accuracy``: accuracy per stage and round;
  ``--kind balancing``: ensemble vs balanced ensemble per round and cell type) or from a metrics
  JSON (``--kind plates``: per-plate accuracy heat map of one stage).
- ``plot-composites``: RGB composites of a few sites of an HDF5 plate stack, with the rxrx1-utils
  channel colours.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from deepnoise.atomic import atomic_path
from deepnoise.errors import InputError

log = logging.getLogger(__name__)

# rxrx1-utils (rxrx/io.py) RGB_MAP: colour and intensity range of channels 1..6.
CHANNEL_RGB = np.array(
    [[19, 0, 249], [42, 255, 31], [255, 0, 25], [45, 255, 252], [250, 0, 253], [254, 255, 40]],
    dtype=np.float64,
)
CHANNEL_RANGE = np.array([[0, 51], [0, 107], [0, 64], [0, 191], [0, 89], [0, 191]], dtype=np.float64)
SUMMARY_KINDS = ("accuracy", "balancing", "plates")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: str | os.PathLike) -> None:
    plt = _pyplot()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format=Path(out).suffix.lstrip(".") or "png")
    plt.close(fig)


def _read_table(path: str | os.PathLike, **kwargs) -> pd.DataFrame:
    try:
        return pd.read_csv(path, **kwargs)
    except (OSError, pd.errors.ParserError) as exc:
        raise InputError(f"{path}: cannot read table ({exc})") from exc
    except pd.errors.EmptyDataError:
        return pd.DataFrame()


def _log_label(path: str | os.PathLike) -> str:
    """``results/round0/models/resnet/all/log.csv`` -> ``round0/resnet/all``."""
    parts = Path(path).parts[:-1]
    keep = [p for p in parts[-4:] if p not in ("models", "results")]
    return "/".join(keep) or Path(path).stem


def plot_training(logs: Sequence[str], out: str | os.PathLike, labels: Sequence[str] | None = None) -> None:
    plt = _pyplot()
    labels = list(labels) if labels else [_log_label(p) for p in logs]
    if len(labels) != len(logs):
        raise InputError(f"{len(labels)} labels for {len(logs)} logs")
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(12, 4.5))
    for path, label in zip(logs, labels, strict=True):
        df = _read_table(path)
        if df.empty:
            log.warning("%s: empty training log", path)
            continue
        x = df["epoch"] if "epoch" in df.columns else np.arange(1, len(df) + 1)
        for col in df.columns:
            name = str(col).lower()
            y = pd.to_numeric(df[col], errors="coerce")
            if y.isna().all():
                continue
            if "loss" in name:
                ax_loss.plot(x, y, marker=".", label=f"{label} {col}")
            elif "acc" in name:
                ax_acc.plot(x, y, marker=".", label=f"{label} {col}")
    for ax, title in ((ax_loss, "losses"), (ax_acc, "validation accuracy")):
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    _save(fig, out)


def _bars(ax, table: pd.DataFrame, title: str) -> None:
    """Grouped bars: rows of ``table`` on the x axis, one bar per column."""
    n = max(len(table.columns), 1)
    width = 0.8 / n
    x = np.arange(len(table.index))
    for i, col in enumerate(table.columns):
        vals = table[col].to_numpy(dtype=float)
        bars = ax.bar(x + (i - (n - 1) / 2) * width, np.nan_to_num(vals), width, label=str(col))
        for b, v in zip(bars, vals, strict=True):
            if np.isfinite(v):
                ax.annotate(
                    f"{v:.2f}", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=6
                )
    ax.set_xticks(x, [str(i) for i in table.index], rotation=30, ha="right")
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7)


def _read_summary(path: str | os.PathLike) -> pd.DataFrame:
    df = _read_table(path, sep="\t")
    need = {"round", "stage", "split", "cell_type", "accuracy"}
    if not df.empty and not need <= set(df.columns):
        raise InputError(f"{path}: summary lacks columns {sorted(need - set(df.columns))}")
    return df


def plot_summary(summary: str | os.PathLike, out: str | os.PathLike, kind: str = "accuracy") -> None:
    """``accuracy``: per split, bars of every stage (x) and round; ``balancing``: ensemble vs
    balanced per (round, cell type) and split."""
    plt = _pyplot()
    df = _read_summary(summary)
    splits = list(dict.fromkeys(df["split"])) if not df.empty else []
    fig, axes = plt.subplots(1, max(len(splits), 1), figsize=(6 * max(len(splits), 1), 4.5), squeeze=False)
    if not splits:
        axes[0, 0].text(0.5, 0.5, "no scored predictions", ha="center", va="center")
    for ax, split in zip(axes[0], splits, strict=False):
        d = df[df["split"] == split]
        if kind == "accuracy":
            d = d[d["cell_type"] == "all"]
            table = d.pivot_table(index="stage", columns="round", values="accuracy", sort=False)
            table.columns = [f"round {c}" for c in table.columns]
            _bars(ax, table, f"{split}: accuracy per stage")
        else:
            d = d[d["stage"].isin(["ensemble", "balanced"])]
            d = d.assign(group="r" + d["round"].astype(str) + " " + d["cell_type"])
            table = d.pivot_table(index="group", columns="stage", values="accuracy", sort=False)
            _bars(
                ax,
                table.reindex(columns=[c for c in ("ensemble", "balanced") if c in table]),
                f"{split}: balancing",
            )
    _save(fig, out)


def plot_plates(metrics_path: str | os.PathLike, out: str | os.PathLike, stage: str | None = None) -> None:
    """Heat map experiment x plate of one stage's accuracy (default: balanced, else the last stage)."""
    from deepnoise.evaluate import load_metrics

    plt = _pyplot()
    m = load_metrics(metrics_path)
    stages = {s["stage"]: s for s in m["stages"]}
    if not stages:
        raise InputError(f"{metrics_path}: no stages")
    if stage is None:
        stage = "balanced" if "balanced" in stages else list(stages)[-1]
    if stage not in stages:
        raise InputError(f"{metrics_path}: no stage {stage!r} (has {sorted(stages)})")
    splits = stages[stage]["splits"]
    fig, axes = plt.subplots(
        1, max(len(splits), 1), figsize=(5 * max(len(splits), 1), 1.5 + 0.35 * 8), squeeze=False
    )
    if not splits:
        axes[0, 0].text(0.5, 0.5, "no scored predictions", ha="center", va="center")
    for ax, (split, s) in zip(axes[0], splits.items(), strict=False):
        t = pd.DataFrame(s["plates"]).pivot_table(index="experiment", columns="plate", values="accuracy")
        im = ax.imshow(t.to_numpy(float), vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(t.columns)), [f"P{c}" for c in t.columns])
        ax.set_yticks(range(len(t.index)), list(t.index))
        for (i, j), v in np.ndenumerate(t.to_numpy(float)):
            if np.isfinite(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w" if v < 0.6 else "k")
        ax.set_title(f"round {m['round']} {stage}: {split}")
        fig.colorbar(im, ax=ax, fraction=0.05)
    _save(fig, out)


def to_rgb(image: np.ndarray, scale: str = "rxrx1") -> np.ndarray:
    """A ``(6, H, W)`` uint8 site -> ``(H, W, 3)`` uint8 RGB composite.

    ``rxrx1``: rxrx1-utils' ``convert_tensor_to_rgb`` (channel ``c`` intensity ``t / (hi - lo) +
    lo / 255`` clipped to 1, times its colour, summed, clipped to 255); ``percentile``: each channel
    is first stretched between its 0.5 and 99.8 percentiles (for dim synthetic images).
    """
    if image.ndim != 3 or image.shape[0] != len(CHANNEL_RGB):
        raise InputError(f"expected a (6, H, W) image, got shape {image.shape}")
    t = image.astype(np.float64)
    if scale == "percentile":
        lo = np.percentile(t, 0.5, axis=(1, 2), keepdims=True)
        hi = np.percentile(t, 99.8, axis=(1, 2), keepdims=True)
        x = (t - lo) / np.maximum(hi - lo, 1e-6)
    else:
        lo, hi = CHANNEL_RANGE[:, 0, None, None], CHANNEL_RANGE[:, 1, None, None]
        x = t / (hi - lo) + lo / 255.0
    x = np.clip(x, 0.0, 1.0)
    rgb = np.einsum("chw,ck->hwk", x, CHANNEL_RGB)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def plot_composites(
    stack: str | os.PathLike, out: str | os.PathLike, n: int = 4, scale: str = "rxrx1"
) -> None:
    """``n`` sites spread evenly over the stack, as RGB composites titled with well, site and siRNA."""
    import h5py

    plt = _pyplot()
    try:
        with h5py.File(stack, "r") as h5:
            if "images" not in h5:
                raise InputError(f"{stack}: no dataset 'images'")
            total = h5["images"].shape[0]
            if total == 0:
                raise InputError(f"{stack}: the stack has no sites")
            idx = np.unique(np.linspace(0, total - 1, min(n, total)).round().astype(int))
            images = h5["images"][idx]
            meta = {k: h5[k][idx] for k in ("well_id", "site", "well_type", "sirna_id") if k in h5}
            title = f"{h5.attrs.get('experiment', '')} plate {h5.attrs.get('plate', '')}".strip()
    except OSError as exc:
        raise InputError(f"{stack}: cannot read HDF5 stack ({exc})") from exc
    cols = min(len(idx), 4)
    rows = int(np.ceil(len(idx) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for k, ax in enumerate(axes.ravel()[: len(idx)]):
        ax.imshow(to_rgb(images[k], scale))
        parts = []
        for key, fmt in (("well_id", "{}"), ("site", "s{}"), ("sirna_id", "siRNA {}")):
            if key in meta:
                v = meta[key][k]
                parts.append(fmt.format(v.decode() if isinstance(v, bytes) else v))
        ax.set_title(" ".join(parts), fontsize=8)
    fig.suptitle(title or str(stack), fontsize=10)
    _save(fig, out)


def _run_training(args: argparse.Namespace) -> int:
    plot_training(args.logs, args.out, labels=args.labels)
    return 0


def _run_summary(args: argparse.Namespace) -> int:
    if args.kind == "plates":
        if not args.metrics:
            raise InputError("plot-summary --kind plates needs --metrics")
        plot_plates(args.metrics, args.out, stage=args.stage)
    else:
        if not args.summary:
            raise InputError(f"plot-summary --kind {args.kind} needs --summary")
        plot_summary(args.summary, args.out, kind=args.kind)
    return 0


def _run_composites(args: argparse.Namespace) -> int:
    plot_composites(args.stack, args.out, n=args.n, scale=args.scale)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("plot-training", help="training curves from log CSVs")
    p.add_argument("--logs", nargs="+", required=True, help="training log.csv files")
    p.add_argument("--labels", nargs="*", help="legend label per log (default: from the path)")
    p.add_argument("--out", required=True, help="PNG")
    p.set_defaults(func=_run_training)

    p = subparsers.add_parser("plot-summary", help="accuracy / balancing / per-plate figures")
    p.add_argument("--kind", choices=SUMMARY_KINDS, default="accuracy")
    p.add_argument("--summary", help="summary.tsv (kinds accuracy, balancing)")
    p.add_argument("--metrics", help="metrics JSON of one round (kind plates)")
    p.add_argument("--stage", help="kind plates: stage to show (default balanced)")
    p.add_argument("--out", required=True, help="PNG")
    p.set_defaults(func=_run_summary)

    p = subparsers.add_parser("plot-composites", help="RGB composites of sites of a plate stack")
    p.add_argument("--stack", required=True, help="HDF5 plate stack")
    p.add_argument("--n", type=int, default=4, help="number of sites")
    p.add_argument("--scale", choices=("rxrx1", "percentile"), default="rxrx1")
    p.add_argument("--out", required=True, help="PNG")
    p.set_defaults(func=_run_composites)
