"""Figures for the Snakemake report (matplotlib, Agg backend). No torch here.

- ``plot-training``: per-epoch curves of training log CSVs: every column whose name contains
  ``loss`` (left panel) and every column whose name contains ``acc`` (right panel).
- ``plot-summary``: from ``summary.tsv`` (``--kind accuracy``: accuracy per stage and round;
  ``--kind balancing``: ensemble vs balanced ensemble per round and cell type) or from a metrics
  JSON (``--kind plates``: per-plate accuracy heat map of one stage).
- ``plot-composites``: RGB composites of a few sites of HDF5 plate stacks (a row each), with the rxrx1-utils
  channel colours.
"""

from __future__ import annotations

import argparse
import html
import json
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


def _log_parts(path: str | os.PathLike) -> tuple[str, str]:
    """``results/round0/models/resnet/all/log.csv`` -> ``("resnet", "all")``."""
    parts = Path(path).parts
    if len(parts) >= 3:
        return parts[-3], parts[-2]
    return Path(path).stem, ""


def _log_label(path: str | os.PathLike) -> str:
    """``results/round0/models/resnet/all/log.csv`` -> ``resnet / all``."""
    model, scope = _log_parts(path)
    return f"{model} / {scope}" if scope else model


ACC_SERIES = (("val_acc_student", "student", "-"), ("val_acc_teacher", "teacher", "--"))


def plot_training(logs: Sequence[str], out: str | os.PathLike, labels: Sequence[str] | None = None) -> None:
    """Small multiples: one panel per log (model x scope; rows: models, columns: scopes), with the
    student's and the teacher's validation accuracy (left axis, 0-1) and the training loss (right
    axis). A series that is all NaN (no teacher without mean teacher, no validation split) is left
    out and the panel says so."""
    plt = _pyplot()
    keys = _panel_keys(logs, labels)
    models = list(dict.fromkeys(k[0] for k in keys))
    scopes = list(dict.fromkeys(k[1] for k in keys))
    nrows, ncols = max(len(models), 1), max(len(scopes), 1)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(3.2 * ncols + 0.6, 2.5 * nrows + 0.8), squeeze=False, sharex=True
    )
    for ax in axes.ravel():
        ax.set_visible(False)
    handles = {}
    for path, (model, scope) in zip(logs, keys, strict=True):
        ax = axes[models.index(model), scopes.index(scope)]
        _training_panel(ax, path, f"{model} / {scope}" if scope else model, handles)
    _finish_training_figure(fig, axes, handles)
    _save(fig, out)


def _panel_keys(logs: Sequence[str], labels: Sequence[str] | None) -> list[tuple[str, str]]:
    """(model, scope) of each log's panel: from its path, or ``(label, "")`` with ``labels``."""
    if not labels:
        return [_log_parts(p) for p in logs]
    labels = list(labels)
    if len(labels) != len(logs):
        raise InputError(f"{len(labels)} labels for {len(logs)} logs")
    return [(lab, "") for lab in labels]


def _training_panel(ax, path: str | os.PathLike, title: str, handles: dict) -> None:
    """One log's panel: accuracy series on ``ax``, the loss on a twin axis; new line handles are
    added to ``handles`` (legend label -> line)."""
    ax.set_visible(True)
    ax.set_title(title, fontsize=9)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.tick_params(labelsize=7)
    df = _read_table(path)
    if df.empty:
        log.warning("%s: empty training log", path)
        ax.text(0.5, 0.5, "empty log", ha="center", va="center", transform=ax.transAxes)
        return
    x = pd.to_numeric(df["epoch"], errors="coerce") if "epoch" in df else np.arange(1, len(df) + 1)
    missing = []
    for col, name, style in ACC_SERIES:
        y = pd.to_numeric(df[col], errors="coerce") if col in df else pd.Series(np.nan, index=df.index)
        if y.isna().all():
            missing.append(name)
            continue
        (h,) = ax.plot(x, y, style, marker=".", color="C0" if name == "student" else "C1")
        handles[f"val. accuracy, {name}"] = h
    if "loss" in df:
        loss = pd.to_numeric(df["loss"], errors="coerce")
        if not loss.isna().all():
            ax2 = ax.twinx()
            (h,) = ax2.plot(x, loss, ":", color="0.35")
            ax2.tick_params(labelsize=7, colors="0.35")
            handles["training loss (right axis)"] = h
    if missing:
        ax.text(
            0.98, 0.04, "no " + " / ".join(missing), ha="right", va="bottom", fontsize=7,
            transform=ax.transAxes, color="0.4",
        )  # fmt: skip


def _finish_training_figure(fig, axes: np.ndarray, handles: dict) -> None:
    """Axis labels on the outer panels and one legend over the figure (or "no data")."""
    for ax in axes[-1]:
        ax.set_xlabel("epoch", fontsize=8)
    for row in axes:
        row[0].set_ylabel("accuracy", fontsize=8)
    if handles:
        nrows = len(axes)
        fig.legend(handles.values(), handles.keys(), loc="upper center", ncol=len(handles), fontsize=8)
        fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / (2.5 * nrows + 0.8)))
    else:
        fig.text(0.5, 0.5, "no data", ha="center", va="center")


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


def plot_plates(
    metrics_paths: str | os.PathLike | Sequence[str | os.PathLike],
    out: str | os.PathLike,
    stage: str | None = None,
) -> None:
    """Heat maps experiment x plate of one stage's accuracy (default: balanced, else the last stage):
    one row per round (one metrics JSON each), one column per split."""
    from deepnoise.evaluate import load_metrics

    plt = _pyplot()
    paths = [metrics_paths] if isinstance(metrics_paths, str | os.PathLike) else list(metrics_paths)
    rounds = []
    for path in paths:
        m = load_metrics(path)
        stages = {s["stage"]: s for s in m["stages"]}
        if not stages:
            raise InputError(f"{path}: no stages")
        st = stage or ("balanced" if "balanced" in stages else list(stages)[-1])
        if st not in stages:
            raise InputError(f"{path}: no stage {st!r} (has {sorted(stages)})")
        rounds.append((m["round"], st, stages[st]["splits"]))
    splits = list(dict.fromkeys(sp for _, _, s in rounds for sp in s))
    n_exp = max(
        (len({p["experiment"] for p in s[sp]["plates"]}) for _, _, s in rounds for sp in s), default=1
    )
    ncols, nrows = max(len(splits), 1), max(len(rounds), 1)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(4.2 * ncols + 1, (0.8 + 0.3 * n_exp) * nrows + 0.6), squeeze=False
    )
    im = None
    for r, (round_, st, split_map) in enumerate(rounds):
        for c, split in enumerate(splits):
            ax = axes[r, c]
            ax.set_title(f"round {round_} {st}: {split}", fontsize=9)
            if split not in split_map or not split_map[split]["plates"]:
                ax.axis("off")
                ax.text(0.5, 0.5, "not scored", ha="center", va="center", transform=ax.transAxes)
                continue
            t = pd.DataFrame(split_map[split]["plates"]).pivot_table(
                index="experiment", columns="plate", values="accuracy"
            )
            im = ax.imshow(t.to_numpy(float), vmin=0, vmax=1, cmap="viridis", aspect="auto")
            ax.set_xticks(range(len(t.columns)), [f"P{p}" for p in t.columns], fontsize=7)
            ax.set_yticks(range(len(t.index)), list(t.index), fontsize=7)
            for (i, j), v in np.ndenumerate(t.to_numpy(float)):
                if np.isfinite(v):
                    ax.text(
                        j, i, f"{v:.2f}", ha="center", va="center", fontsize=6, color="w" if v < 0.6 else "k"
                    )
    if im is not None:
        fig.tight_layout(rect=(0, 0, 0.9, 1))
        cax = fig.add_axes((0.92, 0.15, 0.015, 0.7))
        fig.colorbar(im, cax=cax, label="accuracy")
    elif not rounds:
        axes[0, 0].text(0.5, 0.5, "no scored predictions", ha="center", va="center")
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


def _read_sites(stack: str | os.PathLike, n: int) -> tuple[np.ndarray, dict, str]:
    import h5py

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
    return images, meta, title or str(stack)


def plot_composites(
    stacks: str | os.PathLike | Sequence[str | os.PathLike],
    out: str | os.PathLike,
    n: int = 4,
    scale: str = "percentile",
) -> None:
    """One row per stack (the workflow gives one plate of each cell type): ``n`` sites spread evenly
    over it, as RGB composites titled with well, site and siRNA."""
    plt = _pyplot()
    stacks = [stacks] if isinstance(stacks, str | os.PathLike) else list(stacks)
    rows = [_read_sites(s, n) for s in stacks]
    cols = max(len(images) for images, _, _ in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(2.6 * cols, 2.9 * len(rows)), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for r, (images, meta, title) in enumerate(rows):
        for k in range(len(images)):
            ax = axes[r, k]
            ax.imshow(to_rgb(images[k], scale))
            parts = [title] if k == 0 else []
            for key, fmt in (("well_id", "{}"), ("site", "s{}"), ("sirna_id", "siRNA {}")):
                if key in meta:
                    v = meta[key][k]
                    parts.append(fmt.format(v.decode() if isinstance(v, bytes) else v))
            ax.set_title(
                "\n".join([parts[0], " ".join(parts[1:])]) if k == 0 else " ".join(parts), fontsize=7
            )
    fig.tight_layout()
    _save(fig, out)


def accuracy_table(summary: str | os.PathLike, out: str | os.PathLike) -> None:
    """``summary.tsv`` as one HTML table: a row per round and stage, a column per split and cell
    type (``all`` first), accuracies with 3 decimals and the best of each column in bold."""
    df = _read_summary(summary)
    if df.empty:
        body = "<p>no scored predictions</p>"
    else:
        t = df.pivot_table(
            index=["round", "stage"], columns=["split", "cell_type"], values="accuracy", sort=False
        )
        order = sorted(
            t.columns, key=lambda c: (list(dict.fromkeys(df["split"])).index(c[0]), c[1] != "all", c[1])
        )
        t = t[order]
        best = t.max()
        head1 = "".join(
            f'<th colspan="{sum(1 for c in order if c[0] == sp)}">{html.escape(str(sp))}</th>'
            for sp in dict.fromkeys(c[0] for c in order)
        )
        head2 = "".join(f"<th>{html.escape(str(ct))}</th>" for _, ct in order)
        rows = []
        for (round_, stage), vals in t.iterrows():
            cells = []
            for col in order:
                v = vals[col]
                text = "" if pd.isna(v) else f"{v:.3f}"
                cells.append(f"<td><b>{text}</b></td>" if text and v == best[col] else f"<td>{text}</td>")
            rows.append(f"<tr><td>{round_}</td><td>{html.escape(str(stage))}</td>{''.join(cells)}</tr>")
        body = (
            '<table class="deepnoise-accuracy" border="1" '
            'style="border-collapse: collapse; text-align: right">'
            f'<thead><tr><th rowspan="2">round</th><th rowspan="2">stage</th>{head1}</tr>'
            f"<tr>{head2}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
        )
    with atomic_path(out) as tmp:
        Path(tmp).write_text(body + "\n")


# distributions whose versions the provenance names (the ones absent are left out)
PROVENANCE_PACKAGES = (
    "deepnoise", "snakemake", "torch", "torchvision", "timm", "numpy", "pandas", "h5py", "scikit-learn",
    "scipy", "matplotlib", "pillow", "pyyaml",
)  # fmt: skip


def _git(repo: str | os.PathLike, *args: str) -> str | None:
    import subprocess

    try:
        proc = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def provenance(config_json: str, repo: str | os.PathLike, out: str | os.PathLike) -> dict:
    """The run's config (as the workflow got it), the git commit of ``repo`` (``+ local changes``
    when the work tree differs) and the versions of Python and the main packages, as an HTML
    fragment; returns the same as a dict."""
    import platform
    import sys
    from importlib import metadata

    import yaml

    try:
        config = json.loads(config_json)
    except json.JSONDecodeError as exc:
        raise InputError(f"--config-json is not JSON ({exc})") from exc
    commit = _git(repo, "rev-parse", "HEAD")
    dirty = _git(repo, "status", "--porcelain", "--untracked-files=no")
    versions = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in PROVENANCE_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    info = {
        "commit": commit or "unknown (not a git checkout)",
        "local_changes": bool(dirty),
        "repository": str(repo),
        "versions": versions,
        "config": config,
    }
    commit_text = info["commit"] + (" + local changes" if dirty else "")
    rows = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>" for k, v in versions.items()
    )
    text = (
        f'<p><b>commit</b> <code class="deepnoise-commit">{html.escape(commit_text)}</code>'
        f" ({html.escape(str(repo))})</p>"
        f'<table class="deepnoise-versions" border="1" style="border-collapse: collapse">'
        f"<thead><tr><th>package</th><th>version</th></tr></thead><tbody>{rows}</tbody></table>"
        f'<p><b>config</b></p><pre class="deepnoise-config">'
        f"{html.escape(yaml.safe_dump(config, sort_keys=False))}</pre>\n"
    )
    with atomic_path(out) as tmp:
        Path(tmp).write_text(text)
    return info


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


def _run_table(args: argparse.Namespace) -> int:
    accuracy_table(args.summary, args.out)
    return 0


def _run_provenance(args: argparse.Namespace) -> int:
    provenance(args.config_json, args.repo, args.out)
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
    p.add_argument("--metrics", nargs="+", help="metrics JSON of each round (kind plates)")
    p.add_argument("--stage", help="kind plates: stage to show (default balanced)")
    p.add_argument("--out", required=True, help="PNG")
    p.set_defaults(func=_run_summary)

    p = subparsers.add_parser("plot-composites", help="RGB composites of sites of a plate stack")
    p.add_argument("--stack", nargs="+", required=True, help="HDF5 plate stacks, one row each")
    p.add_argument("--n", type=int, default=4, help="number of sites per stack")
    p.add_argument(
        "--scale",
        choices=("rxrx1", "percentile"),
        default="percentile",
        help="percentile: each channel stretched between its 0.5 and 99.8 percentiles; rxrx1: fixed ranges",
    )
    p.add_argument("--out", required=True, help="PNG")
    p.set_defaults(func=_run_composites)

    p = subparsers.add_parser("report-table", help="summary.tsv as an HTML accuracy table")
    p.add_argument("--summary", required=True)
    p.add_argument("--out", required=True, help="HTML fragment")
    p.set_defaults(func=_run_table)

    p = subparsers.add_parser("report-provenance", help="config, git commit and package versions as HTML")
    p.add_argument("--config-json", required=True, help="the workflow's config as JSON")
    p.add_argument("--repo", required=True, help="directory inside the git checkout of the workflow")
    p.add_argument("--out", required=True, help="HTML fragment")
    p.set_defaults(func=_run_provenance)
