"""Site tables from the synthetic / rxrx1 release layout or the Kaggle layout, with validation.

Sources (``--root``):

- ``synthetic`` and ``rxrx1``: ``ROOT/images/{experiment}/Plate{p}/{well}_s{site}_w{c}.png`` (or
  ``ROOT/{experiment}/...`` when ROOT has no ``images/``) and ``ROOT/metadata.csv`` (rxrx1
  columns). The rxrx1 release labels its test wells; those labels move to the truth file. The
  synthetic screen writes its test labels to ``ROOT/test_truth.csv`` (read when present, or give
  ``--truth``).
- ``kaggle``: ``ROOT/{train,test}/{experiment}/Plate{p}/...`` with ``train.csv`` (id_code,
  experiment, plate, well, sirna), ``test.csv`` (id_code, experiment, plate, well) and
  ``{train,test}_controls.csv`` (id_code, experiment, plate, well, sirna, well_type). Cell type is
  the experiment prefix before ``-``; every well has sites 1 and 2; siRNA names are ``sirna_{id}``
  (``EMPTY`` for the negative control) as Kaggle gives only ids.

In the site table, test treatment wells have ``sirna`` empty and ``sirna_id = -1``; control wells
keep their labels in test experiments too (Kaggle gives them, and they are not scored).
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd

from deepnoise import layout
from deepnoise.atomic import atomic_path
from deepnoise.errors import InputError

log = logging.getLogger(__name__)

SITE_COLUMNS = list(layout.SITE_COLUMNS)
TRUTH_COLUMNS = list(layout.TRUTH_COLUMNS)
WELL_TYPES = ("treatment", "positive_control", "negative_control")
KAGGLE_SITES = (1, 2)


def read_csv(path: Path, required: list[str], allow_empty: bool = False) -> pd.DataFrame:
    """Read a CSV with every column as a string (no NaN); InputError if missing, empty (unless
    ``allow_empty``: a header and no rows) or incomplete. Adds ``_file`` and ``_row`` (the CSV line
    number) so later checks can name the row at fault."""
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError as exc:
        raise InputError(f"{path}: the file is empty (no header, no rows)") from exc
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot parse CSV: {exc}") from exc
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise InputError(f"{path}: missing columns {missing}")
    if df.empty and not allow_empty:
        raise InputError(f"{path}: the file has a header and no rows")
    df["_file"] = str(path)
    df["_row"] = np.arange(2, len(df) + 2)
    return df


def where(r) -> str:
    """``file: row N: site S`` of a site row (``site S`` for tables without source rows)."""
    site = f"site {r['site_id']}"
    if "_file" in r and "_row" in r:
        return f"{r['_file']}: row {r['_row']}: {site}"
    return site


def to_int(df: pd.DataFrame, column: str, path: Path) -> pd.Series:
    values = pd.to_numeric(df[column], errors="coerce")
    bad = values.isna() | (values != values.round())
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise InputError(f"{path}: row {i + 2}: column {column!r} is not an integer: {df[column].iloc[i]!r}")
    return values.astype(np.int64)


def check_ids(df: pd.DataFrame, column: str, expected: list[str]) -> None:
    """``df[column]`` equals ``expected`` row by row (a well_id/id_code/site_id that does not match
    its experiment, plate, well and site is refused: it would become a submission id)."""
    bad = (df[column] != pd.Series(expected, index=df.index)).to_numpy()
    if bad.any():
        i = int(bad.nonzero()[0][0])
        r = df.iloc[i]
        raise InputError(
            f"{r['_file']}: row {r['_row']}: {column} {r[column]!r} does not match its experiment, "
            f"plate, well{' and site' if column == 'site_id' else ''} (expected {expected[i]!r})"
        )


def _truth_of(df: pd.DataFrame) -> pd.DataFrame:
    wells = df[df.sirna_id >= 0].drop_duplicates("well_id")
    return wells[TRUTH_COLUMNS].reset_index(drop=True)


def read_release(root: Path, metadata: Path | None, truth: Path | None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Site table (unfinished: no validation) and truth from the synthetic / rxrx1 layout."""
    images = root / "images" if (root / "images").is_dir() else root
    metadata = metadata or root / "metadata.csv"
    df = read_csv(metadata, [c for c in SITE_COLUMNS if c not in ("site_id", "path")])
    for col in ("plate", "site", "sirna_id"):
        df[col] = to_int(df, col, metadata)
    check_ids(
        df,
        "well_id",
        [layout.well_id(e, p, w) for e, p, w in zip(df.experiment, df.plate, df.well, strict=True)],
    )
    if "site_id" in df.columns:
        check_ids(df, "site_id", [f"{w}_{s}" for w, s in zip(df.well_id, df.site, strict=True)])
    df["site_id"] = [f"{w}_{s}" for w, s in zip(df.well_id, df.site, strict=True)]
    df["path"] = [
        str(images / e / f"Plate{p}" / f"{w}_s{s}")
        for e, p, w, s in zip(df.experiment, df.plate, df.well, df.site, strict=True)
    ]
    hidden = (df.dataset == "test") & (df.well_type == "treatment")
    truths = [_truth_of(df[hidden])]
    df.loc[hidden, "sirna"] = ""
    df.loc[hidden, "sirna_id"] = -1
    truth = truth or (root / "test_truth.csv" if (root / "test_truth.csv").is_file() else None)
    if truth is not None:
        t = read_csv(truth, TRUTH_COLUMNS, allow_empty=True)
        for col in ("plate", "sirna_id"):
            t[col] = to_int(t, col, truth)
        truths.append(t[TRUTH_COLUMNS])
    return df, pd.concat(truths, ignore_index=True).drop_duplicates()


def read_kaggle(root: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Site table (unfinished) from the Kaggle layout; Kaggle has no test truth."""
    frames = []
    for dataset in ("train", "test"):
        for name, kind in ((f"{dataset}.csv", "treatment"), (f"{dataset}_controls.csv", "controls")):
            path = root / name
            cols = ["id_code", "experiment", "plate", "well"]
            if kind == "controls":
                cols += ["sirna", "well_type"]
            elif dataset == "train":
                cols += ["sirna"]
            df = read_csv(path, cols, allow_empty=kind == "controls")
            df["plate"] = to_int(df, "plate", path)
            check_ids(
                df,
                "id_code",
                [layout.well_id(e, p, w) for e, p, w in zip(df.experiment, df.plate, df.well, strict=True)],
            )
            df["sirna_id"] = to_int(df, "sirna", path) if "sirna" in cols else -1
            if kind == "treatment":
                df["well_type"] = "treatment"
            df["dataset"] = dataset
            df["images"] = str(root / dataset)
            frames.append(
                df[
                    [
                        "experiment",
                        "plate",
                        "well",
                        "sirna_id",
                        "well_type",
                        "dataset",
                        "images",
                        "_file",
                        "_row",
                    ]
                ]
            )
    wells = pd.concat(frames, ignore_index=True)
    wells["cell_type"] = wells.experiment.str.split("-").str[0]
    wells["well_id"] = [
        layout.well_id(e, p, w) for e, p, w in zip(wells.experiment, wells.plate, wells.well, strict=True)
    ]
    wells["sirna"] = [
        "" if i < 0 else "EMPTY" if t == "negative_control" else f"sirna_{i}"
        for i, t in zip(wells.sirna_id, wells.well_type, strict=True)
    ]
    df = wells.loc[wells.index.repeat(len(KAGGLE_SITES))].reset_index(drop=True)
    df["site"] = np.tile(KAGGLE_SITES, len(wells))
    df["site_id"] = [f"{w}_{s}" for w, s in zip(df.well_id, df.site, strict=True)]
    df["path"] = [
        str(Path(i) / e / f"Plate{p}" / f"{w}_s{s}")
        for i, e, p, w, s in zip(df.images, df.experiment, df.plate, df.well, df.site, strict=True)
    ]
    return df, pd.DataFrame(columns=TRUTH_COLUMNS)


def check_files(df: pd.DataFrame, siblings: bool = True) -> None:
    """Every site has its 6 channel PNGs, and every PNG in a plate directory has a site row.

    With ``siblings``, the other plate directories of the experiments are checked too (a plate
    missing from the metadata).
    """
    expected: dict[str, set[str]] = {}
    for prefix in df.path:
        d, base = os.path.split(prefix)
        expected.setdefault(d, set()).update(f"{base}_w{c}.png" for c in range(1, layout.N_CHANNELS + 1))
    plate_dirs = set(expected)
    for exp_dir in {os.path.dirname(d) for d in expected} if siblings else ():
        if os.path.isdir(exp_dir):
            plate_dirs.update(e.path for e in os.scandir(exp_dir) if e.is_dir())
    for d in sorted(plate_dirs):
        present = set()
        if os.path.isdir(d):
            present = {e.name for e in os.scandir(d) if e.name.lower().endswith(".png")}
        want = expected.get(d, set())
        missing = sorted(want - present)
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise InputError(f"{os.path.join(d, missing[0])}: channel PNG of a metadata row is missing{more}")
        extra = sorted(present - want)
        if extra:
            more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
            raise InputError(f"{os.path.join(d, extra[0])}: image has no metadata row{more}")


WELL_LEVEL = ("cell_type", "dataset", "experiment", "plate", "well", "well_type", "sirna", "sirna_id")


def validate(df: pd.DataFrame, cell_types: list[str] | None) -> None:
    for col in ("experiment", "cell_type", "well"):
        i = layout.first_unsafe_name(df[col], col)
        if i is not None:
            r = df.iloc[i]
            raise InputError(f"{where(r)}: {layout.name_problem(col, r[col])}")
    dup = df.site_id.duplicated(keep=False).to_numpy()
    if dup.any():
        rows = df[dup]
        first = rows[rows.site_id == rows.site_id.iloc[0]]
        also = f" (also row {first['_row'].iloc[1]})" if "_row" in first and len(first) > 1 else ""
        raise InputError(f"{where(first.iloc[0])}: duplicated in the metadata{also}")
    bad_plate = ~df.plate.isin(layout.PLATES)
    if bad_plate.any():
        r = df[bad_plate].iloc[0]
        raise InputError(f"{where(r)}: plate {r.plate} of experiment {r.experiment} is not in 1..4")
    if cell_types:
        unknown = ~df.cell_type.isin(cell_types)
        if unknown.any():
            r = df[unknown].iloc[0]
            raise InputError(
                f"{where(r)}: cell type {r.cell_type!r} of experiment {r.experiment} "
                f"is not one of {cell_types}"
            )
    for col, allowed in (("well_type", WELL_TYPES), ("dataset", ("train", "test"))):
        bad = ~df[col].isin(allowed)
        if bad.any():
            r = df[bad].iloc[0]
            raise InputError(f"{where(r)}: {col} {r[col]!r} is not one of {list(allowed)}")
    if (df.site < 1).any():
        raise InputError(f"{where(df[df.site < 1].iloc[0])}: site number must be >= 1")
    bad = (df.sirna_id < 0) & ((df.dataset == "train") | (df.well_type != "treatment"))
    if bad.any():
        raise InputError(f"{where(df[bad].iloc[0])}: a train or control site has no sirna_id")
    check_wells(df)
    known = df[df.sirna_id >= 0]
    names = known.groupby("sirna_id").sirna.nunique()
    if (names > 1).any():
        sid = names.index[names > 1][0]
        rows = known[known.sirna_id == sid].drop_duplicates("sirna")
        raise InputError(
            f"{where(rows.iloc[1])}: sirna_id {sid}: has several sirna names "
            f"({rows.sirna.iloc[0]!r} in {where(rows.iloc[0])})"
        )


def check_wells(df: pd.DataFrame) -> None:
    """The sites of a well agree on every well-level column (sirna, sirna_id, well_type...)."""
    cols = [c for c in WELL_LEVEL if c in df.columns]
    firsts = df.groupby("well_id", sort=False)[cols].transform("first")
    differs = (df[cols] != firsts).to_numpy()
    if differs.any():
        i, j = (int(k[0]) for k in differs.nonzero())
        r, col = df.iloc[i], cols[j]
        other = df[df.well_id == r.well_id].iloc[0]
        raise InputError(
            f"{where(r)}: the sites of well {r.well_id} disagree on {col}: {_py(r[col])!r} here, "
            f"{_py(other[col])!r} in {where(other)}"
        )


def _py(value):
    return value.item() if isinstance(value, np.generic) else value


def check_plates(df: pd.DataFrame, plates: list[int]) -> None:
    """Every experiment has rows for each of ``plates`` (the workflow stacks plates 1..4 of each)."""
    have = set(zip(df.experiment, df.plate, strict=True))
    for experiment in dict.fromkeys(df.experiment):
        for plate in plates:
            if (experiment, plate) not in have:
                r = df[df.experiment == experiment].iloc[0]
                source = r["_file"] if "_file" in r else "the metadata"
                raise InputError(
                    f"{source}: experiment {experiment} has no rows for plate {plate} "
                    f"(every experiment needs plates {', '.join(map(str, plates))})"
                )


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path: str) -> tuple[int, int] | None:
    """(height, width) from a PNG's IHDR header (33 bytes read), or None when it is not readable as
    a PNG (the stack's decoder names those files)."""
    try:
        with open(path, "rb") as f:
            head = f.read(24)
    except OSError:
        return None
    if len(head) < 24 or head[:8] != PNG_SIGNATURE or head[12:16] != b"IHDR":
        return None
    return int.from_bytes(head[20:24], "big"), int.from_bytes(head[16:20], "big")


def plate_dir(source: str, root: str | os.PathLike, experiment: str, dataset: str, plate: int) -> Path:
    """The folder of a plate's PNGs in the rxrx1 / Kaggle layouts (as ``read_release`` /
    ``read_kaggle`` build the paths)."""
    root = Path(root)
    if source == "kaggle":
        return root / dataset / experiment / f"Plate{plate}"
    images = root / "images" if (root / "images").is_dir() else root
    return images / experiment / f"Plate{plate}"


def png_fingerprint(folder: str | os.PathLike) -> str:
    """Number and hash of the names, sizes and mtimes of a plate folder's PNGs (a stat per file, no
    read): the stack rule's ``params``, so a changed, added or deleted PNG reruns that plate's
    stack, and the stack job checks that it read the PNGs Snakemake planned with.

    Runs at parse time for every plate (753,984 PNGs for RxRx1), so it is written for speed: names
    from one ``listdir`` and each stat relative to the open folder (no path strings), one hash
    update. The digest is that of ``name NUL size NUL mtime_ns LF`` per PNG in name order."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except FileNotFoundError:
        return "no folder"
    try:
        names = sorted(n for n in os.listdir(fd) if n[-4:].lower() == ".png")
        stats = [os.stat(n, dir_fd=fd) for n in names]
    finally:
        os.close(fd)
    text = "".join(f"{n}\0{st.st_size}\0{st.st_mtime_ns}\n" for n, st in zip(names, stats, strict=True))
    return f"{len(names)} PNGs, sha256 {hashlib.sha256(text.encode()).hexdigest()[:32]}"


def check_plate_sizes(df: pd.DataFrame) -> None:
    """All plates have images of one size: the first PNG of each plate (one header read per plate)
    is compared with the most common size; a plate at another resolution is named."""
    sizes = {}
    for (experiment, plate), prefix in df.groupby(["experiment", "plate"], sort=True).path.first().items():
        png = f"{prefix}_w1.png"
        size = png_size(png)
        if size is not None:
            sizes[(experiment, plate)] = (size, png)
    if not sizes:
        return
    counts = collections.Counter(size for size, _ in sizes.values())
    common = counts.most_common(1)[0][0]
    for (experiment, plate), (size, png) in sizes.items():
        if size != common:
            raise InputError(
                f"experiment {experiment} plate {plate}: images are {size[1]}x{size[0]} ({png}), "
                f"the other plates' are {common[1]}x{common[0]} ({counts[common]} of {len(sizes)} plates): "
                f"every plate of a screen must have one image size"
            )


def classes_of(df: pd.DataFrame, truth: pd.DataFrame) -> dict:
    """classes.json: treatments 0..N-1, controls N..N+P (positive controls first, then negative)."""
    controls = df[(df.well_type != "treatment") & (df.sirna_id >= 0)]
    treat_ids = np.concatenate(
        [
            df.sirna_id[(df.well_type == "treatment") & (df.sirna_id >= 0)].to_numpy(),
            truth.sirna_id.to_numpy(),
        ]
    ).astype(np.int64)
    if len(controls):
        n = int(controls.sirna_id.min())
        n_controls = int(controls.sirna_id.max()) - n + 1
    else:
        n = int(treat_ids.max()) + 1 if len(treat_ids) else 0
        n_controls = 0
    if len(treat_ids) and treat_ids.max() >= n:
        bad = df[(df.well_type == "treatment") & (df.sirna_id >= n)]
        where = f"site {bad.site_id.iloc[0]}" if len(bad) else "test truth"
        raise InputError(f"{where}: treatment sirna_id {int(treat_ids.max())} >= first control id {n}")
    names = dict(zip(df.sirna_id[df.sirna_id >= 0], df.sirna[df.sirna_id >= 0], strict=True))
    sirnas = [names.get(i) or f"sirna_{i}" for i in range(n + n_controls)]
    return {"n_treatments": n, "n_controls": n_controls, "sirnas": sirnas}


def build_sites(
    source: str,
    root: Path,
    metadata: Path | None = None,
    truth: Path | None = None,
    cell_types: list[str] | None = None,
    experiments: list[str] | None = None,
    check_images: bool = True,
    plates: list[int] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """The validated site table, the test truth and classes.json content."""
    root = Path(root)
    if source == "kaggle":
        df, truth_df = read_kaggle(root)
    elif source in ("synthetic", "rxrx1"):
        df, truth_df = read_release(root, metadata, truth)
    else:
        raise InputError(f"unknown source {source!r}")
    if experiments:
        absent = sorted(set(experiments) - set(df.experiment))
        if absent:
            raise InputError(f"experiment {absent[0]}: not in the metadata of {root}")
        df = df[df.experiment.isin(experiments)]
    validate(df, cell_types)
    if plates:
        check_plates(df, plates)
    classes = classes_of(df, truth_df)
    truth_df = truth_df[truth_df.well_id.isin(df.well_id)]
    df = df.sort_values(["experiment", "plate", "well", "site"], kind="stable").reset_index(drop=True)
    if check_images:
        check_files(df)
        check_plate_sizes(df)
    df = df[SITE_COLUMNS].astype({"plate": np.int64, "site": np.int64, "sirna_id": np.int64})
    truth_df = (
        truth_df[TRUTH_COLUMNS]
        .astype({"plate": np.int64, "sirna_id": np.int64})
        .sort_values(["experiment", "plate", "well"])
        .reset_index(drop=True)
    )
    return df, truth_df, classes


def read_sites(path: Path | str) -> pd.DataFrame:
    """Read results/sites.csv with the right dtypes (empty sirna stays an empty string)."""
    path = Path(path)
    df = read_csv(path, SITE_COLUMNS).drop(columns=["_file", "_row"])
    for col in ("plate", "site", "sirna_id"):
        df[col] = to_int(df, col, path)
    return df


def _run(args: argparse.Namespace) -> int:
    df, truth, classes = build_sites(
        args.source,
        Path(args.root),
        Path(args.metadata) if args.metadata else None,
        Path(args.truth) if args.truth else None,
        args.cell_types,
        args.experiments,
        plates=args.plates,
    )
    with atomic_path(args.out_sites) as p:
        df.to_csv(p, index=False)
    with atomic_path(args.out_truth) as p:
        truth.to_csv(p, index=False)
    with atomic_path(args.out_classes) as p:
        p.write_text(json.dumps(classes, indent=1) + "\n")
    log.info("%d sites, %d experiments, %d truth wells", len(df), df.experiment.nunique(), len(truth))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("sites", help="build the site table from an image release")
    p.add_argument("--source", required=True, choices=["synthetic", "rxrx1", "kaggle"])
    p.add_argument("--root", required=True, help="release directory")
    p.add_argument("--metadata", help="metadata.csv (synthetic/rxrx1; default ROOT/metadata.csv)")
    p.add_argument(
        "--truth", help="test truth CSV to merge (synthetic; default ROOT/test_truth.csv if present)"
    )
    p.add_argument("--out-sites", required=True)
    p.add_argument("--out-truth", required=True)
    p.add_argument("--out-classes", required=True)
    p.add_argument("--cell-types", nargs="+", help="allowed cell types (others are an error)")
    p.add_argument("--experiments", nargs="+", help="keep only these experiments")
    p.add_argument(
        "--plates", nargs="+", type=int, help="plates every experiment must have (the workflow: 1 2 3 4)"
    )
    p.set_defaults(func=_run)
