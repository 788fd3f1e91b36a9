"""Plate layouts, shared by the Snakefile (at parse time) and the package. No torch here.

The synthetic screen's experiments follow the RxRx1 naming (``HUVEC-01``) and every experiment has
4 plates. ``synthetic_experiments(cfg)`` returns them from the ``synthetic`` config section alone, so
the whole DAG is known before any image exists.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from pathlib import Path

PLATES = (1, 2, 3, 4)
N_CHANNELS = 6
N_GROUPS = 4
# Test-time augmentation: the 8 elements of the dihedral group (flips x 90 degree rotations).
TTA_VIEWS = 8
# The used wells of RxRx1: the inner 14 x 22 of a 384-well plate (rows B..O, columns 2..23).
ROWS = string.ascii_uppercase[1:15]
COLUMNS = tuple(range(2, 24))
INNER_WELLS = tuple(f"{r}{c:02d}" for r in ROWS for c in COLUMNS)
# Site-level columns of the rxrx1 release's metadata.csv (the synthetic screen writes the same).
RXRX1_COLUMNS = (
    "site_id",
    "well_id",
    "cell_type",
    "dataset",
    "experiment",
    "plate",
    "well",
    "site",
    "well_type",
    "sirna",
    "sirna_id",
)
# results/sites.csv: the rxrx1 columns plus the image path prefix (docs/architecture.md).
SITE_COLUMNS = (*RXRX1_COLUMNS, "path")
# Test truth (well level), written where the source has the test labels.
TRUTH_COLUMNS = ("well_id", "experiment", "plate", "well", "cell_type", "sirna_id")


# Names that reach file paths, wildcards and command lines. Metadata values outside these patterns
# are rejected before any job is built, so no metadata value can inject shell syntax or a path.
NAME_PATTERNS = {
    "experiment": re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"),
    "cell_type": re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"),
    "well": re.compile(r"[A-P](0[1-9]|1[0-9]|2[0-4])"),
}


def name_problem(kind: str, value: object) -> str | None:
    """Why ``value`` is not a safe ``kind`` (experiment, cell_type, well) name; None when it is."""
    pattern = NAME_PATTERNS[kind]
    if isinstance(value, str) and pattern.fullmatch(value):
        return None
    return f"{kind} {value!r} is not a valid name (must match {pattern.pattern})"


def first_unsafe_name(values, kind: str) -> int | None:
    """Position of the first value of a pandas Series of ``kind`` names that ``name_problem``
    rejects, or None (vectorised: metadata tables have ~125k rows)."""
    bad = ~values.astype(str).str.fullmatch(NAME_PATTERNS[kind].pattern)
    return int(bad.to_numpy().nonzero()[0][0]) if bad.any() else None


@dataclass(frozen=True)
class Experiment:
    experiment: str
    cell_type: str
    dataset: str  # "train" or "test"


def synthetic_experiments(cfg: dict) -> list[Experiment]:
    """Experiments of the synthetic screen: per cell type, train ones first, then test ones."""
    out = []
    for cell_type in cfg["cell_types"]:
        n_train = int(cfg["train_experiments_per_cell_type"])
        n_test = int(cfg["test_experiments_per_cell_type"])
        for i in range(n_train + n_test):
            dataset = "train" if i < n_train else "test"
            out.append(Experiment(f"{cell_type}-{i + 1:02d}", cell_type, dataset))
    return out


def well_id(experiment: str, plate: int, well: str) -> str:
    """The Kaggle ``id_code`` of a well."""
    return f"{experiment}_{int(plate)}_{well}"


def parse_well_id(wid: str) -> tuple[str, int, str]:
    experiment, plate, well = wid.rsplit("_", 2)
    return experiment, int(plate), well


def real_experiments(source: str, root: str) -> list[Experiment]:
    """Experiments of an rxrx1 or Kaggle data folder, read from its metadata alone (no images)."""
    import pandas as pd  # imported here: the Snakefile imports this module at parse time

    from deepnoise.errors import InputError

    root_path = Path(root)
    if source == "rxrx1":
        files = {"train/test": root_path / "metadata.csv"}
    elif source == "kaggle":
        files = {"train": root_path / "train.csv", "test": root_path / "test.csv"}
    else:
        raise InputError(f"data.source: unknown source {source!r} (synthetic, rxrx1 or kaggle)")
    frames = []
    for dataset, path in files.items():
        if not path.exists():
            raise InputError(f"data.root: {path} not found (needed for data.source={source})")
        try:
            df = pd.read_csv(
                path,
                usecols=lambda c: c in {"experiment", "cell_type", "dataset"},
                dtype=str,
                keep_default_na=False,
            )
        except pd.errors.EmptyDataError as exc:
            raise InputError(f"{path}: the file is empty (no header, no rows)") from exc
        except (pd.errors.ParserError, UnicodeDecodeError) as exc:
            raise InputError(f"{path}: cannot parse CSV: {exc}") from exc
        if "experiment" not in df.columns:
            raise InputError(f"{path}: no 'experiment' column")
        if df.empty:
            raise InputError(f"{path}: the file has a header and no rows")
        if "dataset" not in df.columns:
            df["dataset"] = dataset
        if "cell_type" not in df.columns:
            df["cell_type"] = df["experiment"].str.split("-").str[0]
        for col in ("experiment", "cell_type"):
            i = first_unsafe_name(df[col], col)
            if i is not None:
                raise InputError(f"{path}: row {i + 2}: {name_problem(col, df[col].iloc[i])}")
        bad = ~df["dataset"].isin(["train", "test"])
        if bad.any():
            i = int(bad.to_numpy().nonzero()[0][0])
            raise InputError(f"{path}: row {i + 2}: dataset {df['dataset'].iloc[i]!r} is not train or test")
        frames.append(df.drop_duplicates())
    table = pd.concat(frames).drop_duplicates().sort_values(["cell_type", "dataset", "experiment"])
    dup = table["experiment"][table["experiment"].duplicated()]
    if len(dup):
        raise InputError(f"{root}: experiment {dup.iloc[0]!r} is listed with two cell types or datasets")
    return [Experiment(r.experiment, r.cell_type, r.dataset) for r in table.itertuples()]
