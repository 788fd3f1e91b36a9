"""Per-plate pixel statistics, their exact aggregation, and the normalisation lookup of training.

A statistics JSON (float64 numbers) records what it covers, so a set of files alone defines the
normalisation table::

    {"level": "plate" | "experiment" | "cell_type" | "pooled",
     "experiment": E | null, "plate": P | null, "cell_type": C | null,
     "plates": [[E, P], ...], "experiments": [...], "cell_types": [...],
     "all": {"n_sites": n, "count": [6], "sum": [6], "sumsq": [6], "mean": [6], "std": [6]},
     "negative_control": {... the same over the negative control sites ...}}

Sums are accumulated as exact integers (per-channel histograms of uint8 pixels) and stored as
float64, which stays exact up to 2**53 (a whole RxRx1 cell type is ~1e15 for ``sumsq``). ``std`` is
the population standard deviation.

``normalization_table(files, mode, keys)`` maps each plate of ``keys`` (default: every plate the
files cover) to ``(mean[6], std[6])`` (float64): ``plate`` (the plate's own statistics),
``negative_control`` (the plate's negative control sites), ``experiment`` / ``cell_type`` (the
aggregate over the experiment / cell type, from its file or, when not given, summed from the plate
files), ``none`` (mean 0, std 255, so uint8 pixels map to [0, 1]). A std of 0 (a constant channel) is
replaced by 1.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Iterable
from pathlib import Path

import h5py
import numpy as np

from deepnoise import layout, stacks
from deepnoise.atomic import write_text
from deepnoise.errors import InputError
from deepnoise.hparams import NORMALIZATIONS

log = logging.getLogger(__name__)

SUBSETS = ("all", "negative_control")
MODES = NORMALIZATIONS
LEVELS = ("plate", "experiment", "cell_type", "pooled")


def _summary(n_sites: int, count, total, sumsq) -> dict:
    count, total, sumsq = (np.asarray(x, np.float64) for x in (count, total, sumsq))
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(count > 0, total / count, 0.0)
        var = np.where(count > 0, sumsq / count - mean**2, 0.0)
    std = np.sqrt(np.clip(var, 0.0, None))
    return {
        "n_sites": int(n_sites),
        **{k: v.tolist() for k, v in (("count", count), ("sum", total), ("sumsq", sumsq))},
        "mean": mean.tolist(),
        "std": std.tolist(),
    }


def plate_stats(stack: Path | str) -> dict:
    """Statistics of one HDF5 plate stack, streamed one site (one chunk) at a time."""
    values = np.arange(256, dtype=np.int64)
    offsets = (np.arange(layout.N_CHANNELS, dtype=np.intp) * 256)[:, None]
    info = stacks.check_stack(stack)
    well_type = info.well_type
    try:
        f = h5py.File(stack, "r")
    except OSError as exc:
        raise InputError(f"{stack}: cannot open HDF5 stack: {exc}") from exc
    with f:
        images = f["images"]
        hist = {s: np.zeros((layout.N_CHANNELS, 256), np.int64) for s in SUBSETS}
        n_sites = {s: 0 for s in SUBSETS}
        for i in range(images.shape[0]):
            # every pixel is read here anyway: verify each site against its CRC on the way
            site = stacks.read_site_checked(images, i, info.crc32[i], str(stack), info.site_id[i])
            site = site.reshape(layout.N_CHANNELS, -1)
            h = np.bincount((site + offsets).ravel(), minlength=256 * layout.N_CHANNELS)
            h = h.reshape(layout.N_CHANNELS, 256)
            for s in SUBSETS:
                if s == "all" or well_type[i] == s:
                    hist[s] += h
                    n_sites[s] += 1
    attrs = info.attrs
    experiment, plate, cell_type = attrs["experiment"], attrs["plate"], attrs["cell_type"]
    out = {
        "level": "plate",
        "experiment": experiment,
        "plate": plate,
        "cell_type": cell_type,
        "plates": [[experiment, plate]],
        "experiments": [experiment],
        "cell_types": [cell_type],
    }
    for s in SUBSETS:
        out[s] = _summary(n_sites[s], hist[s].sum(1), hist[s] @ values, hist[s] @ values**2)
    return out


def load(path: Path | str) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: cannot read statistics JSON: {exc}") from exc
    for key in ("level", "plates", "experiments", "cell_types", *SUBSETS):
        if key not in data:
            raise InputError(f"{path}: statistics JSON has no {key!r}")
    data["plates"] = [(str(e), int(p)) for e, p in data["plates"]]
    return data


def aggregate(parts: list[dict], names: list[str] | None = None) -> dict:
    """Exact aggregation of statistics (sums of counts, sums and sums of squares)."""
    names = names or [f"input {i + 1}" for i in range(len(parts))]
    if not parts:
        raise InputError("aggregate-stats: no inputs")
    seen: dict[tuple[str, int], str] = {}
    for part, name in zip(parts, names, strict=True):
        for key in part["plates"]:
            if key in seen:
                raise InputError(f"{name}: experiment {key[0]} plate {key[1]} is also in {seen[key]}")
            seen[key] = name
    experiments = sorted({e for p in parts for e in p["experiments"]})
    cell_types = sorted({c for p in parts for c in p["cell_types"]})
    level = "experiment" if len(experiments) == 1 else "cell_type" if len(cell_types) == 1 else "pooled"
    out = {
        "level": level,
        "experiment": experiments[0] if level == "experiment" else None,
        "plate": None,
        "cell_type": cell_types[0] if len(cell_types) == 1 else None,
        "plates": [list(k) for k in sorted(seen)],
        "experiments": experiments,
        "cell_types": cell_types,
    }
    for s in SUBSETS:
        sums = [
            np.sum([np.asarray(p[s][k], np.float64) for p in parts], axis=0)
            for k in ("count", "sum", "sumsq")
        ]
        out[s] = _summary(sum(p[s]["n_sites"] for p in parts), *sums)
    return out


def _mean_std(summary: dict, where: str) -> tuple[np.ndarray, np.ndarray]:
    if summary["n_sites"] == 0 or min(summary["count"]) == 0:
        raise InputError(f"{where}: no pixels to normalise with")
    mean = np.asarray(summary["mean"], np.float64)
    std = np.asarray(summary["std"], np.float64)
    return mean, np.where(std > 0, std, 1.0)


def normalization_table(
    stats_files: list[Path | str], mode: str, keys: Iterable[tuple[str, int]] | None = None
) -> dict[tuple[str, int], tuple[np.ndarray, np.ndarray]]:
    """``{(experiment, plate): (mean[6], std[6])}`` for the plates ``keys`` (default: every plate the files
    cover; see module doc). A job passes the files of its own plates only: a cell type's file may
    then cover plates whose plate files it was not given, and those are not asked for."""
    if mode not in MODES:
        raise InputError(f"normalisation mode {mode!r} is not one of {list(MODES)}")
    files = {str(f): load(f) for f in stats_files}
    plates: dict[tuple[str, int], tuple[str, dict]] = {}
    groups: dict[tuple[str, str], tuple[str, dict]] = {}
    covered: dict[tuple[str, int], str] = {}  # plate -> cell type
    for name, data in files.items():
        for key in data["plates"]:
            covered[key] = data["cell_types"][0] if len(data["cell_types"]) == 1 else ""
        if data["level"] == "plate":
            plates[data["plates"][0]] = (name, data)
        elif data["level"] in ("experiment", "cell_type"):
            groups[(data["level"], data[data["level"]])] = (name, data)
    wanted = sorted(covered) if keys is None else sorted({(str(e), int(p)) for e, p in keys})
    for experiment, plate in wanted:
        if (experiment, plate) not in covered:
            raise InputError(f"experiment {experiment} plate {plate}: no statistics among the files")
    if mode == "none":
        return {k: (np.zeros(layout.N_CHANNELS), np.full(layout.N_CHANNELS, 255.0)) for k in wanted}
    table = {}
    for key in wanted:
        experiment, plate = key
        if mode in ("plate", "negative_control"):
            if key not in plates:
                raise InputError(
                    f"experiment {experiment} plate {plate}: no plate statistics among the files"
                )
            name, data = plates[key]
            subset = "all" if mode == "plate" else "negative_control"
            table[key] = _mean_std(data[subset], f"{name} ({subset})")
            continue
        group = experiment if mode == "experiment" else covered[key]
        if (mode, group) not in groups:
            members = [
                d for k, (_, d) in plates.items() if (k[0] if mode == "experiment" else covered[k]) == group
            ]
            if not group or not members:
                raise InputError(
                    f"experiment {experiment} plate {plate}: no {mode} statistics among the files"
                )
            groups[(mode, group)] = (f"{mode} {group} (from plate files)", aggregate(members))
        name, data = groups[(mode, group)]
        table[key] = _mean_std(data["all"], name)
    return table


def _plate(args: argparse.Namespace) -> int:
    write_text(args.out, json.dumps(plate_stats(args.stack), indent=1) + "\n")
    return 0


def _aggregate(args: argparse.Namespace) -> int:
    write_text(
        args.out, json.dumps(aggregate([load(p) for p in args.inputs], list(args.inputs)), indent=1) + "\n"
    )
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("plate-stats", help="per-channel pixel statistics of a plate stack")
    p.add_argument("--stack", required=True, help="results/stacks/{experiment}/Plate{plate}.h5")
    p.add_argument("--out", required=True, help="results/stats/plate/{experiment}/Plate{plate}.json")
    p.set_defaults(func=_plate)
    p = subparsers.add_parser("aggregate-stats", help="sum plate statistics over an experiment or cell type")
    p.add_argument("--inputs", required=True, nargs="+", help="plate (or aggregated) statistics JSONs")
    p.add_argument("--out", required=True)
    p.set_defaults(func=_aggregate)
