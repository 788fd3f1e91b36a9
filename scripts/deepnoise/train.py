"""Training: ArcFace/softmax student, EMA (mean) teacher, pseudo labels, checkpoints and resume, DDP.

``deepnoise train`` trains one model of one scope (``all`` cell types, or one cell type fine-tuned
from the ``all`` weights via ``--init``) and writes ``weights.pt`` and ``log.csv``. Every epoch a
checkpoint goes to ``--checkpoint-dir``; a restarted job resumes from it and, on CPU with the same
``--threads``, ends with bit-identical weights. Launched with ``torchrun`` (``WORLD_SIZE > 1``) it
trains with DistributedDataParallel; only rank 0 writes.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import logging
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from deepnoise import augment, data, losses, models
from deepnoise.atomic import atomic_path
from deepnoise.errors import InputError
from deepnoise.hparams import TrainConfig, load_hparams  # noqa: F401 (re-exported)
from deepnoise.runtime import (  # noqa: F401 (re-exported)
    Runtime,
    _barrier,
    _visible_gpus,
    ddp_launch_command,
    launch,
    select_device,
    setup_runtime,
)

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "last.pt"
LOCK_NAME = ".lock"
LOG_COLUMNS = [
    "epoch",
    "lr",
    "loss",
    "loss_ce",
    "loss_consistency",
    "loss_pseudo",
    "consistency_weight",
    "val_acc_student",
    "val_acc_teacher",
    "seconds",
    "images_per_s",
]


# ----------------------------------------------------------------------------------------------
# Trainer: one optimisation step, usable by train and bench


def _seed_for(seed: int, *parts: int) -> int:
    value = int(seed)
    for p in parts:
        value = (value * 1_000_003 + int(p) + 1) % (2**62)
    return value


class Trainer:
    """Student, EMA teacher, optimiser, augmentation generator and the training step."""

    def __init__(
        self,
        cfg: TrainConfig,
        model_cfg: dict,
        rt: Runtime,
        norm_mean: np.ndarray,
        norm_std: np.ndarray,
        steps_per_epoch: int,
    ):
        self.cfg, self.model_cfg, self.rt = cfg, model_cfg, rt
        self.steps_per_epoch = max(int(steps_per_epoch), 1)
        torch.manual_seed(cfg.seed)
        self.student = models.build_model(model_cfg, pretrained=cfg.pretrained).to(rt.device)
        self.channels_last = cfg.channels_last and rt.cuda
        if self.channels_last:
            self.student = self.student.to(memory_format=torch.channels_last)
        self.teacher = copy.deepcopy(self.student)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.forward_student = self.student
        if rt.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.forward_student = DistributedDataParallel(
                self.student, device_ids=[rt.local_rank] if rt.cuda else None
            )
        self.optimizer = torch.optim.Adam(
            self.student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=rt.cuda or None
        )
        self.mean = torch.as_tensor(norm_mean, dtype=torch.float32, device=rt.device)
        self.std = torch.as_tensor(norm_std, dtype=torch.float32, device=rt.device)
        self.gen = torch.Generator(device=rt.device)
        self.gen.manual_seed(_seed_for(cfg.seed, rt.rank))
        self.step_count = 0
        self.autocast = cfg.amp and rt.cuda and torch.cuda.is_bf16_supported()
        if cfg.amp and rt.cuda and not self.autocast:
            log.warning("amp: this GPU has no bfloat16 support; training in float32")
        self.crop_scale = tuple(cfg.aug_crop_scale) if cfg.aug_crop_scale is not None else None

    def start_epoch(self, epoch: int) -> float:
        """Set the epoch's learning rate and re-seed the epoch's randomness (resume-safe)."""
        lr = self.cfg.lr_at(epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.gen.manual_seed(_seed_for(self.cfg.seed, self.rt.rank, epoch, 1))
        torch.manual_seed(_seed_for(self.cfg.seed, self.rt.rank, epoch, 2))
        self.student.train()
        self.teacher.train()
        return lr

    def view(self, x: torch.Tensor, norm_idx: torch.Tensor) -> torch.Tensor:
        """A normalised, augmented training view of a uint8 batch already on the device."""
        x = data.normalize_batch(x, norm_idx, self.mean, self.std, self.cfg.norm_jitter, self.gen)
        x = augment.augment_batch(
            x, self.gen, self.cfg.input_size, self.cfg.aug_flips, self.crop_scale, self.cfg.aug_erase_p
        )
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def to_device(self, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(images, norm_idx, labels)`` on the device (a no-op for ``data.device_batches``)."""
        x, norm_idx, labels = batch[0], batch[1], batch[2]
        nb = self.rt.cuda
        return (
            x.to(self.rt.device, non_blocking=nb),
            norm_idx.to(self.rt.device, non_blocking=nb),
            labels.to(self.rt.device, non_blocking=nb),
        )

    def consistency_ramp(self, epoch_float: float) -> float:
        return self.cfg.consistency_weight * losses.sigmoid_rampup(
            epoch_float, self.cfg.consistency_rampup_epochs
        )

    def step(self, labelled, unlabelled=None, epoch_float: float = 0.0) -> dict[str, torch.Tensor]:
        """One optimiser step on device batches ``(uint8 images, norm_idx, labels)``; unlabelled
        labels are pseudo labels (-1: none). Returns detached loss terms."""
        cfg = self.cfg
        x, idx, y = labelled
        n_lab = x.shape[0]
        if unlabelled is not None:
            x = torch.cat([x, unlabelled[0]])
            idx = torch.cat([idx, unlabelled[1]])
            pseudo = unlabelled[2]
        student_in = self.view(x, idx)
        head = self.student.head
        with torch.autocast(self.rt.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            logits = self.forward_student(student_in)
        logits = logits.float()
        loss_ce = F.cross_entropy(head.margin_logits(logits[:n_lab], y), y)
        loss = loss_ce
        zero = loss_ce.detach() * 0.0
        loss_pl, loss_cons = zero, zero
        if unlabelled is not None and cfg.pseudo_weight > 0:
            loss_pl = losses.pseudo_label_loss(head.margin_logits(logits[n_lab:], pseudo), pseudo)
            loss = loss + cfg.pseudo_weight * loss_pl
        weight = self.consistency_ramp(epoch_float) if cfg.mean_teacher else 0.0
        if cfg.mean_teacher:
            teacher_in = self.view(x, idx)
            with (
                torch.no_grad(),
                torch.autocast(self.rt.device.type, dtype=torch.bfloat16, enabled=self.autocast),
            ):
                teacher_logits = self.teacher(teacher_in)
            loss_cons = losses.consistency_loss(logits, teacher_logits.float())
            loss = loss + weight * loss_cons
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        losses.ema_update(
            self.teacher, self.student, losses.ema_decay(self.step_count, cfg.ema_decay, cfg.ema_warmup)
        )
        self.step_count += 1
        return {
            "loss": loss.detach(),
            "loss_ce": loss_ce.detach(),
            "loss_consistency": loss_cons.detach(),
            "loss_pseudo": loss_pl.detach(),
            "consistency_weight": torch.tensor(weight),
        }

    @torch.no_grad()
    def predict_probs(self, net: torch.nn.Module, batch_iter, n_treatments: int, tta: bool = False):
        """Per-well treatment probabilities averaged over both sites (and 8 dihedral views if
        ``tta``), from ``(uint8 (B, 2, 6, H, W), norm_idx, ...)`` batches."""
        return predict_probs(
            net,
            batch_iter,
            self.mean,
            self.std,
            self.rt,
            self.cfg.input_size,
            n_treatments,
            tta,
            amp=self.cfg.amp,
            channels_last=self.cfg.channels_last,
        )


@torch.no_grad()
def predict_probs(
    net: torch.nn.Module,
    batches,
    mean: torch.Tensor,
    std: torch.Tensor,
    rt: Runtime,
    input_size: int,
    n_treatments: int,
    tta: bool,
    amp: bool = True,
    channels_last: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """``(probs (n, n_treatments) float32, well indices)``; softmax over the treatment logits only."""
    was_training = net.training
    net.eval()
    out, order = [], []
    views = range(8) if tta else (0,)
    amp = amp and rt.cuda and torch.cuda.is_bf16_supported()
    for batch in batches:
        x = batch[0].to(rt.device, non_blocking=rt.cuda)
        norm_idx = batch[1].to(rt.device, non_blocking=rt.cuda)
        b = x.shape[0]
        x = data.normalize_batch(x, norm_idx, mean, std)  # (B, 2, 6, H, W)
        x = augment.resize(x.flatten(0, 1), input_size)  # (2B, 6, S, S)
        acc = torch.zeros(b, n_treatments, device=rt.device)
        for k in views:
            v = augment.dihedral(x, k)
            if channels_last and rt.cuda:
                v = v.contiguous(memory_format=torch.channels_last)
            with torch.autocast(rt.device.type, dtype=torch.bfloat16, enabled=amp):
                logits = net(v)
            p = F.softmax(logits.float()[:, :n_treatments], dim=1)
            acc += p.view(b, 2, n_treatments).sum(dim=1)
        out.append((acc / (2 * len(views))).cpu())
        order.append(batch[3])
    net.train(was_training)
    if not out:
        return np.zeros((0, n_treatments), np.float32), np.zeros(0, np.int64)
    return torch.cat(out).numpy().astype(np.float32), torch.cat(order).numpy()


# ----------------------------------------------------------------------------------------------
# Data selection


@dataclass
class TrainData:
    index: data.StackIndex
    labelled: pd.DataFrame
    unlabelled: pd.DataFrame
    validation: pd.DataFrame
    n_classes: int
    n_treatments: int
    n_controls: int


def select_wells(
    sites: pd.DataFrame,
    classes: dict,
    index: data.StackIndex,
    cfg: TrainConfig,
    scope: str,
    val_experiments: list[str],
    pseudo: dict[str, int] | None,
) -> TrainData:
    n_t, n_c = int(classes["n_treatments"]), int(classes["n_controls"])
    n_classes = n_t + n_c if cfg.controls_as_classes else n_t
    wells = data.well_table(sites)
    if scope != "all":
        if scope not in set(wells["cell_type"]):
            raise InputError(f"--scope {scope}: no such cell type in the site table")
        wells = wells[wells["cell_type"] == scope]
    unknown = sorted(set(val_experiments) - set(data.well_table(sites)["experiment"]))
    if unknown:
        raise InputError(f"--val-experiments: unknown experiment(s) {unknown}")
    in_val = wells["experiment"].isin(val_experiments)
    is_train = wells["dataset"] == "train"
    if cfg.controls_as_classes:
        labelled = wells[is_train & ~in_val & (wells["sirna_id"] >= 0)]
    else:
        labelled = wells[is_train & ~in_val & (wells["well_type"] == "treatment")]
    bad = labelled[labelled["sirna_id"] >= n_classes]
    if len(bad):
        raise InputError(f"well {bad['well_id'].iloc[0]}: sirna_id {bad['sirna_id'].iloc[0]} >= {n_classes}")
    unl_mask = wells["dataset"] == "test"
    if cfg.unlabelled_include_validation:
        unl_mask |= in_val
    unlabelled = wells[unl_mask].copy()
    pseudo = pseudo or {}
    unlabelled["pseudo"] = [int(pseudo.get(w, -1)) for w in unlabelled["well_id"]]
    bad = unlabelled[unlabelled["pseudo"] >= n_classes]
    if len(bad):
        raise InputError(f"pseudo labels: well {bad['well_id'].iloc[0]} has sirna_id >= {n_classes}")
    validation = wells[in_val & (wells["well_type"] == "treatment") & (wells["sirna_id"] >= 0)]
    if len(labelled) == 0:
        raise InputError(f"scope {scope}: no labelled training wells")
    return TrainData(
        index,
        index.locate(labelled.reset_index(drop=True)),
        index.locate(unlabelled.reset_index(drop=True)),
        index.locate(validation.reset_index(drop=True)),
        n_classes,
        n_t,
        n_c,
    )


# ----------------------------------------------------------------------------------------------
# Checkpoints


def rng_state() -> dict:
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "numpy_has_gauss": int(np_state[3]),
        "numpy_cached_gauss": float(np_state[4]),
        "python": torch.tensor(py_state[1], dtype=torch.int64),
        "python_version": int(py_state[0]),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(
        (
            "MT19937",
            state["numpy_keys"].numpy().astype(np.uint32),
            state["numpy_pos"],
            state["numpy_has_gauss"],
            state["numpy_cached_gauss"],
        )
    )
    random.setstate((state["python_version"], tuple(int(v) for v in state["python"].tolist()), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _cpu_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def save_checkpoint(path: Path, trainer: Trainer, epoch: int, rows: list[dict], extra: dict) -> None:
    state = {
        "epoch": int(epoch),
        "step_count": int(trainer.step_count),
        "hparams": dataclasses.asdict(trainer.cfg),
        "model_config": trainer.model_cfg,
        "student": _cpu_state(trainer.student),
        "teacher": _cpu_state(trainer.teacher),
        "optimizer": trainer.optimizer.state_dict(),
        "scheduler": {"last_epoch": int(epoch), "lr": trainer.cfg.lr_at(epoch)},
        "sampler": {"seed": int(trainer.cfg.seed), "epoch": int(epoch)},
        "augment_generator": trainer.gen.get_state().cpu(),
        "rng": rng_state(),
        "log": rows,
        **extra,
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


# hparams that do not change the trained weights: a checkpoint resumes across them
RESUME_IGNORED = ("num_workers", "val_batch_size")


def _resume_key(hparams: dict) -> dict:
    return {k: v for k, v in hparams.items() if k not in RESUME_IGNORED}


def inputs_fingerprint(files: list[str | None], extra: dict) -> str:
    """Identity of a run's inputs: (path, size, mtime) of every input file plus ``extra``. A
    checkpoint of other inputs (new stacks, pseudo labels, init weights) is not resumed."""
    import hashlib

    parts = [json.dumps(extra, sort_keys=True)]
    for f in files:
        if f:
            st = os.stat(f)
            parts.append(f"{f}|{st.st_size}|{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


CHECKPOINT_KEYS = (
    "epoch",
    "step_count",
    "hparams",
    "model_config",
    "student",
    "teacher",
    "optimizer",
    "augment_generator",
    "rng",
    "log",
    "inputs",
)


def load_checkpoint(path: Path) -> dict:
    """A resume checkpoint; ``InputError`` naming the file when it cannot be used (never skipped:
    silently restarting would throw away the epochs it holds)."""
    hint = f"delete it to train this model from scratch: rm {path}"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a corrupt checkpoint names the file
        raise InputError(
            f"{path}: cannot read the resume checkpoint (truncated or corrupt: {exc}); {hint}"
        ) from exc
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise InputError(f"{path}: not a deepnoise resume checkpoint (lacks {missing}); {hint}")
    return state


@contextlib.contextmanager
def checkpoint_lock(checkpoint_dir: str | os.PathLike):
    """Hold an exclusive lock on a checkpoint directory for the whole training run.

    A second training of the same model and round (a rerun started while an orphaned job still
    runs) fails at once instead of interleaving its checkpoints with the first. The kernel drops the
    lock when the process dies, whatever the signal, so a killed job never leaves a stale lock.
    File systems without ``flock`` (some Lustre mounts) only get a warning.
    """
    import fcntl
    import socket

    directory = Path(checkpoint_dir)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_NAME
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            raise InputError(
                f"{directory}: checkpoint directory in use by {holder}; two trainings of the same "
                "model would overwrite each other's checkpoints. Wait for it or kill it, then rerun"
            ) from exc
        except OSError as exc:
            log.warning("%s: cannot lock (%s); continuing without a lock", path, exc)
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        fh.flush()
        yield


def load_weights(path: str | os.PathLike) -> dict:
    """A ``weights.pt`` file (``model_config``, ``student``, ``teacher``, ``hparams``, ...)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise InputError(
            f"{path}: cannot read weights (truncated or corrupt: {exc}); delete it and rerun: "
            "Snakemake retrains it"
        ) from exc
    if not isinstance(state, dict):
        raise InputError(f"{path}: not a deepnoise weights file")
    for key in ("model_config", "teacher", "student"):
        if key not in state:
            raise InputError(f"{path}: weights lack {key!r}")
    return state


# ----------------------------------------------------------------------------------------------
# The training run


def _fmt(v: Any) -> Any:
    return round(v, 8) if isinstance(v, float) else v


def write_log(path: str | os.PathLike, rows: list[dict]) -> None:
    with atomic_path(path) as tmp:
        pd.DataFrame(rows, columns=LOG_COLUMNS).to_csv(tmp, index=False)


def _accuracy(probs: np.ndarray, order: np.ndarray, labels: np.ndarray) -> float:
    if len(order) == 0:
        return float("nan")
    return float((probs.argmax(axis=1) == labels[order]).mean())


def run_training(
    *,
    sites: str,
    classes: str,
    stacks: list[str],
    stats: list[str],
    hparams: TrainConfig,
    scope: str,
    val_experiments: list[str],
    out_weights: str,
    out_log: str,
    checkpoint_dir: str,
    init: str | None = None,
    pseudo_labels: str | None = None,
    device: str = "auto",
    threads: int | None = None,
    fail_after_epoch: int | None = None,
) -> None:
    """Train (or resume) one model; ``fail_after_epoch`` raises after that epoch's checkpoint (tests)."""
    cfg = hparams
    rt = setup_runtime(device, threads)
    # one training per checkpoint directory (see checkpoint_lock); rank 0 holds it for all ranks
    with checkpoint_lock(checkpoint_dir) if rt.is_main else contextlib.nullcontext():
        if rt.cuda and cfg.cudnn_benchmark:
            torch.backends.cudnn.benchmark = True
        random.seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)
        site_table = data.read_sites(sites)
        class_info = data.read_classes(classes)
        index = data.StackIndex.build(stacks)
        pseudo = data.read_pseudo_labels(pseudo_labels) if pseudo_labels else None
        td = select_wells(site_table, class_info, index, cfg, scope, list(val_experiments), pseudo)
        mean, std = data.normalization_arrays(stats, cfg.normalization, index.keys)

        n_lab = len(td.labelled)
        per_rank = -(-n_lab // rt.world)
        if per_rank < 2:
            raise InputError(f"scope {scope}: {n_lab} labelled wells, too few for {rt.world} process(es)")
        b_lab = min(cfg.batch_size, per_rank)
        if b_lab < cfg.batch_size:
            log.warning(
                "scope %s: %d labelled wells; batch size %d instead of %d",
                scope,
                n_lab,
                b_lab,
                cfg.batch_size,
            )
        b_unl = cfg.unlabelled_per_step(b_lab)
        steps = per_rank // b_lab
        use_unl = len(td.unlabelled) > 0 and b_unl > 0 and (cfg.mean_teacher or pseudo is not None)
        mc = models.model_config(cfg, td.n_classes, td.n_treatments)
        trainer = Trainer(cfg, mc, rt, mean, std, steps)

        ckpt_path = Path(checkpoint_dir) / CHECKPOINT_NAME
        fingerprint = inputs_fingerprint(
            [sites, classes, *stacks, *stats, init, pseudo_labels],
            {"scope": scope, "val_experiments": sorted(val_experiments), "world": rt.world},
        )
        start_epoch, rows = 0, []
        if ckpt_path.exists():
            ckpt = load_checkpoint(ckpt_path)
            if (
                _resume_key(ckpt.get("hparams", {})) != _resume_key(dataclasses.asdict(cfg))
                or ckpt.get("model_config") != mc
                or ckpt.get("inputs") != fingerprint
            ):
                log.warning("%s: other hparams or inputs; starting from scratch", ckpt_path)
            else:
                trainer.student.load_state_dict(ckpt["student"])
                trainer.teacher.load_state_dict(ckpt["teacher"])
                trainer.optimizer.load_state_dict(ckpt["optimizer"])
                trainer.step_count = int(ckpt["step_count"])
                trainer.gen.set_state(ckpt["augment_generator"])  # a CPU ByteTensor, CUDA too
                set_rng_state(ckpt["rng"])
                start_epoch, rows = int(ckpt["epoch"]) + 1, list(ckpt["log"])
                log.info("resuming from %s after epoch %d", ckpt_path, start_epoch - 1)
        elif init:
            state = load_weights(init)
            init_mc = state["model_config"]
            for key in ("backbone", "head", "n_classes"):
                if init_mc.get(key) != mc[key]:
                    raise InputError(f"--init {init}: model_config {key} {init_mc.get(key)!r} != {mc[key]!r}")
            trainer.student.load_state_dict(state["teacher"])
            trainer.teacher.load_state_dict(state["teacher"])

        pin = rt.cuda
        lab_ds = data.StackDataset(index.files, td.labelled, td.labelled["sirna_id"].to_numpy(), index=index)
        lab_sampler = data.EpochSampler(
            n_lab, cfg.seed, stream=0, total=steps * b_lab * rt.world, rank=rt.rank, world=rt.world
        )
        lab_loader = data.make_loader(lab_ds, lab_sampler, b_lab, cfg.num_workers, pin, drop_last=True)
        unl_loader = unl_sampler = None
        if use_unl:
            unl_ds = data.StackDataset(
                index.files, td.unlabelled, td.unlabelled["pseudo"].to_numpy(), index=index
            )
            unl_sampler = data.EpochSampler(
                len(td.unlabelled),
                cfg.seed,
                stream=1,
                total=steps * b_unl * rt.world,
                rank=rt.rank,
                world=rt.world,
            )
            unl_loader = data.make_loader(unl_ds, unl_sampler, b_unl, cfg.num_workers, pin, drop_last=True)
        val_loader = None
        val_labels = td.validation["sirna_id"].to_numpy()
        if len(td.validation) and rt.is_main:
            val_ds = data.StackDataset(index.files, td.validation, val_labels, index=index)
            val_sampler = data.EpochSampler(len(val_ds), cfg.seed, shuffle=False, random_site=False)
            val_loader = data.make_loader(
                val_ds, val_sampler, cfg.val_batch_size, cfg.num_workers, pin, False
            )

        Path(checkpoint_dir).mkdir(parents=True, exist_ok=True)
        for epoch in range(start_epoch, cfg.epochs):
            t0 = time.perf_counter()
            lr = trainer.start_epoch(epoch)
            lab_sampler.set_epoch(epoch)
            unl_iter = None
            if unl_loader is not None:
                unl_sampler.set_epoch(epoch)
                unl_iter = data.device_batches(unl_loader, rt.device)
            sums: dict[str, torch.Tensor] = {}
            n_images = 0
            for i, batch in enumerate(data.device_batches(lab_loader, rt.device)):
                lab = trainer.to_device(batch)
                unl = trainer.to_device(next(unl_iter)) if unl_iter is not None else None
                terms = trainer.step(lab, unl, epoch + i / steps)
                for k, v in terms.items():
                    sums[k] = sums.get(k, 0.0) + v
                n_images += lab[0].shape[0] + (unl[0].shape[0] if unl is not None else 0)
            seconds_train = time.perf_counter() - t0
            row: dict[str, Any] = {"epoch": epoch, "lr": lr}
            row.update({k: float(v) / steps for k, v in sums.items()})
            if val_loader is not None:
                for name, net in (("student", trainer.student), ("teacher", trainer.teacher)):
                    probs, order = trainer.predict_probs(net, val_loader, td.n_treatments)
                    row[f"val_acc_{name}"] = _accuracy(probs, order, val_labels)
            else:
                row["val_acc_student"] = row["val_acc_teacher"] = float("nan")
            row["seconds"] = time.perf_counter() - t0
            row["images_per_s"] = n_images * rt.world / max(seconds_train, 1e-9)
            rows.append({k: _fmt(float(v)) if k != "epoch" else int(v) for k, v in row.items()})
            if rt.is_main:
                log.info(
                    "epoch %d lr %.2e loss %.4f val acc student %.4f teacher %.4f %.1fs %.0f img/s",
                    epoch,
                    lr,
                    row.get("loss", math.nan),
                    row["val_acc_student"],
                    row["val_acc_teacher"],
                    row["seconds"],
                    row["images_per_s"],
                )
            if rt.is_main:
                save_checkpoint(ckpt_path, trainer, epoch, rows, {"scope": scope, "inputs": fingerprint})
            _barrier(rt)
            if fail_after_epoch is not None and epoch == fail_after_epoch:
                raise RuntimeError(f"injected failure after epoch {epoch}")

        if rt.is_main:
            weights = {
                "model_config": mc,
                "hparams": dataclasses.asdict(cfg),
                "student": _cpu_state(trainer.student),
                "teacher": _cpu_state(trainer.teacher),
                "classes": {"n_treatments": td.n_treatments, "n_controls": td.n_controls},
                "scope": scope,
                "epochs": int(cfg.epochs),
                "val_experiments": list(val_experiments),
            }
            with atomic_path(out_weights) as tmp:
                torch.save(weights, tmp)
            write_log(out_log, rows)
        _barrier(rt)


def plot_log(log_csv: str | os.PathLike, png: str | os.PathLike) -> None:
    """Training curves of a ``log.csv`` (losses, validation accuracy, lr) to a PNG, atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    df = pd.read_csv(log_csv)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for col in ("loss", "loss_ce", "loss_consistency", "loss_pseudo"):
        if col in df and df[col].notna().any():
            axes[0].plot(df["epoch"], df[col], label=col)
    axes[0].set_title("losses")
    axes[0].legend(fontsize=7)
    for col in ("val_acc_student", "val_acc_teacher"):
        if col in df and df[col].notna().any():
            axes[1].plot(df["epoch"], df[col], label=col.removeprefix("val_acc_"))
    axes[1].set_title("validation accuracy")
    axes[1].legend(fontsize=7)
    axes[2].plot(df["epoch"], df["lr"])
    axes[2].set_yscale("log")
    axes[2].set_title("learning rate")
    for ax in axes:
        ax.set_xlabel("epoch")
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


def _main(args: argparse.Namespace) -> int:
    cfg = load_hparams(args.hparams)
    # claims this job's GPUs; several processes (GPUs, or DEEPNOISE_DDP_PROCESSES): DDP via torchrun
    rc = launch(sys.argv[1:], args.device)
    if rc is not None:
        return rc
    run_training(
        sites=args.sites,
        classes=args.classes,
        stacks=args.stacks,
        stats=args.stats,
        hparams=cfg,
        scope=args.scope,
        val_experiments=args.val_experiments,
        out_weights=args.out_weights,
        out_log=args.out_log,
        checkpoint_dir=args.checkpoint_dir,
        init=args.init,
        pseudo_labels=args.pseudo_labels,
        device=args.device,
        threads=args.threads,
    )
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="train one model of one scope (resumable)", description=__doc__)
    p.add_argument("--sites", required=True, help="site table CSV")
    p.add_argument("--classes", required=True, help="classes.json")
    p.add_argument("--stacks", nargs="+", required=True, help="HDF5 plate stacks")
    p.add_argument("--stats", nargs="+", required=True, help="statistics JSON files")
    p.add_argument("--hparams", required=True, help="TrainConfig as inline JSON or a JSON file")
    p.add_argument("--scope", required=True, help="'all' or a cell type")
    p.add_argument("--val-experiments", nargs="*", default=[], help="held-out experiments")
    p.add_argument("--init", help="weights.pt to start from (teacher weights)")
    p.add_argument("--pseudo-labels", help="pseudo-label CSV of the previous round")
    p.add_argument("--out-weights", required=True)
    p.add_argument("--out-log", required=True)
    p.add_argument("--checkpoint-dir", required=True)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.set_defaults(func=_main)
