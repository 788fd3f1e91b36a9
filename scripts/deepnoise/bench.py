"""``deepnoise bench train``: throughput of the full training step vs the model step alone.

Full step = loader (HDF5 read in worker processes, pinned memory) + device copy + normalisation +
augmentation + forward/backward/Adam + EMA teacher update, as in ``deepnoise train``. Model step =
the same ``Trainer.step`` on one batch already on the device. Same run, same model; the ratio
full/model shows whether data loading keeps up (goal >= 0.9). Each measurement is repeated
``--repeats`` times (default 5), alternating the order (model, full, loader / loader, full, model);
the median is reported with the min and max, and the ratio is the median of the per-repeat ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import torch

from deepnoise import data, layout, models, stacks, train
from deepnoise.atomic import atomic_path, write_text
from deepnoise.errors import InputError


def write_synthetic_plate(path: Path, n_wells: int, image_size: int, seed: int = 0) -> None:
    """A random-image plate stack in the contract format (all wells treatments, 2 sites)."""
    rng = np.random.default_rng(seed)
    wells = [layout.INNER_WELLS[i % len(layout.INNER_WELLS)] for i in range(n_wells)]
    if n_wells > len(layout.INNER_WELLS):
        raise InputError(f"--synthetic: at most {len(layout.INNER_WELLS)} wells per plate")
    n = 2 * n_wells
    str_dt = h5py.string_dtype("utf-8")
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        images = f.create_dataset(
            "images", (n, 6, image_size, image_size), np.uint8, chunks=(1, 6, image_size, image_size)
        )
        for i in range(n):
            images[i] = rng.integers(0, 256, (6, image_size, image_size), np.uint8)
        well = [w for w in wells for _ in (1, 2)]
        f.create_dataset("well", data=np.array(well, object), dtype=str_dt)
        f.create_dataset("site", data=np.tile(np.array([1, 2], np.int8), n_wells))
        f.create_dataset("well_type", data=np.array(["treatment"] * n, object), dtype=str_dt)
        f.create_dataset("sirna_id", data=np.repeat(np.arange(n_wells, dtype=np.int32), 2))
        f.create_dataset("dataset", data=np.array(["train"] * n, object), dtype=str_dt)
        f.create_dataset("well_id", data=np.array([f"BENCH-01_1_{w}" for w in well], object), dtype=str_dt)
        f.attrs.update(
            experiment="BENCH-01",
            plate=1,
            cell_type="BENCH",
            image_size=image_size,
            source="bench",
            created=time.strftime("%Y-%m-%dT%H:%M:%S"),
            deepnoise_version="bench",
            n_sites=n,
        )
        stacks.seal(f)


def _process_age() -> float:
    """Seconds since this process started (Linux /proc; elsewhere 0)."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(uptime - start_ticks / os.sysconf("SC_CLK_TCK"), 0.0)
    except (OSError, ValueError, IndexError):
        return 0.0


def _sync(rt: train.Runtime) -> None:
    if rt.cuda:
        torch.cuda.synchronize(rt.device)


def summarize(key: str, values: list[float]) -> dict[str, float]:
    """``key``: the median of ``values``; ``key_min``/``key_max``: their spread."""
    v = sorted(values)
    mid = len(v) // 2
    median = v[mid] if len(v) % 2 else (v[mid - 1] + v[mid]) / 2
    return {key: median, f"{key}_min": v[0], f"{key}_max": v[-1]}


@dataclass(frozen=True)
class _Bench:
    """One benchmark run: the trainer, its loaders and the setup the result reports."""

    args: argparse.Namespace
    rt: train.Runtime
    cfg: train.TrainConfig
    trainer: train.Trainer
    n_params: int
    startup_s: float
    b_unl: int  # unlabelled images per step (0: none)
    lab_loader: torch.utils.data.DataLoader
    unl_loader: torch.utils.data.DataLoader | None

    @property
    def images_per_step(self) -> int:
        return self.args.batch_size + self.b_unl

    def batches(self) -> Iterator[tuple]:
        """(labelled, unlabelled or None) batches on the device, as the trainer takes them."""
        rt, trainer = self.rt, self.trainer
        unl_iter = data.device_batches(self.unl_loader, rt.device) if self.unl_loader is not None else None
        for batch in data.device_batches(self.lab_loader, rt.device):
            yield (
                trainer.to_device(batch),
                (trainer.to_device(next(unl_iter)) if unl_iter is not None else None),
            )

    def model_step(self, lab, unl) -> float:
        """Images/s of ``--steps`` training steps on one batch already on the device."""
        t0 = time.perf_counter()
        for _ in range(self.args.steps):
            self.trainer.step(lab, unl)
        _sync(self.rt)
        return self.images_per_step * self.args.steps / (time.perf_counter() - t0)

    def full_step(self) -> tuple[float, float]:
        """Images/s of up to ``--steps`` training steps on loaded batches, and the seconds to the
        first batch."""
        # a fresh iterator (as at an epoch start); the clock starts at its first batch (the
        # workers' start, once per epoch, is reported apart as first_batch_s)
        t0 = time.perf_counter()
        it = self.batches()
        batch = next(it)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        self.trainer.step(*batch)
        n = 1
        for batch in it:
            if n == self.args.steps:
                break
            self.trainer.step(*batch)
            n += 1
        _sync(self.rt)
        return self.images_per_step * n / (time.perf_counter() - t0), first

    def loader_only(self) -> float:
        """Images/s of up to ``--steps`` loaded batches without training."""
        t0 = time.perf_counter()
        n = 0
        for _ in self.batches():
            n += 1
            if n == self.args.steps:
                break
        _sync(self.rt)
        return self.images_per_step * n / (time.perf_counter() - t0)


def bench_train(args: argparse.Namespace) -> dict:
    """Model step, full step and loader alone, in ``--repeats`` alternating repeats: the result
    fields (medians with min and max) that ``deepnoise bench train`` prints."""
    t_start = time.perf_counter()
    if args.repeats < 1:
        raise InputError(f"bench train --repeats {args.repeats}: expected at least 1 (5 or more to decide)")
    rt = train.setup_runtime(args.device, args.threads)
    if rt.cuda:
        torch.backends.cudnn.benchmark = True
    with tempfile.TemporaryDirectory(prefix="deepnoise-bench-") as tmpdir:
        bench = _setup(args, rt, Path(tmpdir), t_start)
        runs = _timed_runs(bench)
    return _result(bench, runs)


def _bench_wells(args: argparse.Namespace, tmpdir: Path) -> tuple[data.StackIndex, pd.DataFrame]:
    """The stacks to read (``--stacks``, or a random plate written to ``tmpdir``): their index and
    all their wells, located."""
    stacks = list(args.stacks or [])
    if args.synthetic:
        path = tmpdir / "Plate1.h5"
        n_wells = min(max(args.batch_size + 8, 16), len(layout.INNER_WELLS))
        write_synthetic_plate(path, n_wells, args.image_size or args.input_size)
        stacks = [str(path)]
    if not stacks:
        raise InputError("bench train: give --stacks or --synthetic")
    index = data.StackIndex.build(stacks)
    wells = pd.concat(
        [
            pd.DataFrame({"experiment": k[0], "plate": k[1], "well": sorted({w for w, _ in rows})})
            for k, rows in zip(index.keys, index.rows, strict=True)
        ],
        ignore_index=True,
    )
    return index, index.locate(wells)


def _bench_config(args: argparse.Namespace) -> train.TrainConfig:
    """The training config of the benchmarked model, from the command line."""
    return train.TrainConfig.from_dict(
        {
            "backbone": args.backbone,
            "batch_size": args.batch_size,
            "input_size": args.input_size,
            "num_workers": args.num_workers,
            "amp": args.amp,
            "channels_last": args.channels_last,
            "compile": args.compile,
            "mean_teacher": args.mean_teacher,
            "head": args.head,
        }
    )


def _setup(args: argparse.Namespace, rt: train.Runtime, tmpdir: Path, t_start: float) -> _Bench:
    """The trainer (a class per well, fixed normalisation) and its loaders; ``t_start``: when the
    benchmark started, for the start-up cost."""
    index, wells = _bench_wells(args, tmpdir)
    n_classes = max(len(wells), 2)
    labels = np.arange(len(wells)) % n_classes
    cfg = _bench_config(args)
    mean = np.full((len(index.files), 6), 128.0, np.float32)
    std = np.full((len(index.files), 6), 64.0, np.float32)
    mc = models.model_config(cfg, n_classes, n_classes)
    t_model = time.perf_counter()
    trainer = train.Trainer(cfg, mc, rt, mean, std, steps_per_epoch=args.steps)
    # a job's fixed cost: the interpreter and imports until now (the plate written above aside)
    startup_s = _process_age() - (t_model - t_start) + (time.perf_counter() - t_model)
    n_params = models.count_parameters(trainer.student)
    trainer.start_epoch(0)
    b_unl = cfg.unlabelled_per_step() if args.mean_teacher else 0
    if args.mean_teacher and args.unlabelled_batch_size is not None:
        b_unl = args.unlabelled_batch_size
    total_steps = args.steps + args.warmup

    def loader(stream: int, batch: int, label_values):
        ds = data.StackDataset(index.files, wells, label_values, index=index if args.verify else None)
        sampler = data.EpochSampler(len(ds), cfg.seed, stream=stream, total=total_steps * batch)
        return data.make_loader(ds, sampler, batch, cfg.num_workers, rt.cuda, drop_last=True)

    lab_loader = loader(0, args.batch_size, labels)
    unl_loader = loader(1, b_unl, np.full(len(wells), -1)) if b_unl else None
    return _Bench(args, rt, cfg, trainer, n_params, startup_s, b_unl, lab_loader, unl_loader)


def _timed_runs(bench: _Bench) -> dict[str, list[float]]:
    """Warm-up, then the repeated measurements: per kind (model, full, loader, first, ratio) a value
    per repeat."""
    args, rt = bench.args, bench.rt
    # warm-up (cudnn autotuning, worker start) and one batch kept on the device
    it = bench.batches()
    for _ in range(args.warmup):
        lab, unl = next(it)
        bench.trainer.step(lab, unl)
    _sync(rt)
    if rt.cuda:
        torch.cuda.reset_peak_memory_stats(rt.device)
    # Repeated, interleaved: the order alternates each repeat, so drift (clocks, thermal, other
    # load) hits both sides alike; the ratio is taken per repeat (paired) and summarised.
    runs: dict[str, list[float]] = {"model": [], "full": [], "loader": [], "first": [], "ratio": []}
    for r in range(args.repeats):
        order = ("model", "full", "loader") if r % 2 == 0 else ("loader", "full", "model")
        got = {}
        for kind in order:
            if kind == "model":
                got["model"] = bench.model_step(lab, unl)
            elif kind == "full":
                got["full"], got["first"] = bench.full_step()
            else:
                got["loader"] = bench.loader_only()
        got["ratio"] = got["full"] / got["model"]
        for k, v in got.items():
            runs[k].append(v)
    return runs


def _result(bench: _Bench, runs: dict[str, list[float]]) -> dict:
    """The result fields: the setup, then the median, min and max of each measurement."""
    args, rt, cfg = bench.args, bench.rt, bench.cfg
    result = {
        "backbone": args.backbone,
        "parameters": bench.n_params,
        "device": torch.cuda.get_device_name(rt.device) if rt.cuda else "cpu",
        "threads": torch.get_num_threads(),
        "input_size": args.input_size,
        "batch_size": args.batch_size,
        "unlabelled_batch_size": bench.b_unl,
        "steps": args.steps,
        "amp_bf16": bool(cfg.amp and rt.cuda),
        "channels_last": bool(cfg.channels_last and rt.cuda),
        "compile": bool(cfg.compile),
        "num_workers": cfg.num_workers,
        "verify_crc": bool(args.verify),
        "startup_s": bench.startup_s,
        "repeats": args.repeats,
    }
    names = {
        "model": "model_step_images_per_s",
        "full": "full_step_images_per_s",
        "loader": "loader_only_images_per_s",
        "first": "first_batch_s",
        "ratio": "ratio_full_over_model",
    }
    for kind, key in names.items():
        result.update(summarize(key, runs[kind]))
    if rt.cuda:
        result["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated(rt.device) / 2**30
    return result


def _run(args: argparse.Namespace) -> int:
    if args.bench_command != "train":
        raise InputError(f"bench: unknown benchmark {args.bench_command!r}")
    result = bench_train(args)
    for key, value in result.items():
        if key.endswith(("_min", "_max")):
            continue
        if f"{key}_min" in result:
            spread = f"[min {result[key + '_min']:.4g}, max {result[key + '_max']:.4g}]"
            print(f"{key:28s} {value:.4g}  median of {result['repeats']} {spread}")
        else:
            print(f"{key:28s} {value:.4g}" if isinstance(value, float) else f"{key:28s} {value}")
    if args.json:
        write_text(args.json, json.dumps(result, indent=2) + "\n")
    if args.record:
        record(args.record, result, args.mean_teacher)
    return 0


def record(table: str, result: dict, mean_teacher: bool) -> None:
    """Add (or replace) this device's row in the throughput table of ``deepnoise plan``."""
    from deepnoise import plan

    # start-up plus the first batch of each of a job's loaders (workers start per epoch)
    startup = result["startup_s"] + result["first_batch_s"]
    row = {
        "device": result["device"],
        "backbone": result["backbone"],
        "input_size": result["input_size"],
        "mean_teacher": mean_teacher,
        "batch_size": result["batch_size"],
        "unlabelled_batch_size": result["unlabelled_batch_size"],
        "images_per_s": f"{result['full_step_images_per_s']:.4g}",
        "startup_s": f"{startup:.3g}",
        "source": f"deepnoise bench train {time.strftime('%Y-%m-%d')}, {result['threads']} threads",
    }
    plan.record_row(table, row)
    print(f"recorded in {table}: {', '.join(f'{k}={v}' for k, v in row.items())}")


def _at_least_one(text: str) -> int:
    """argparse type of ``--warmup``: the first untimed step also provides the timed batches."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="benchmarks", description=__doc__)
    sub = p.add_subparsers(dest="bench_command", metavar="BENCHMARK", required=True)
    t = sub.add_parser("train", help="full training step vs model step alone", description=__doc__)
    t.add_argument("--backbone", default="legacy_xception", help="timm name or xception_wide")
    t.add_argument("--head", default="arcface", choices=["arcface", "softmax"])
    t.add_argument("--input-size", type=int, default=512)
    t.add_argument("--image-size", type=int, default=None, help="--synthetic image side (default input)")
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    t.add_argument("--warmup", type=_at_least_one, default=3, help="untimed steps first (>= 1)")
    t.add_argument(
        "--repeats",
        type=int,
        default=5,
        help="alternating repeats of each measurement (>= 5 to decide; medians and min/max printed)",
    )
    src = t.add_mutually_exclusive_group(required=True)
    src.add_argument("--stacks", nargs="+", help="HDF5 plate stacks to read")
    src.add_argument("--synthetic", action="store_true", help="write a temporary random plate")
    t.add_argument(
        "--unlabelled-batch-size", type=int, default=None, help="with --mean-teacher (default: batch)"
    )
    t.add_argument("--num-workers", type=int, default=4)
    t.add_argument(
        "--verify",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="verify each site read against its CRC-32, as training does (--no-verify: its cost)",
    )
    t.add_argument("--mean-teacher", action=argparse.BooleanOptionalAction, default=False)
    t.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True, help="bf16 on CUDA")
    t.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    t.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="torch.compile the training forward passes (CUDA only; train.compile)",
    )
    t.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    t.add_argument("--threads", type=int, default=None)
    t.add_argument("--json", help="also write the results as JSON")
    t.add_argument(
        "--record",
        nargs="?",
        const=str(Path(__file__).with_name("throughput.csv")),
        help="add or replace this device's row in deepnoise plan's throughput table (default: the package's)",
    )
    t.set_defaults(func=_run)
