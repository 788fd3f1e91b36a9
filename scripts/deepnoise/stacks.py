"""PNG -> HDF5 plate stacks: one file per plate, one chunk per site, decoded with a thread pool.

PIL releases the GIL while inflating, so threads scale the decode; the HDF5 writes happen in the
main thread in site order. The output is written to a temporary sibling and renamed on success, so a
bad input leaves no file behind.

Every site's bytes get a CRC-32 (dataset ``crc32``, ~4 GB/s, well under 1% of the decode time).
``check_stack`` validates a stack's structure (cheap: index datasets and attributes only); readers
verify each site they read against its CRC (``read_site_checked``), so a truncated, damaged or
hand-edited stack is reported with the file and the well at fault instead of being used.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import logging
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from deepnoise import __version__, layout
from deepnoise.atomic import atomic_path
from deepnoise.errors import InputError
from deepnoise.metadata import check_files, png_fingerprint, png_size, read_sites

log = logging.getLogger(__name__)

# Measured by benchmarks/bench_ingest.py: PNG-derived noisy images barely compress (lzf/gzip-1
# save a few % at 3-10x the write and read cost), so stacks are uncompressed by default.
DEFAULT_COMPRESSION = "none"
STR = h5py.string_dtype("utf-8")
# Site-table columns stored next to the images, one row per site.
STR_COLUMNS = ("site_id", "well_id", "well", "well_type", "dataset", "sirna")
# Version of the stack layout; 2 added the per-site ``crc32``.
STACK_FORMAT = 2
REQUIRED_ATTRS = ("experiment", "plate", "cell_type", "n_sites", "format")
REBUILD = "delete it and rerun: Snakemake rebuilds it with the `stack` rule"


def compression_args(name: str) -> dict:
    """h5py keyword arguments of ``none``, ``lzf``, ``gzip`` or ``gzip-N`` (N in 0..9)."""
    if name == "none":
        return {}
    if name == "lzf":
        return {"compression": "lzf"}
    if name == "gzip" or (name.startswith("gzip-") and name[5:].isdigit() and int(name[5:]) <= 9):
        return {"compression": "gzip", "compression_opts": int(name[5:] or 4) if "-" in name else 4}
    raise InputError(f"--compression: unknown option {name!r} (none, lzf, gzip, gzip-N)")


def read_png(path: str, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Decode one 8-bit grayscale PNG; InputError naming the file for anything else."""
    try:
        with Image.open(path) as img:
            if img.format != "PNG":
                raise InputError(f"{path}: not a PNG file (format {img.format})")
            if img.mode != "L":
                raise InputError(f"{path}: expected 8-bit grayscale (mode L), got mode {img.mode}")
            img.load()
            array = np.asarray(img)
    except FileNotFoundError as exc:
        raise InputError(f"{path}: channel PNG is missing") from exc
    except UnidentifiedImageError as exc:
        raise InputError(f"{path}: not a PNG file") from exc
    except InputError:
        raise
    except (OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"{path}: cannot decode PNG (truncated or corrupt): {exc}") from exc
    if shape is not None and array.shape != shape:
        raise InputError(
            f"{path}: image size {array.shape[1]}x{array.shape[0]}, expected {shape[1]}x{shape[0]}"
        )
    return array


def read_site(prefix: str, shape: tuple[int, int] | None = None) -> np.ndarray:
    """The 6 channels of a site: uint8 (6, H, W)."""
    first = read_png(f"{prefix}_w1.png", shape)
    out = np.empty((layout.N_CHANNELS, *first.shape), np.uint8)
    out[0] = first
    for c in range(1, layout.N_CHANNELS):
        out[c] = read_png(f"{prefix}_w{c + 1}.png", first.shape)
    return out


def check_fingerprint(folder: str, pngs: str | None, when: str) -> None:
    if pngs and png_fingerprint(folder) != pngs:
        raise InputError(
            f"{folder}: the plate's PNGs changed {when} the stack was being written (planned with "
            f"{pngs}, now {png_fingerprint(folder)}): rerun snakemake"
        )


def plate_shape(prefixes: list[str], n_sites: int = 3) -> tuple[int, int]:
    """The plate's image size: the most common size in the PNG headers of its first ``n_sites``
    sites (a wrong-sized first PNG is then the file reported, not the next, healthy one)."""
    sizes = collections.Counter()
    for prefix in prefixes[:n_sites]:
        for c in range(1, layout.N_CHANNELS + 1):
            size = png_size(f"{prefix}_w{c}.png")
            if size is not None:
                sizes[size] += 1
    if not sizes:  # no readable header: the decoder names the first file and what is wrong
        return read_png(f"{prefixes[0]}_w1.png").shape
    return sizes.most_common(1)[0][0]


def iter_sites(prefixes: list[str], threads: int, shape: tuple[int, int]):
    """Decoded sites in order, at most ``4 * threads`` in flight."""
    if threads <= 1:
        for p in prefixes:
            yield read_site(p, shape)
        return
    pool = ThreadPoolExecutor(threads)
    try:
        window: collections.deque = collections.deque()
        it = iter(prefixes)
        for p in it:
            window.append(pool.submit(read_site, p, shape))
            if len(window) >= 4 * threads:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _plate_sites(sites_csv: Path | str, experiment: str, plate: int) -> pd.DataFrame:
    """The plate's rows of the site table; InputError when there are none or several cell types."""
    table = read_sites(sites_csv)
    df = table[(table.experiment == experiment) & (table.plate == int(plate))].reset_index(drop=True)
    if df.empty:
        raise InputError(f"{sites_csv}: no sites for experiment {experiment} plate {plate}")
    if df.cell_type.nunique() != 1:
        raise InputError(
            f"experiment {experiment} plate {plate}: several cell types {sorted(set(df.cell_type))}"
        )
    return df


def _write_images(
    f: h5py.File, prefixes: list[str], threads: int, shape: tuple[int, int], kwargs: dict
) -> np.ndarray:
    """Create the ``images`` dataset (one chunk per site) and fill it; returns each site's CRC-32."""
    n = len(prefixes)
    images = f.create_dataset(
        "images",
        shape=(n, layout.N_CHANNELS, *shape),
        dtype=np.uint8,
        chunks=(1, layout.N_CHANNELS, *shape),
        **kwargs,
    )
    direct = not kwargs
    crcs = np.zeros(n, np.uint32)
    for i, site in enumerate(iter_sites(prefixes, threads, shape)):
        crcs[i] = zlib.crc32(site)
        if direct:  # no filter pipeline: hand the chunk bytes straight to HDF5
            images.id.write_direct_chunk((i, 0, 0, 0), site)
        else:
            images[i] = site
    return crcs


def _write_index(f: h5py.File, df: pd.DataFrame, crcs: np.ndarray) -> None:
    """Write the per-site datasets next to the images: ``crc32`` and the site-table columns."""
    f.create_dataset("crc32", data=crcs)
    for col in STR_COLUMNS:
        f.create_dataset(col, data=df[col].to_numpy(dtype=object), dtype=STR)
    f.create_dataset("site", data=df.site.to_numpy(np.int8))
    f.create_dataset("sirna_id", data=df.sirna_id.to_numpy(np.int32))


def _stack_attrs(
    df: pd.DataFrame,
    sites_csv: Path | str,
    experiment: str,
    plate: int,
    shape: tuple[int, int],
    compression: str,
    pngs: str | None,
) -> dict:
    """The stack's file attributes (``created`` is the time of this call)."""
    return {
        "pngs": pngs or "",
        "experiment": experiment,
        "plate": int(plate),
        "cell_type": str(df.cell_type.iloc[0]),
        "image_size": int(shape[0]),
        "source": str(sites_csv),
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "deepnoise_version": __version__,
        "n_sites": len(df),
        "compression": compression,
        "format": STACK_FORMAT,
    }


def write_stack(
    sites_csv: Path | str,
    experiment: str,
    plate: int,
    out: Path | str,
    threads: int = 1,
    compression: str = DEFAULT_COMPRESSION,
    pngs: str | None = None,
) -> int:
    """Write the plate's HDF5 stack; returns the number of sites.

    ``pngs``: the plate folder's ``png_fingerprint`` as Snakemake planned the job with; the PNGs
    must match it before and after they are read (else nothing is written).
    """
    df = _plate_sites(sites_csv, experiment, plate)
    kwargs = compression_args(compression)
    prefixes = list(df.path)
    folder = os.path.dirname(prefixes[0])
    check_fingerprint(folder, pngs, "before")
    check_files(df, siblings=False)
    shape = plate_shape(prefixes)
    with atomic_path(out) as tmp, h5py.File(tmp, "w") as f:
        crcs = _write_images(f, prefixes, threads, shape, kwargs)
        _write_index(f, df, crcs)
        check_fingerprint(folder, pngs, "while")
        f.attrs.update(_stack_attrs(df, sites_csv, experiment, plate, shape, compression, pngs))
    n = len(df)
    log.info("%s plate %s: %d sites -> %s", experiment, plate, n, out)
    return n


@dataclass(frozen=True)
class StackInfo:
    """What ``check_stack`` verified about one plate stack: its attributes and per-site index."""

    attrs: dict  # all file attributes; the required ones as str/int (experiment, plate, cell_type, ...)
    shape: tuple[int, ...]  # shape of ``images``: (n_sites, N_CHANNELS, H, W)
    well: list[str]  # well of each row, e.g. "B02"
    site_id: list[str]  # site id of each row (``well_id_site`` for stacks written by other code)
    well_type: list[str]  # well type of each row (treatment, negative_control, ...)
    site: np.ndarray  # site number of each row, int
    crc32: np.ndarray  # CRC-32 of each row's image bytes, uint32


def _strs(ds) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in ds[()]]


def _open_stack(path: str | os.PathLike) -> h5py.File:
    """Open a stack read-only; InputError when it is not a readable HDF5 file."""
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise InputError(
            f"{path}: cannot open the HDF5 plate stack (truncated, corrupt or not HDF5: {exc}); {REBUILD}"
        ) from exc


def _read_attrs(f: h5py.File, path: str | os.PathLike) -> dict:
    """All attributes, the required ones as Python types; InputError if one lacks or the format differs."""
    try:
        attrs = {k: f.attrs[k] for k in REQUIRED_ATTRS}
    except KeyError as exc:
        raise InputError(
            f"{path}: not a deepnoise plate stack of format {STACK_FORMAT} (no attribute {exc}); {REBUILD}"
        ) from exc
    attrs = {
        **dict(f.attrs),
        "experiment": str(attrs["experiment"]),
        "plate": int(attrs["plate"]),
        "cell_type": str(attrs["cell_type"]),
        "n_sites": int(attrs["n_sites"]),
        "format": int(attrs["format"]),
    }
    if attrs["format"] != STACK_FORMAT:
        raise InputError(f"{path}: stack format {attrs['format']}, expected {STACK_FORMAT}; {REBUILD}")
    return attrs


def _read_index(f: h5py.File, path: str | os.PathLike) -> tuple[tuple[int, ...], np.dtype, dict]:
    """The images' shape and dtype and the per-site datasets (``site_id`` and ``well_id`` empty
    when absent); InputError for a missing or unreadable one."""
    missing = [k for k in ("images", "crc32", "site", "well", "well_type") if k not in f]
    if missing:
        raise InputError(f"{path}: plate stack lacks datasets {missing}; {REBUILD}")
    try:
        images = f["images"]
        return (
            images.shape,
            images.dtype,
            {
                "well": _strs(f["well"]),
                "site_id": _strs(f["site_id"]) if "site_id" in f else [],
                "well_id": _strs(f["well_id"]) if "well_id" in f else [],
                "well_type": _strs(f["well_type"]),
                "site": f["site"][()].astype(int),
                "crc32": f["crc32"][()].astype(np.uint32),
            },
        )
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: cannot read the stack's site index ({exc}); {REBUILD}") from exc


def _check_images(path: str | os.PathLike, shape: tuple[int, ...], dtype: np.dtype, n: int) -> None:
    """InputError unless the images are uint8 (n, N_CHANNELS, H, W)."""
    if len(shape) != 4 or shape[0] != n or shape[1] != layout.N_CHANNELS or dtype != np.uint8:
        raise InputError(
            f"{path}: images are {dtype} {shape}, expected uint8 ({n}, {layout.N_CHANNELS}, H, W); {REBUILD}"
        )


def _check_names(path: str | os.PathLike, attrs: dict, wells: list[str]) -> None:
    """InputError for an unsafe experiment name, a plate outside 1..4 or an unsafe well name."""
    problem = layout.name_problem("experiment", attrs["experiment"])
    if problem or attrs["plate"] not in layout.PLATES:
        raise InputError(
            f"{path}: attributes name experiment {attrs['experiment']!r} plate {attrs['plate']!r}; "
            f"{problem or 'plate not in 1..4'}"
        )
    for w in wells:
        problem = layout.name_problem("well", w)
        if problem:
            raise InputError(f"{path}: {problem}")


def _check_unique(path: str | os.PathLike, wells: list[str], sites: np.ndarray) -> None:
    """InputError naming the first (well, site) pair that occurs more than once."""
    pairs = list(zip(wells, sites.tolist(), strict=True))
    if len(set(pairs)) != len(pairs):
        dup = next(p for p in pairs if pairs.count(p) > 1)
        raise InputError(f"{path}: well {dup[0]} site {dup[1]} occurs more than once")


def check_stack(path: str | os.PathLike) -> StackInfo:
    """Structure of a plate stack (a ``StackInfo``), validated without reading the images.

    ``InputError`` names the file and what is wrong: not HDF5 or truncated, a missing dataset or
    attribute, inconsistent lengths, an unsafe or duplicated well.
    """
    with _open_stack(path) as f:
        attrs = _read_attrs(f, path)
        shape, dtype, index = _read_index(f, path)
    n = attrs["n_sites"]
    _check_images(path, shape, dtype, n)
    for key, values in index.items():
        if key not in ("site_id", "well_id") or values:  # both optional (stacks written by other code)
            if len(values) != n:
                raise InputError(f"{path}: dataset {key!r} has {len(values)} rows for {n} sites; {REBUILD}")
    if not index["site_id"]:  # the site table's form, well_id_site
        wells = index["well_id"] or index["well"]
        index["site_id"] = [f"{w}_{s}" for w, s in zip(wells, index["site"].tolist(), strict=True)]
    del index["well_id"]
    _check_names(path, attrs, index["well"])
    _check_unique(path, index["well"], index["site"])
    return StackInfo(attrs=attrs, shape=tuple(shape), **index)


def seal(f: h5py.File) -> None:
    """Add the per-site CRC-32 and the format attribute to a stack written by other code (tests,
    benchmarks); ``write_stack`` computes them while writing."""
    images = f["images"]
    f.create_dataset(
        "crc32", data=np.array([zlib.crc32(images[i]) for i in range(images.shape[0])], np.uint32)
    )
    f.attrs["format"] = STACK_FORMAT
    f.attrs["n_sites"] = int(images.shape[0])


def read_site_checked(
    images: h5py.Dataset, row: int, crc: int, path: str, site_id: str | None = None
) -> np.ndarray:
    """Site ``row`` of an open ``images`` dataset, verified against its CRC-32."""
    where = f"site {site_id} (row {row})" if site_id else f"row {row}"
    try:
        site = images[row]
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: {where} cannot be read (truncated or damaged: {exc}); {REBUILD}") from exc
    if zlib.crc32(np.ascontiguousarray(site)) != int(crc):
        raise InputError(
            f"{path}: {where} does not match the checksum written by `deepnoise stack`: the file was "
            f"modified or damaged after it was written; {REBUILD}"
        )
    return site


def _run(args: argparse.Namespace) -> int:
    write_stack(args.sites, args.experiment, args.plate, args.out, args.threads, args.compression, args.pngs)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("stack", help="stack one plate's PNGs into an HDF5 file")
    p.add_argument("--sites", required=True, help="results/sites.csv")
    p.add_argument("--experiment", required=True)
    p.add_argument("--plate", required=True, type=int)
    p.add_argument("--out", required=True, help="results/stacks/{experiment}/Plate{plate}.h5")
    p.add_argument("--threads", type=int, default=1, help="decode threads")
    p.add_argument("--compression", default=DEFAULT_COMPRESSION, help="none (default), lzf, gzip, gzip-N")
    p.add_argument("--pngs", help="the plate folder's PNG fingerprint Snakemake planned with (checked)")
    p.set_defaults(func=_run)
