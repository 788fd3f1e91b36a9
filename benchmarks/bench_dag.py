"""Dry-run time and job count of the full-RxRx1 config as the screen grows from 1 to 51 experiments.

Works from the metadata alone (no images). Each point is the median of --repeats dry runs; the last
column is seconds per job, which stays flat when the growth is linear.

    python benchmarks/bench_dag.py [--sizes 1 4 13 26 51] [--repeats 3]
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

sys.path.insert(0, str(Path(__file__).parent))
from rxrx1_metadata import metadata  # noqa: E402

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 4, 13, 26, 51])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cfg = yaml.safe_load((REPO / "config/rxrx1.yaml").read_text())
    print(f"{'experiments':>11} {'jobs':>6} {'dry-run s':>10} {'ms/job':>7}")
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            workdir = Path(tmp) / f"n{n}"
            data = workdir / "rxrx1"
            data.mkdir(parents=True)
            metadata(n).to_csv(data / "metadata.csv", index=False)
            cfg["data"]["root"] = str(data)
            cfg["split"]["validation_per_cell_type"] = 1 if n >= 8 else 0
            configfile = workdir / "config.yaml"
            configfile.write_text(yaml.safe_dump(cfg))
            runs = [dry_run(workdir, configfile) for _ in range(args.repeats)]
            seconds = statistics.median(r[0] for r in runs)
            jobs = runs[0][1]
            print(f"{n:>11} {jobs:>6} {seconds:>10.2f} {1000 * seconds / jobs:>7.2f}")


if __name__ == "__main__":
    main()
