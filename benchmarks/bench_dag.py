"""Dry-run time and job count of the full-RxRx1 config as the screen grows from 1 to 51 experiments.

Works from the metadata alone (no images). Each point is the median of --repeats dry runs; the last
column is seconds per job, which stays flat when the growth is linear. With --pngs every site's 6
channel PNGs exist as empty files (51 experiments: 753,984 files), so the stack rule's `--pngs`
fingerprint (a stat per PNG) is part of the timing; each size is then timed without and with the
PNG folders, alternating (paired under the same load).

    python -m benchmarks.bench_dag [--sizes 1 4 13 26 51] [--repeats 3] [--pngs]
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from tests.fixtures.rxrx1 import metadata

REPO = Path(__file__).resolve().parents[1]


def dry_run(workdir: Path, configfile: Path) -> tuple[float, int]:
    cmd = [
        sys.executable,
        "-m",
        "snakemake",
        "-n",
        "--quiet",
        "rules",
        "--cores",
        "1",
        "--snakefile",
        str(REPO / "workflow/Snakefile"),
        "--directory",
        str(workdir),
        "--configfile",
        str(configfile),
    ]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    seconds = time.perf_counter() - start
    total = re.search(r"^total\s+(\d+)", proc.stdout + proc.stderr, re.M)
    return seconds, int(total.group(1))


def write_empty_pngs(meta, root: Path) -> int:
    """Empty ``{root}/images/{experiment}/Plate{p}/{well}_s{site}_w{c}.png`` for every metadata row."""
    n = 0
    for (experiment, plate), rows in meta.groupby(["experiment", "plate"]):
        folder = root / "images" / experiment / f"Plate{plate}"
        folder.mkdir(parents=True, exist_ok=True)
        for well, site in zip(rows["well"], rows["site"], strict=True):
            for c in range(1, 7):
                (folder / f"{well}_s{site}_w{c}.png").touch()
                n += 1
    return n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 4, 13, 26, 51])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pngs", action="store_true", help="also time with every PNG present (empty files)")
    args = parser.parse_args()
    cfg = yaml.safe_load((REPO / "config/rxrx1.yaml").read_text())
    print(f"{'experiments':>11} {'jobs':>6} {'dry-run s':>10} {'ms/job':>7}")
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            workdir = Path(tmp) / f"n{n}"
            data = workdir / "rxrx1"
            data.mkdir(parents=True)
            meta = metadata(n)
            meta.to_csv(data / "metadata.csv", index=False)
            cfg["data"]["root"] = str(data)
            cfg["split"]["validation_per_cell_type"] = 1 if n >= 8 else 0
            configfile = workdir / "config.yaml"
            configfile.write_text(yaml.safe_dump(cfg))
            if not args.pngs:
                runs = [dry_run(workdir, configfile) for _ in range(args.repeats)]
                seconds = statistics.median(r[0] for r in runs)
                jobs = runs[0][1]
                print(f"{n:>11} {jobs:>6} {seconds:>10.2f} {1000 * seconds / jobs:>7.2f}")
                continue
            files = write_empty_pngs(meta, data)
            images, hidden = data / "images", data / "images.hidden"
            timed: dict[bool, list[float]] = {False: [], True: []}
            for _ in range(args.repeats):
                for with_pngs in (False, True):
                    if not with_pngs:
                        images.rename(hidden)
                    try:
                        seconds, jobs = dry_run(workdir, configfile)
                    finally:
                        if not with_pngs:
                            hidden.rename(images)
                    timed[with_pngs].append(seconds)
            without, with_ = (statistics.median(timed[k]) for k in (False, True))
            print(
                f"{n:>11} {jobs:>6} {with_:>10.2f} {1000 * with_ / jobs:>7.2f}"
                f"  ({files:,} PNGs; without the PNG folders {without:.2f} s, runs {timed})"
            )


if __name__ == "__main__":
    main()
