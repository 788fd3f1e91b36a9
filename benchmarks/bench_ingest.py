"""Ingest benchmark: PNG decode vs PNG -> HDF5 stacking, random site reads, size on disk.

One synthetic plate (default: 308 wells x 2 sites at 512x512, like an RxRx1 plate) is generated
once into ``--workdir`` and reused. Everything is measured in the same run, side by side:

- bare decode: PIL decode of the 6 PNGs of every site with N threads (sites/s);
- ``deepnoise stack`` (``stacks.write_stack``) for each compression and N = 1/2/4 decode threads
  (sites/s, and its ratio to the bare N-thread decode rate: same thread count on both sides; goal
  >= 0.85). Decode and stack alternate ``--repeats`` times (default 5; the order flips each repeat);
  the table shows medians and the ratio's min-max over the repeats (paired, per repeat);
- random single-site reads from the HDF5 (file kept open, as training does) vs decoding the same
  site's 6 PNGs (goal >= 10x);
- size on disk of the HDF5 vs the PNGs.

Usage: ``python -m benchmarks.bench_ingest [--size 512] [--wells 308] [--workdir DIR]``.
"""

from __future__ import annotations

import argparse
import functools
import os
import random
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np
from PIL import Image

from deepnoise import layout, synth
from deepnoise.metadata import build_sites, read_sites
from deepnoise.stacks import write_stack

EXPERIMENT, PLATE = "HUVEC-01", 1


def make_plate(workdir: Path, size: int, wells: int, threads: int) -> Path:
    """Images + metadata of one synthetic plate under ``workdir/plate{size}x{wells}``; returns sites.csv."""
    root = workdir / f"plate{size}x{wells}"
    sites_csv = root / "sites.csv"
    if sites_csv.is_file():
        return sites_csv
    n_pos = 30
    cfg = synth.validate_config(
        {
            "seed": 0,
            "image_size": size,
            "cell_types": ["HUVEC"],
            "train_experiments_per_cell_type": 1,
            "test_experiments_per_cell_type": 0,
            "n_treatments": 4 * (len(layout.INNER_WELLS) - n_pos - 1),
            "n_positive_controls": n_pos,
            "sites_per_well": 2,
        }
    )
    screen = synth.Screen(cfg)
    chosen = [w for w in screen.wells() if w.plate == PLATE][:wells]
    images = root / "images"
    (images / EXPERIMENT / f"Plate{PLATE}").mkdir(parents=True, exist_ok=True)

    def work(w):
        for site in (1, 2):
            image = screen.render(w, site)
            prefix = synth.site_prefix(images, w, site)
            for c in range(6):
                synth.write_png(f"{prefix}_w{c + 1}.png", image[c])

    t = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(work, chosen))
    print(f"generated {2 * len(chosen)} sites at {size}x{size} in {time.perf_counter() - t:.1f} s")
    metadata, truth = synth.tables(screen, chosen)
    metadata.to_csv(root / "metadata.csv", index=False)
    df, _, _ = build_sites("synthetic", root)
    df.to_csv(sites_csv, index=False)
    return sites_csv


def decode_site(prefix: str) -> np.ndarray:
    return np.stack([np.asarray(Image.open(f"{prefix}_w{c}.png")) for c in range(1, 7)])


def decode_all(prefixes: list[str], threads: int) -> None:
    """Decode every site's 6 PNGs with ``threads`` threads (as ``write_stack`` does)."""
    if threads == 1:
        for p in prefixes:
            decode_site(p)
        return
    with ThreadPoolExecutor(threads) as pool:
        for _ in pool.map(decode_site, prefixes):
            pass


def _timed(fn) -> tuple[float, float]:
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def interleaved(a, b, repeats: int) -> list[tuple[float, float, float, float]]:
    """``repeats`` pairs of timings (a wall, a CPU, b wall, b CPU); a runs first in even repeats, b
    in odd ones, so drift and other load hit both alike."""
    out = []
    for r in range(repeats):
        if r % 2 == 0:
            (aw, ac), (bw, bc) = _timed(a), _timed(b)
        else:
            (bw, bc), (aw, ac) = _timed(b), _timed(a)
        out.append((aw, ac, bw, bc))
    return out


def median(values) -> float:
    v = sorted(values)
    mid = len(v) // 2
    return v[mid] if len(v) % 2 else (v[mid - 1] + v[mid]) / 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--wells", type=int, default=len(layout.INNER_WELLS))
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "deepnoise-bench"))
    ap.add_argument("--compressions", nargs="+", default=["none", "lzf", "gzip-1"])
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2, 4])
    ap.add_argument("--reads", type=int, default=200, help="random single-site reads")
    ap.add_argument("--repeats", type=int, default=5, help="alternating decode/stack pairs per row")
    ap.add_argument("--stack-dir", help="where the HDF5 files go (default: --workdir); e.g. /dev/shm")
    args = ap.parse_args()
    workdir = Path(args.workdir)
    sites_csv = make_plate(workdir, args.size, args.wells, max(args.threads))
    prefixes = list(read_sites(sites_csv).path)
    n = len(prefixes)
    png_bytes = sum(os.path.getsize(f"{p}_w{c}.png") for p in prefixes for c in range(1, 7))

    decode_all(prefixes, 1)  # warm the page cache
    print(f"\nplate: {n} sites x 6 channels at {args.size}x{args.size}; cores: {os.cpu_count()}")
    print(f"PNGs on disk: {png_bytes / 2**20:.1f} MiB. 'decode/s': bare PNG decode with the row's thread")
    print(f"count, alternating with the stacking run {args.repeats} times (the machine may be shared);")
    print("medians; 'ratio' = stack / decode rate (median, [min-max] over the pairs), 'cpu' the same")
    print("by CPU time of this process (robust to other load).\n")
    header = f"{'compression':<12}{'threads':>8}{'decode/s':>10}{'stack/s':>9}{'ratio':>7}"
    header += f"{'[min-max]':>12}{'cpu':>6}"
    header += f"{'MiB':>8}{'vs PNG':>8}"
    print(header + f"{'h5 read ms':>12}{'PNG read ms':>13}{'speedup':>9}")
    rng = random.Random(0)
    picks = [rng.randrange(n) for _ in range(args.reads)]
    for comp in args.compressions:
        out = Path(args.stack_dir or workdir) / f"stack-{comp}.h5"
        rows = []
        for threads in args.threads:
            job = functools.partial(write_stack, sites_csv, EXPERIMENT, PLATE, out, threads, comp)
            pairs = interleaved(functools.partial(decode_all, prefixes, threads), job, args.repeats)
            ratios = [dw / sw for dw, _, sw, _ in pairs]
            rows.append(
                (
                    threads,
                    n / median(p[0] for p in pairs),
                    n / median(p[2] for p in pairs),
                    (median(ratios), min(ratios), max(ratios)),
                    median(dc / sc for _, dc, _, sc in pairs),
                )
            )
        size = os.path.getsize(out)
        with h5py.File(out, "r") as f:
            images = f["images"]
            images[0]
            t = time.perf_counter()
            for i in picks:
                images[i]
            h5_ms = (time.perf_counter() - t) / len(picks) * 1e3
        t = time.perf_counter()
        for i in picks:
            decode_site(prefixes[i])
        png_ms = (time.perf_counter() - t) / len(picks) * 1e3
        for k, (threads, decode_rate, rate, (ratio, lo, hi), cpu_ratio) in enumerate(rows):
            line = f"{comp:<12}{threads:>8}{decode_rate:>10.1f}{rate:>9.1f}{ratio:>7.2f}"
            line += f"{f'[{lo:.2f}-{hi:.2f}]':>12}{cpu_ratio:>6.2f}"
            if k == 0:
                line += f"{size / 2**20:>8.1f}{size / png_bytes:>8.2f}"
                line += f"{h5_ms:>12.2f}{png_ms:>13.2f}{png_ms / h5_ms:>8.1f}x"
            print(line)
        out.unlink()


if __name__ == "__main__":
    main()
