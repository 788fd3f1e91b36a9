"""Datasets over the HDF5 plate stacks, normalisation tables and deterministic samplers.

Images leave the loader as uint8 ``(6, H, W)`` (training, one site) or ``(2, 6, H, W)`` (prediction,
both sites) together with the index of their plate in the normalisation table; the float conversion
and ``(x - mean) / std`` happen on the device (``normalize_batch``). Randomness that decides *what*
is loaded (well order, site) lives in the samplers, which are pure functions of ``(seed, stream,
epoch)``: a resumed run replays the same batches, whatever the number of loader workers.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from deepnoise import stacks
from deepnoise.errors import InputError

WELL_TYPES = ("treatment", "positive_control", "negative_control")


def read_classes(path: str | os.PathLike) -> dict:
    try:
        classes = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: cannot read classes: {exc}") from exc
    for key in ("n_treatments", "n_controls"):
        if not isinstance(classes.get(key), int):
            raise InputError(f"{path}: key {key!r} missing or not an int")
    return classes


@dataclass
class StackIndex:
    """Where each site lives: ``files[i]`` is the stack of plate ``keys[i] = (experiment, plate)``."""

    files: list[str]
    keys: list[tuple[str, int]]
    rows: list[dict[tuple[str, int], int]]  # per file: (well, site) -> row
    image_size: int
    crcs: list[np.ndarray]  # per file: CRC-32 of each row, verified on every read
    site_ids: list[list[str]]  # per file: site id of each row (for error messages)

    @classmethod
    def build(cls, stack_files: Sequence[str | os.PathLike]) -> StackIndex:
        files, keys, rows, sizes, crcs, site_ids = [], [], [], set(), [], []
        for path in stack_files:
            path = str(path)
            info = stacks.check_stack(path)
            key = (info.attrs["experiment"], info.attrs["plate"])
            wells, sites, shape = info.well, info.site, info.shape
            if key in keys:
                raise InputError(f"{path}: plate {key} also in {files[keys.index(key)]}")
            sizes.add((shape[2], shape[3]))
            files.append(path)
            keys.append(key)
            rows.append({(w, int(s)): i for i, (w, s) in enumerate(zip(wells, sites, strict=True))})
            crcs.append(info.crc32)
            site_ids.append(info.site_id)
        if len(sizes) > 1:
            raise InputError(f"stacks have different image sizes: {sorted(sizes)}")
        size = sizes.pop() if sizes else (0, 0)
        if size[0] != size[1]:
            raise InputError(f"stacks: images must be square, got {size}")
        return cls(files, keys, rows, int(size[0]), crcs, site_ids)

    def locate(self, wells: pd.DataFrame) -> pd.DataFrame:
        """Add ``file_idx, row1, row2`` (rows of sites 1 and 2) to a per-well frame."""
        lookup = {k: i for i, k in enumerate(self.keys)}
        file_idx, row1, row2 = [], [], []
        for exp, plate, well in zip(wells["experiment"], wells["plate"], wells["well"], strict=True):
            i = lookup.get((exp, int(plate)))
            if i is None:
                raise InputError(f"no stack given for experiment {exp} plate {plate} (well {well})")
            r = [self.rows[i].get((well, s)) for s in (1, 2)]
            if r[0] is None or r[1] is None:
                raise InputError(f"{self.files[i]}: well {well} lacks site {1 if r[0] is None else 2}")
            file_idx.append(i)
            row1.append(r[0])
            row2.append(r[1])
        out = wells.copy()
        out["file_idx"], out["row1"], out["row2"] = file_idx, row1, row2
        return out


def well_table(sites: pd.DataFrame) -> pd.DataFrame:
    """One row per well of a site table (the first site's metadata), in table order."""
    cols = ["well_id", "cell_type", "dataset", "experiment", "plate", "well", "well_type", "sirna_id"]
    return sites.drop_duplicates("well_id")[cols].reset_index(drop=True)


def normalization_arrays(
    stats_files: Sequence[str | os.PathLike], mode: str, keys: Sequence[tuple[str, int]]
) -> tuple[np.ndarray, np.ndarray]:
    """Per stack ``keys[i]``: mean and std ``(n, 6)`` float32 from ``stats.normalization_table``."""
    from deepnoise.stats import normalization_table

    table = normalization_table([str(f) for f in stats_files], mode, keys)
    mean, std = np.zeros((len(keys), 6), np.float32), np.ones((len(keys), 6), np.float32)
    for i, key in enumerate(keys):
        if key not in table:
            raise InputError(f"stats: no {mode} normalisation for experiment {key[0]} plate {key[1]}")
        mean[i], std[i] = np.asarray(table[key][0]), np.asarray(table[key][1])
    if np.any(std <= 0):
        raise InputError(f"stats: non-positive std in {mode} normalisation")
    return mean, std


def normalize_batch(
    x: torch.Tensor,
    norm_idx: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    jitter: float = 0.0,
    gen: torch.Generator | None = None,
) -> torch.Tensor:
    """``(x - mean[plate]) / std[plate]`` on the device, for ``(B, 6, H, W)`` or ``(B, S, 6, H, W)``.

    With ``jitter > 0`` (training) mean and std of each sample are scaled by independent factors
    ``1 + jitter * N(0, 1)`` per channel (mean shift relative to the std).
    """
    m, s = mean[norm_idx], std[norm_idx]  # (B, 6)
    if jitter > 0:
        noise = torch.randn((2,) + m.shape, generator=gen, device=m.device, dtype=m.dtype)
        m = m + jitter * s * noise[0]
        s = s * (1.0 + jitter * noise[1]).clamp_min(0.5)
    shape = (x.shape[0],) + (1,) * (x.dim() - 4) + (6, 1, 1)
    return (x.float() - m.view(shape)) / s.view(shape)


class StackDataset(Dataset):
    """Wells of plate stacks. HDF5 files are opened lazily, once per process (loader worker).

    ``dataset[(i, site)]`` -> ``(uint8 (6, H, W), norm_idx, label, i)`` for one site (training);
    ``dataset[i]`` -> ``(uint8 (2, 6, H, W), norm_idx, label, i)`` with both sites (prediction).
    """

    def __init__(
        self,
        files: Sequence[str],
        wells: pd.DataFrame,
        labels: Sequence[int] | None = None,
        index: StackIndex | None = None,
    ):
        """With ``index`` (the ``StackIndex`` of ``files``), every site read is verified against its
        CRC-32 and a mismatch names the file and the site."""
        self.files = list(files)
        self.crcs = None if index is None else list(index.crcs)
        self.site_ids = None if index is None else list(index.site_ids)
        self.file_idx = wells["file_idx"].to_numpy(np.int64)
        self.rows = wells[["row1", "row2"]].to_numpy(np.int64)
        self.labels = np.full(len(wells), -1, np.int64) if labels is None else np.asarray(labels, np.int64)
        self._handles: dict[int, h5py.Dataset] = {}
        self._pid = None

    def __len__(self) -> int:
        return len(self.file_idx)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_handles"], state["_pid"] = {}, None
        return state

    def _images(self, f: int) -> h5py.Dataset:
        if self._pid != os.getpid():
            self._handles, self._pid = {}, os.getpid()
        if f not in self._handles:
            self._handles[f] = h5py.File(self.files[f], "r")["images"]
        return self._handles[f]

    def _read(self, f: int, row: int) -> np.ndarray:
        ds = self._images(f)
        if self.crcs is None:
            return ds[row]
        return stacks.read_site_checked(ds, row, self.crcs[f][row], self.files[f], self.site_ids[f][row])

    def __getitem__(self, item):
        if isinstance(item, tuple | list):
            i, site = int(item[0]), int(item[1])
            img = self._read(self.file_idx[i], self.rows[i, site])
        else:
            i = int(item)
            f = self.file_idx[i]
            img = np.stack([self._read(f, self.rows[i, 0]), self._read(f, self.rows[i, 1])])
        return torch.from_numpy(np.ascontiguousarray(img)), int(self.file_idx[i]), int(self.labels[i]), i


def _generator(seed: int, stream: int, epoch: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed((int(seed) * 1_000_003 + int(stream) * 7_919 + int(epoch)) % (2**63))
    return g


class EpochSampler(Sampler):
    """Deterministic per-epoch sampler, DDP-aware (replaces ``DistributedSampler``).

    The global order of epoch ``e`` is a function of ``(seed, stream, e)``: concatenated random
    permutations of ``n`` items, ``total`` long (default ``n``, rounded up to a multiple of
    ``world``); rank ``r`` takes items ``r, r + world, ...``. With ``random_site`` it yields
    ``(index, site_row)`` pairs with a random site (0 or 1) per item, else plain indices in order
    (``shuffle=False``) or shuffled.
    """

    def __init__(
        self,
        n: int,
        seed: int,
        stream: int = 0,
        shuffle: bool = True,
        random_site: bool = True,
        total: int | None = None,
        rank: int = 0,
        world: int = 1,
    ):
        self.n, self.seed, self.stream = n, seed, stream
        self.shuffle, self.random_site = shuffle, random_site
        self.rank, self.world = rank, world
        total = n if total is None else total
        self.total = -(-total // world) * world
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.total // self.world

    def order(self) -> tuple[torch.Tensor, torch.Tensor]:
        g = _generator(self.seed, self.stream, self.epoch)
        reps = -(-self.total // max(self.n, 1))
        if self.shuffle:
            idx = torch.cat([torch.randperm(self.n, generator=g) for _ in range(reps)])
        else:
            idx = torch.arange(self.n).repeat(reps)
        sites = torch.randint(0, 2, (len(idx),), generator=g)
        return idx[: self.total], sites[: self.total]

    def __iter__(self) -> Iterator:
        idx, sites = self.order()
        idx, sites = idx[self.rank :: self.world].tolist(), sites[self.rank :: self.world].tolist()
        if self.random_site:
            return iter(list(zip(idx, sites, strict=True)))
        return iter(idx)


def make_loader(
    dataset: StackDataset,
    sampler: Sampler,
    batch_size: int,
    num_workers: int,
    pin_memory: bool,
    drop_last: bool,
) -> DataLoader:
    """A DataLoader with persistent workers (when ``num_workers > 0``)."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=drop_last,
        persistent_workers=num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None,
    )


def device_batches(loader, device: torch.device) -> Iterator[list]:
    """Iterate ``loader`` with its tensors on ``device``. On CUDA the next batch is copied on a side
    stream (from pinned memory) while the current one is used, so the host-to-device copy overlaps
    the training step; on the CPU the batches pass through."""
    if device.type != "cuda":
        yield from loader
        return
    stream = torch.cuda.Stream(device)
    it = iter(loader)

    def fetch():
        batch = next(it, None)
        if batch is None:
            return None
        with torch.cuda.stream(stream):
            return [t.to(device, non_blocking=True) if torch.is_tensor(t) else t for t in batch]

    nxt = fetch()
    while nxt is not None:
        current = torch.cuda.current_stream(device)
        current.wait_stream(stream)
        for t in nxt:
            if torch.is_tensor(t):
                t.record_stream(current)  # the side stream's allocation is used on this stream
        batch, nxt = nxt, fetch()
        yield batch
