"""Tiny screens in the contract's formats (site table, classes.json, HDF5 stacks, stats JSON) for
the training tests, with a class-dependent signal and per-plate technical offsets."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from deepnoise import layout, stacks
from deepnoise.stats import plate_stats


@dataclass
class Screen:
    root: Path
    sites: Path
    classes: Path
    stacks: list[Path]
    stats: list[Path]
    experiments: dict[str, str]  # experiment -> dataset
    n_treatments: int
    n_controls: int
    truth: dict[str, int] = field(default_factory=dict)  # well_id -> sirna_id (all wells)


def write_stack(path: Path, experiment: str, plate: int, cell_type: str, rows: pd.DataFrame, images) -> None:
    """A plate stack in the contract format: ``rows`` has well, site, well_type, sirna_id, dataset,
    well_id, one row per image of ``images`` (n_sites, 6, H, W) uint8."""
    path.parent.mkdir(parents=True, exist_ok=True)
    str_dt = h5py.string_dtype("utf-8")
    with h5py.File(path, "w") as f:
        size = images.shape[-1]
        f.create_dataset("images", data=images, chunks=(1, 6, size, size))
        for col in ("well", "well_type", "dataset", "well_id"):
            f.create_dataset(col, data=rows[col].astype(str).to_numpy().astype(object), dtype=str_dt)
        f.create_dataset("site", data=rows["site"].to_numpy(np.int8))
        f.create_dataset("sirna_id", data=rows["sirna_id"].to_numpy(np.int32))
        f.attrs.update(
            experiment=experiment,
            plate=int(plate),
            cell_type=cell_type,
            image_size=int(size),
            source="test",
            created="now",
            deepnoise_version="test",
            n_sites=len(rows),
        )
        stacks.seal(f)


def make_screen(
    root: Path,
    cell_types=("HUVEC",),
    train_experiments: int = 2,
    test_experiments: int = 1,
    plates=(1, 2),
    n_treatments: int = 6,
    n_positive: int = 1,
    wells_per_treatment: int = 2,
    image_size: int = 16,
    signal: float = 25.0,
    seed: int = 0,
) -> Screen:
    """A screen where treatment ``c`` raises a class-specific mix of channels by ``signal`` grey
    levels (rotation-invariant), each plate adds its own per-channel offset, site 2 is brighter."""
    rng = np.random.default_rng(seed)
    n_controls = n_positive + 1
    n_classes = n_treatments + n_controls
    pattern = rng.normal(0, 1, (n_classes, 6))
    pattern /= np.linalg.norm(pattern, axis=1, keepdims=True)
    site_rows, stacks, stats, experiments, truth = [], [], [], {}, {}
    for cell_type in cell_types:
        for e in range(train_experiments + test_experiments):
            dataset = "train" if e < train_experiments else "test"
            experiment = f"{cell_type}-{e + 1:02d}"
            experiments[experiment] = dataset
            for plate in plates:
                ids = list(np.repeat(np.arange(n_treatments), wells_per_treatment))
                ids += list(range(n_treatments, n_classes))
                ids = rng.permutation(ids)
                offset = rng.normal(0, 15, 6)
                rows, images = [], []
                for k, sirna_id in enumerate(ids):
                    well = layout.INNER_WELLS[k]
                    wid = layout.well_id(experiment, plate, well)
                    truth[wid] = int(sirna_id)
                    wtype = (
                        "treatment"
                        if sirna_id < n_treatments
                        else ("negative_control" if sirna_id == n_classes - 1 else "positive_control")
                    )
                    known = dataset == "train"
                    for site in (1, 2):
                        base = 80 + offset + signal * pattern[sirna_id] + 3.0 * (site - 1)
                        img = base[:, None, None] + rng.normal(0, 8, (6, image_size, image_size))
                        images.append(np.clip(img, 0, 255).astype(np.uint8))
                        row = {
                            "site_id": f"{wid}_{site}",
                            "well_id": wid,
                            "cell_type": cell_type,
                            "dataset": dataset,
                            "experiment": experiment,
                            "plate": plate,
                            "well": well,
                            "site": site,
                            "well_type": wtype,
                            "sirna": f"s{sirna_id:05d}" if known else "",
                            "sirna_id": int(sirna_id) if known else -1,
                            "path": f"images/{experiment}/Plate{plate}/{well}_s{site}",
                        }
                        rows.append(row)
                df = pd.DataFrame(rows)
                site_rows.append(df)
                arr = np.stack(images)
                path = root / "stacks" / experiment / f"Plate{plate}.h5"
                write_stack(path, experiment, plate, cell_type, df, arr)
                stacks.append(path)
                spath = root / "stats" / "plate" / experiment / f"Plate{plate}.json"
                spath.parent.mkdir(parents=True, exist_ok=True)
                spath.write_text(json.dumps(plate_stats(path)))
                stats.append(spath)
    sites = root / "sites.csv"
    pd.concat(site_rows).to_csv(sites, index=False)
    classes = root / "classes.json"
    names = [f"s{i:05d}" for i in range(n_treatments + n_positive)] + ["EMPTY"]
    classes.write_text(json.dumps({"n_treatments": n_treatments, "n_controls": n_controls, "sirnas": names}))
    return Screen(root, sites, classes, stacks, stats, experiments, n_treatments, n_controls, truth)


TINY = dict(
    backbone="resnet10t",
    epochs=3,
    batch_size=8,
    lr=2e-3,
    lr_milestones=[2],
    lr_values=[1e-3],
    input_size=16,
    num_workers=0,
    consistency_rampup_epochs=1.0,
    ema_decay=0.9,
    ema_max_window=0.5,
    aug_erase_p=0.25,
)


def train_tiny(screen: Screen, out: Path, cfg: dict | None = None, **kw) -> dict:
    """Train a tiny model on CPU (``TINY`` hparams updated by ``cfg``); returns the weights dict."""
    import torch

    from deepnoise import train

    kwargs = dict(
        sites=str(screen.sites),
        classes=str(screen.classes),
        stacks=[str(p) for p in screen.stacks],
        stats=[str(p) for p in screen.stats],
        hparams=train.TrainConfig.from_dict({**TINY, **(cfg or {})}),
        scope="all",
        val_experiments=["HUVEC-02"],
        out_weights=str(out / "weights.pt"),
        out_log=str(out / "log.csv"),
        checkpoint_dir=str(out / "ckpt"),
        device="cpu",
        threads=1,
    )
    kwargs.update(kw)
    train.run_training(**kwargs)
    return torch.load(out / "weights.pt", weights_only=True)
