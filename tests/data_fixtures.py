"""Tiny image releases in the real layouts (rxrx1 release, Kaggle), for tests of any module.

The same content (``fixture_wells()``: 3 experiments, 2 plates, 4 wells per plate, 2 sites, 6
channels, 16x16 pixels) can be written in either layout, so the site tables built from both can be
compared. Pixel values are a deterministic function of (experiment, plate, well, site).
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from deepnoise import layout

SIZE = 16
SITES = (1, 2)
N_TREATMENTS = 8  # positive control id 8, negative control id 9
EXPERIMENTS = (("HUVEC-01", "train"), ("HUVEC-02", "test"), ("RPE-01", "train"))
RXRX1_COLUMNS = list(layout.RXRX1_COLUMNS)


def sirna_name(sirna_id: int) -> str:
    return "EMPTY" if sirna_id == N_TREATMENTS + 1 else f"s{sirna_id:05d}"


def fixture_wells() -> pd.DataFrame:
    """Well-level content: experiment, cell_type, dataset, plate, well, well_type, sirna_id, sirna."""
    rows = []
    for e, (experiment, dataset) in enumerate(EXPERIMENTS):
        for plate in (1, 2):
            treatments = [(2 * plate + e) % N_TREATMENTS, (2 * plate + e + 1) % N_TREATMENTS]
            ids = [*treatments, N_TREATMENTS, N_TREATMENTS + 1]
            types = ["treatment", "treatment", "positive_control", "negative_control"]
            wells = ["B02", "C05", "D10", "O23"]
            for well, sid, wt in zip(wells, ids, types, strict=True):
                rows.append(
                    (experiment, experiment.split("-")[0], dataset, plate, well, wt, sid, sirna_name(sid))
                )
    cols = ["experiment", "cell_type", "dataset", "plate", "well", "well_type", "sirna_id", "sirna"]
    return pd.DataFrame(rows, columns=cols)


def site_image(experiment: str, plate: int, well: str, site: int, size: int = SIZE) -> np.ndarray:
    """Deterministic pixels of a site: uint8 (6, size, size)."""
    seed = zlib.crc32(f"{experiment}_{plate}_{well}_{site}".encode())
    return np.random.default_rng(seed).integers(0, 256, (layout.N_CHANNELS, size, size), dtype=np.uint8)


def write_png(path: Path | str, array: np.ndarray) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG")


def write_site_images(plate_dir: Path, well: pd.Series | tuple, size: int = SIZE) -> None:
    for site in SITES:
        image = site_image(well.experiment, well.plate, well.well, site, size)
        for c in range(layout.N_CHANNELS):
            write_png(plate_dir / f"{well.well}_s{site}_w{c + 1}.png", image[c])


def rxrx1_metadata(wells: pd.DataFrame) -> pd.DataFrame:
    """Site-level rxrx1 metadata (the real release labels the test wells too)."""
    rows = []
    for w in wells.itertuples():
        wid = layout.well_id(w.experiment, w.plate, w.well)
        for site in SITES:
            rows.append(
                (f"{wid}_{site}", wid, w.cell_type, w.dataset, w.experiment, w.plate, w.well, site)
                + (w.well_type, w.sirna, w.sirna_id)
            )
    return pd.DataFrame(rows, columns=RXRX1_COLUMNS)


def write_rxrx1(root: Path, wells: pd.DataFrame | None = None, size: int = SIZE) -> Path:
    """``root/images/{experiment}/Plate{p}/{well}_s{s}_w{c}.png`` and ``root/metadata.csv``."""
    wells = fixture_wells() if wells is None else wells
    for w in wells.itertuples():
        write_site_images(root / "images" / w.experiment / f"Plate{w.plate}", w, size)
    rxrx1_metadata(wells).to_csv(root / "metadata.csv", index=False)
    return root


def write_kaggle(root: Path, wells: pd.DataFrame | None = None, size: int = SIZE) -> Path:
    """``root/{train,test}/...`` trees and the 4 Kaggle CSVs (test treatment wells unlabelled)."""
    wells = fixture_wells() if wells is None else wells
    root.mkdir(parents=True, exist_ok=True)
    wells = wells.assign(
        id_code=[
            layout.well_id(e, p, w) for e, p, w in zip(wells.experiment, wells.plate, wells.well, strict=True)
        ]
    )
    for w in wells.itertuples():
        write_site_images(root / w.dataset / w.experiment / f"Plate{w.plate}", w, size)
    cols = ["id_code", "experiment", "plate", "well"]
    for dataset in ("train", "test"):
        d = wells[wells.dataset == dataset].rename(columns={"sirna_id": "sirna"})
        treat = d[d.well_type == "treatment"]
        treat[cols + (["sirna"] if dataset == "train" else [])].to_csv(root / f"{dataset}.csv", index=False)
        ctrl = d[d.well_type != "treatment"]
        ctrl[cols + ["sirna", "well_type"]].to_csv(root / f"{dataset}_controls.csv", index=False)
    return root
