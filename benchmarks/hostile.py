"""Hostile inputs of the ingestion stage (`deepnoise sites`, `deepnoise stack`) and what each does.

Builds a tiny rxrx1-layout release per case (tests/fixtures/data.py), damages it, runs the CLI the
rules call in a subprocess, and records the message, exit code, files left in the output folder
(temporary files included), and what a rerun does after the input is repaired. Writes the markdown
table of docs/hostile-inputs.md:

    PYTHONPATH=scripts python -m benchmarks.hostile --out docs/hostile-inputs.md
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from tests.fixtures.data import write_png, write_rxrx1

REPO = Path(__file__).resolve().parents[1]


def _md(root: Path, edit) -> None:
    md = pd.read_csv(root / "metadata.csv", dtype=str, keep_default_na=False)
    out = edit(md)
    (md if out is None else out).to_csv(root / "metadata.csv", index=False)


def _set(row, col, value):
    def edit(md):
        md.loc[row, col] = value

    return edit


PLATE = Path("images/HUVEC-02/Plate2")
CASES = {
    "empty metadata.csv": ("sites", lambda r: (r / "metadata.csv").write_text("")),
    "header-only metadata.csv": (
        "sites",
        lambda r: (r / "metadata.csv").write_text((r / "metadata.csv").read_text().splitlines()[0] + "\n"),
    ),
    "sites of one well disagree on sirna_id": ("sites", lambda r: _md(r, _set(3, "sirna_id", "7"))),
    "well_id `HUVEC-03_1_X;touch PWNED #`": (
        "sites",
        lambda r: _md(r, _set(6, "well_id", "HUVEC-03_1_X;touch PWNED #")),
    ),
    "experiment with shell syntax": ("sites", lambda r: _md(r, _set(6, "experiment", "HUVEC-01$(id)"))),
    "plate missing from the metadata": (
        "sites",
        lambda r: _md(r, lambda md: md[~((md.experiment == "RPE-01") & (md.plate == "2"))]),
    ),
    "a whole plate at another resolution": ("sites", "resize_plate"),
    "PNG without a metadata row": (
        "sites",
        lambda r: write_png(r / PLATE / "K11_s1_w1.png", np.zeros((16, 16), np.uint8)),
    ),
    "missing channel PNG": ("sites", lambda r: (r / PLATE / "C05_s2_w4.png").unlink()),
    "plate's first PNG at another size": (
        "stack",
        lambda r: write_png(r / PLATE / "B02_s1_w1.png", np.zeros((16, 20), np.uint8)),
    ),
    "truncated PNG": (
        "stack",
        lambda r: (r / PLATE / "C05_s2_w3.png").write_bytes((r / PLATE / "C05_s2_w3.png").read_bytes()[:60]),
    ),
    "RGB PNG": ("stack", lambda r: write_png(r / PLATE / "C05_s2_w3.png", np.zeros((16, 16, 3), np.uint8))),
}


def _resize_plate(root: Path, work: Path) -> None:
    from tests.fixtures.data import fixture_wells

    wells = fixture_wells()
    odd = wells[(wells.experiment == "HUVEC-02") & (wells.plate == 2)]
    write_rxrx1(work / "big", odd, size=24)
    for png in (work / "big" / PLATE).iterdir():
        png.replace(root / PLATE / png.name)
    (work / "big" / "metadata.csv").unlink()


def _run(kind: str, root: Path, out: Path, sites: Path) -> subprocess.CompletedProcess:
    py = [sys.executable, "-m", "deepnoise"]
    if kind == "sites":
        cmd = [*py, "sites", "--source", "rxrx1", "--root", str(root), "--plates", "1", "2"]
        cmd += ["--out-sites", str(out / "sites.csv"), "--out-truth", str(out / "truth.csv")]
        cmd += ["--out-classes", str(out / "classes.json")]
    else:
        cmd = [*py, "stack", "--sites", str(sites), "--experiment", "HUVEC-02", "--plate", "2"]
        cmd += ["--out", str(out / "Plate2.h5")]
    env = {**os.environ, "PYTHONPATH": str(REPO / "scripts")}
    return subprocess.run(cmd, capture_output=True, text=True, env=env)


def run_case(name: str, work: Path) -> dict:
    kind, damage = CASES[name]
    clean = write_rxrx1(work / "clean")
    root = work / "rel"
    shutil.copytree(clean, root)
    sites = work / "sites.csv"
    assert _run("sites", clean, work / "clean_out", sites).returncode == 0
    shutil.copy(work / "clean_out" / "sites.csv", sites)
    text = sites.read_text().replace(str(clean), str(root))
    sites.write_text(text)
    if damage == "resize_plate":
        _resize_plate(root, work)
    else:
        damage(root)
    out = work / "out"
    proc = _run(kind, root, out, sites)
    message = (proc.stderr.strip().splitlines() or [""])[-1].replace(str(work), "…")
    left = sorted(p.name for p in out.rglob("*")) if out.exists() else []
    shutil.rmtree(root)
    shutil.copytree(clean, root)  # the input repaired
    rerun = _run(kind, root, out, sites)
    return {
        "case": name,
        "stage": f"`deepnoise {kind}`",
        "message": message,
        "exit code": proc.returncode,
        "leftovers": ", ".join(left) or "none",
        "rerun after the fix": "rc 0, outputs written" if rerun.returncode == 0 else f"rc {rerun.returncode}",
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rows = []
    for name in CASES:
        with tempfile.TemporaryDirectory(prefix="hostile-") as tmp:
            rows.append(run_case(name, Path(tmp)))
    df = pd.DataFrame(rows)
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in df.itertuples(index=False):
        lines.append("| " + " | ".join(str(v).replace("|", "\\|") for v in r) + " |")
    table = "\n".join(lines) + "\n"
    if args.out:
        head = (
            "# Hostile inputs of the ingestion stage\n\n"
            "Each row: a tiny rxrx1-layout release (tests/fixtures/data.py) damaged one way, "
            "the CLI the rule calls, its message (paths shortened to …), exit code, "
            "the files left in its output folder "
            "(temporary files included) and what the same command does once the input is repaired.\n"
            "Regenerate with:\n\n"
            "    PYTHONPATH=scripts python -m benchmarks.hostile --out docs/hostile-inputs.md\n\n"
        )
        args.out.write_text(head + table)
    print(table)


if __name__ == "__main__":
    main()
