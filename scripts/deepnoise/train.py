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

from deepnoise import atomic, augment, checkpoint, data, inference, losses, metadata, models, pseudo
from deepnoise.atomic import atomic_path
from deepnoise.errors import InputError
from deepnoise.hparams import (  # noqa: F401
    RUNTIME_KEYS,
    TrainConfig,
    add_runtime_arguments,
    load_hparams,
    with_runtime,
)
from deepnoise.runtime import (  # noqa: F401 (re-exported)
    Runtime,
    _barrier,
    _visible_gpus,
    ddp_launch_command,
    launch,
    select_device,
    setup_runtime,
)
from deepnoise.weights import load_weights, save_weights

log = logging.getLogger(__name__)

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
    "ema_decay",
    "seconds",
    "images_per_s",
]


# ----------------------------------------------------------------------------------------------
# Trainer: the networks, the optimiser and one optimisation step (also used by `deepnoise bench`)


def _seed_for(seed: int, *parts: int) -> int:
    value = int(seed)
    for p in parts:
        value = (value * 1_000_003 + int(p) + 1) % (2**62)
    return value


def round_seed(seed: int, round_: int) -> int:
    """The seed of pseudo-label round ``round_``: round 0 keeps the configured seed, each later round
    has its own, so a round never replays the previous round's initialisation, sampling and
    augmentation."""
    return int(seed) if int(round_) == 0 else _seed_for(seed, 7919, round_) % (2**31)


class Trainer:
    """Student, EMA teacher (only with ``mean_teacher``), optimiser, augmentation generator and the
    training step."""

    def __init__(
        self,
        cfg: TrainConfig,
        model_cfg: dict,
        rt: Runtime,
        norm_mean: np.ndarray,
        norm_std: np.ndarray,
        steps_per_epoch: int,
        soft_targets: np.ndarray | None = None,
    ):
        self.cfg, self.model_cfg, self.rt = cfg, model_cfg, rt
        self.steps_per_epoch = max(int(steps_per_epoch), 1)
        self.total_steps = self.steps_per_epoch * int(cfg.epochs)
        torch.manual_seed(cfg.seed)
        self.student = models.build_model(model_cfg, pretrained=cfg.pretrained).to(rt.device)
        self.channels_last = cfg.channels_last and rt.cuda
        if self.channels_last:
            self.student = self.student.to(memory_format=torch.channels_last)
        # Without the mean teacher there is no teacher at all: the student is trained, selected,
        # saved, fine-tuned and predicts.
        self.teacher: torch.nn.Module | None = None
        if cfg.mean_teacher:
            self.teacher = copy.deepcopy(self.student)
            for p in self.teacher.parameters():
                p.requires_grad_(False)
        self.forward_student = self.student
        if rt.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.forward_student = DistributedDataParallel(
                self.student, device_ids=[rt.local_rank] if rt.cuda else None
            )
        self.forward_teacher = self.teacher
        if cfg.compile:
            self.compile_forwards()
        self.optimizer = torch.optim.Adam(
            self.student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=rt.cuda or None
        )
        self.mean = torch.as_tensor(norm_mean, dtype=torch.float32, device=rt.device)
        self.std = torch.as_tensor(norm_std, dtype=torch.float32, device=rt.device)
        # soft pseudo-label targets (rows indexed by the unlabelled batch's labels), padded to n_classes
        self.soft_targets = None
        if soft_targets is not None:
            padded = np.zeros((len(soft_targets), int(model_cfg["n_classes"])), np.float32)
            padded[:, : soft_targets.shape[1]] = soft_targets
            self.soft_targets = torch.as_tensor(padded, device=rt.device)
        self.gen = torch.Generator(device=rt.device)
        self.gen.manual_seed(_seed_for(cfg.seed, rt.rank))
        self.step_count = 0
        self.last_decay = float("nan")
        self.autocast = cfg.amp and rt.cuda and torch.cuda.is_bf16_supported()
        if cfg.amp and rt.cuda and not self.autocast:
            log.warning("amp: this GPU has no bfloat16 support; training in float32")
        self.crop_scale = tuple(cfg.aug_crop_scale) if cfg.aug_crop_scale is not None else None

    # -- the networks
    def networks(self) -> list[tuple[str, torch.nn.Module]]:
        return [("student", self.student)] + ([("teacher", self.teacher)] if self.teacher is not None else [])

    @property
    def selected_name(self) -> str:
        """The network that is validated for selection, saved as ``model`` and predicts."""
        return "teacher" if self.teacher is not None else "student"

    @property
    def selected_net(self) -> torch.nn.Module:
        return self.teacher if self.teacher is not None else self.student

    def init_from(self, model_state: dict) -> None:
        """Start from a trained model (``--init``): student and teacher both."""
        for _, net in self.networks():
            net.load_state_dict(model_state)

    def state_dict(self) -> dict:
        return {
            "step_count": int(self.step_count),
            "student": cpu_state(self.student),
            "teacher": cpu_state(self.teacher) if self.teacher is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "augment_generator": self.gen.get_state().cpu(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.student.load_state_dict(state["student"])
        if self.teacher is not None:
            self.teacher.load_state_dict(state["teacher"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step_count = int(state["step_count"])
        self.gen.set_state(state["augment_generator"])  # a CPU ByteTensor, CUDA too

    # -- one step
    def start_epoch(self, epoch: int) -> float:
        """Set the epoch's learning rate and re-seed the epoch's randomness (resume-safe)."""
        lr = self.cfg.lr_at(epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.gen.manual_seed(_seed_for(self.cfg.seed, self.rt.rank, epoch, 1))
        torch.manual_seed(_seed_for(self.cfg.seed, self.rt.rank, epoch, 2))
        for _, net in self.networks():
            net.train()
        return lr

    def compile_forwards(self) -> None:
        """``train.compile``: the training forward passes through ``torch.compile`` (the modules,
        their parameters and the saved state dicts stay the uncompiled ones)."""
        if not self.rt.cuda:
            raise InputError(
                "train.compile: true needs a CUDA device; torch.compile is not used for CPU training "
                "(set train.compile: false, or run the job on a GPU)"
            )
        self.forward_student = torch.compile(self.forward_student)
        if self.teacher is not None:
            self.forward_teacher = torch.compile(self.teacher)

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

    def pseudo_loss(self, logits: torch.Tensor, pseudo: torch.Tensor) -> torch.Tensor:
        """Hard: cross-entropy (with the head's margin) on wells with a label >= 0; soft: the paper's
        L_pSoftmax, cross-entropy against the previous round's averaged teacher probabilities."""
        if self.soft_targets is not None:
            return losses.soft_pseudo_label_loss(logits, pseudo, self.soft_targets)
        return losses.pseudo_label_loss(self.student.head.margin_logits(logits, pseudo), pseudo)

    def step(self, labelled, unlabelled=None, epoch_float: float = 0.0) -> dict[str, torch.Tensor]:
        """One optimiser step on device batches ``(uint8 images, norm_idx, labels)``; unlabelled
        labels are pseudo labels (-1: none; rows of ``soft_targets`` in soft mode). Returns detached
        loss terms."""
        cfg = self.cfg
        x, idx, y = labelled
        n_lab = x.shape[0]
        if unlabelled is not None:
            x = torch.cat([x, unlabelled[0]])
            idx = torch.cat([idx, unlabelled[1]])
            pseudo = unlabelled[2]
        student_in = self.view(x, idx)
        with torch.autocast(self.rt.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            logits = self.forward_student(student_in)
        logits = logits.float()
        loss_ce = F.cross_entropy(self.student.head.margin_logits(logits[:n_lab], y), y)
        loss = loss_ce
        zero = loss_ce.detach() * 0.0
        loss_pl, loss_cons = zero, zero
        if unlabelled is not None and cfg.pseudo_weight > 0:
            loss_pl = self.pseudo_loss(logits[n_lab:], pseudo)
            loss = loss + cfg.pseudo_weight * loss_pl
        weight = self.consistency_ramp(epoch_float) if self.teacher is not None else 0.0
        if self.teacher is not None:
            teacher_in = self.view(x, idx)
            with (
                torch.no_grad(),
                torch.autocast(self.rt.device.type, dtype=torch.bfloat16, enabled=self.autocast),
            ):
                teacher_logits = self.forward_teacher(teacher_in)
            loss_cons = losses.consistency_loss(logits, teacher_logits.float())
            loss = loss + weight * loss_cons
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if self.teacher is not None:
            self.last_decay = losses.ema_decay(
                self.step_count, cfg.ema_decay, cfg.ema_warmup, self.total_steps, cfg.ema_max_window
            )
            losses.ema_update(self.teacher, self.student, self.last_decay)
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
        """Per-well treatment probabilities of ``net`` (see ``inference.predict_probs``)."""
        return inference.predict_probs(
            net,
            batch_iter,
            self.mean,
            self.std,
            self.rt.device,
            self.cfg.input_size,
            n_treatments,
            tta,
            amp=self.cfg.amp,
            channels_last=self.cfg.channels_last,
        )


def cpu_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


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
    soft: bool = False,
) -> TrainData:
    """Labelled, unlabelled and validation wells of ``scope``. ``pseudo`` maps unlabelled wells to a
    hard label (``soft=False``) or to a row of the soft-target table (``soft=True``); -1: none."""
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
    if not soft:
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
# Loaders


@dataclass
class Loaders:
    steps: int
    labelled: Any
    labelled_sampler: data.EpochSampler
    unlabelled: Any = None
    unlabelled_sampler: data.EpochSampler | None = None
    validation: Any = None
    val_labels: np.ndarray | None = None


def batch_sizes(cfg: TrainConfig, n_lab: int, world: int, scope: str) -> tuple[int, int, int]:
    """``(labelled per step, unlabelled per step, steps per epoch)`` for ``n_lab`` labelled wells."""
    per_rank = -(-n_lab // world)
    if per_rank < 2:
        raise InputError(f"scope {scope}: {n_lab} labelled wells, too few for {world} process(es)")
    b_lab = min(cfg.batch_size, per_rank)
    if b_lab < cfg.batch_size:
        log.warning(
            "scope %s: %d labelled wells; batch size %d instead of %d", scope, n_lab, b_lab, cfg.batch_size
        )
    return b_lab, cfg.unlabelled_per_step(b_lab), per_rank // b_lab


def make_loaders(
    cfg: TrainConfig, td: TrainData, rt: Runtime, b_lab: int, b_unl: int, steps: int, use_unl: bool
) -> Loaders:
    index, pin = td.index, rt.cuda
    lab_ds = data.StackDataset(index.files, td.labelled, td.labelled["sirna_id"].to_numpy(), index=index)
    lab_sampler = data.EpochSampler(
        len(td.labelled), cfg.seed, stream=0, total=steps * b_lab * rt.world, rank=rt.rank, world=rt.world
    )
    out = Loaders(
        steps, data.make_loader(lab_ds, lab_sampler, b_lab, cfg.num_workers, pin, drop_last=True), lab_sampler
    )
    if use_unl:
        unl_ds = data.StackDataset(
            index.files, td.unlabelled, td.unlabelled["pseudo"].to_numpy(), index=index
        )
        out.unlabelled_sampler = data.EpochSampler(
            len(td.unlabelled),
            cfg.seed,
            stream=1,
            total=steps * b_unl * rt.world,
            rank=rt.rank,
            world=rt.world,
        )
        out.unlabelled = data.make_loader(
            unl_ds, out.unlabelled_sampler, b_unl, cfg.num_workers, pin, drop_last=True
        )
    out.val_labels = td.validation["sirna_id"].to_numpy()
    if len(td.validation) and rt.is_main:
        val_ds = data.StackDataset(index.files, td.validation, out.val_labels, index=index)
        val_sampler = data.EpochSampler(len(val_ds), cfg.seed, shuffle=False, random_site=False)
        out.validation = data.make_loader(
            val_ds, val_sampler, cfg.val_batch_size, cfg.num_workers, pin, False
        )
    return out


# ----------------------------------------------------------------------------------------------
# The training run: resume or init, epochs, selection, weights


def write_log(path: str | os.PathLike, rows: list[dict]) -> None:
    with atomic_path(path) as tmp:
        pd.DataFrame(rows, columns=LOG_COLUMNS).to_csv(tmp, index=False)


def _fmt(v: Any) -> Any:
    return round(v, 8) if isinstance(v, float) else v


@dataclass
class Best:
    """The selected network's state at its best validation epoch so far."""

    epoch: int
    val_acc: float
    model: dict

    def as_record(self) -> dict:
        return {"epoch": self.epoch, "val_acc": self.val_acc, "model": self.model}


def resume_or_init(
    trainer: Trainer,
    ckpt_path: Path,
    mc: dict,
    fingerprint: str,
    init: str | None,
    rt: Runtime,
) -> tuple[int, list[dict], Best | None]:
    """``(first epoch, log rows, best so far)``. A checkpoint of this recipe and these input contents
    is resumed; any other is moved aside, and the run starts as a fresh one would: from ``--init``
    when given (a fine-tune, a warm-started round), else from the backbone's initialisation."""
    if ckpt_path.exists():
        ckpt = checkpoint.load_checkpoint(ckpt_path)
        why = checkpoint.mismatch(ckpt, dataclasses.asdict(trainer.cfg), mc, fingerprint)
        if why is None:
            trainer.load_state_dict(ckpt["trainer"])
            checkpoint.set_rng_state(ckpt["rng"])
            best = Best(**ckpt["best"]) if ckpt.get("best") else None
            log.info("resuming from %s after epoch %d", ckpt_path, int(ckpt["epoch"]))
            return int(ckpt["epoch"]) + 1, list(ckpt["log"]), best
        _barrier(rt)  # every rank has read it before rank 0 moves it
        if rt.is_main:
            checkpoint.set_aside(ckpt_path, why)
    if init:
        state = load_weights(init)
        for key in ("backbone", "head", "n_classes"):
            if state["model_config"].get(key) != mc[key]:
                raise InputError(
                    f"--init {init}: model_config {key} {state['model_config'].get(key)!r} != {mc[key]!r}"
                )
        trainer.init_from(state["model"])
        log.info(
            "starting from --init %s (%s of epoch %s)",
            init,
            state["selected"]["net"],
            state["selected"]["epoch"],
        )
    return 0, [], None


def train_one_epoch(trainer: Trainer, loaders: Loaders, epoch: int) -> tuple[dict, int, float]:
    """``(mean loss terms, images seen, seconds)`` of one epoch."""
    t0 = time.perf_counter()
    loaders.labelled_sampler.set_epoch(epoch)
    unl_iter = None
    if loaders.unlabelled is not None:
        loaders.unlabelled_sampler.set_epoch(epoch)
        unl_iter = data.device_batches(loaders.unlabelled, trainer.rt.device)
    sums: dict[str, torch.Tensor] = {}
    n_images = 0
    for i, batch in enumerate(data.device_batches(loaders.labelled, trainer.rt.device)):
        lab = trainer.to_device(batch)
        unl = trainer.to_device(next(unl_iter)) if unl_iter is not None else None
        for k, v in trainer.step(lab, unl, epoch + i / loaders.steps).items():
            sums[k] = sums.get(k, 0.0) + v
        n_images += lab[0].shape[0] + (unl[0].shape[0] if unl is not None else 0)
    return {k: float(v) / loaders.steps for k, v in sums.items()}, n_images, time.perf_counter() - t0


def validate(trainer: Trainer, loaders: Loaders, n_treatments: int) -> dict[str, float]:
    """Validation accuracy of the student and, with the mean teacher, of the teacher (NaN: none)."""
    out = {"val_acc_student": float("nan"), "val_acc_teacher": float("nan")}
    if loaders.validation is not None:
        for name, net in trainer.networks():
            probs, order = trainer.predict_probs(net, loaders.validation, n_treatments)
            out[f"val_acc_{name}"] = inference.accuracy(probs, order, loaders.val_labels)
    return out


def update_best(best: Best | None, trainer: Trainer, epoch: int, scores: dict) -> Best | None:
    """The paper's model selection: keep the selected network (the teacher with the mean teacher)
    of the epoch with the highest validation accuracy; a tie goes to the later epoch."""
    score = scores[f"val_acc_{trainer.selected_name}"]
    if math.isnan(score):
        return best
    if best is None or score >= best.val_acc:
        return Best(epoch, float(score), cpu_state(trainer.selected_net))
    return best


def weights_record(
    trainer: Trainer, td: TrainData, best: Best | None, scope: str, val: list[str], round_: int
) -> dict:
    cfg = trainer.cfg
    if best is not None:
        model, selected = (
            best.model,
            {"epoch": best.epoch, "val_acc": best.val_acc, "rule": "best validation"},
        )
    else:
        model = cpu_state(trainer.selected_net)
        selected = {"epoch": int(cfg.epochs) - 1, "val_acc": float("nan"), "rule": "last epoch"}
    settings = dataclasses.asdict(cfg)
    return {
        "model_config": trainer.model_cfg,
        # the recipe; the runtime knobs apart, so that they never make two equal models' files differ
        "hparams": {k: v for k, v in settings.items() if k not in RUNTIME_KEYS},
        "runtime": {k: settings[k] for k in RUNTIME_KEYS},
        "model": model,
        "student": cpu_state(trainer.student),
        "teacher": cpu_state(trainer.teacher) if trainer.teacher is not None else None,
        "selected": {"net": trainer.selected_name, **selected},
        "classes": {"n_treatments": td.n_treatments, "n_controls": td.n_controls},
        "scope": scope,
        "round": int(round_),
        "epochs": int(cfg.epochs),
        "val_experiments": list(val),
    }


def read_pseudo(hard: str | None, soft: list[str] | None) -> tuple[dict[str, int] | None, np.ndarray | None]:
    """``(well -> label or soft-target row, soft-target table)`` of ``--pseudo-labels`` (hard, the
    selected rows of a pseudo-label CSV) or ``--soft-targets`` (ensemble npz files)."""
    if hard and soft:
        raise InputError("--pseudo-labels and --soft-targets: give one, not both")
    if hard:
        return pseudo.read_hard_labels(hard), None
    if soft:
        wells, probs = pseudo.read_soft_targets(soft)
        return {w: i for i, w in enumerate(wells)}, probs
    return None, None


@dataclass
class Setup:
    """What one training run works on: the scope's wells, the trainer, the batch sizes per step."""

    td: TrainData
    trainer: Trainer
    b_lab: int  # labelled wells per batch
    b_unl: int  # unlabelled wells per batch
    steps: int  # steps per epoch
    use_unl: bool  # unlabelled wells feed the consistency or pseudo-label loss


def setup_training(
    cfg: TrainConfig,
    rt: Runtime,
    *,
    sites: str,
    classes: str,
    stacks: list[str],
    stats: list[str],
    scope: str,
    val_experiments: list[str],
    pseudo_labels: str | None,
    soft_targets: list[str] | None,
) -> Setup:
    """The wells of ``scope``, their normalisation and a freshly initialised trainer."""
    index = data.StackIndex.build(stacks)
    targets, soft_table = read_pseudo(pseudo_labels, soft_targets)
    td = select_wells(
        metadata.read_sites(sites),
        data.read_classes(classes),
        index,
        cfg,
        scope,
        list(val_experiments),
        targets,
        soft=soft_table is not None,
    )
    mean, std = data.normalization_arrays(stats, cfg.normalization, index.keys)
    b_lab, b_unl, steps = batch_sizes(cfg, len(td.labelled), rt.world, scope)
    use_unl = len(td.unlabelled) > 0 and b_unl > 0 and (cfg.mean_teacher or targets is not None)
    mc = models.model_config(cfg, td.n_classes, td.n_treatments)
    trainer = Trainer(cfg, mc, rt, mean, std, steps, soft_targets=soft_table)
    return Setup(td, trainer, b_lab, b_unl, steps, use_unl)


def run_epoch(trainer: Trainer, loaders: Loaders, epoch: int, n_treatments: int) -> tuple[dict, dict]:
    """One epoch of training and validation: ``(log row, validation scores)``; rank 0 logs it."""
    t0 = time.perf_counter()
    lr = trainer.start_epoch(epoch)
    terms, n_images, seconds_train = train_one_epoch(trainer, loaders, epoch)
    scores = validate(trainer, loaders, n_treatments)
    row = {"epoch": epoch, "lr": lr, **terms, **scores, "ema_decay": trainer.last_decay}
    row["seconds"] = time.perf_counter() - t0
    row["images_per_s"] = n_images * trainer.rt.world / max(seconds_train, 1e-9)
    if trainer.rt.is_main:
        log.info(
            "epoch %d lr %.2e loss %.4f val acc student %.4f teacher %.4f %.1fs %.0f img/s",
            epoch, lr, row.get("loss", math.nan), row["val_acc_student"], row["val_acc_teacher"],
            row["seconds"], row["images_per_s"],
        )  # fmt: skip
    return {k: _fmt(float(v)) if k != "epoch" else int(v) for k, v in row.items()}, scores


def checkpoint_record(
    epoch: int, trainer: Trainer, fingerprint: str, rows: list[dict], best: Best | None, scope: str
) -> dict:
    """The resumable state after ``epoch`` (read back by ``resume_or_init``)."""
    return {
        "epoch": epoch,
        "hparams": dataclasses.asdict(trainer.cfg),
        "model_config": trainer.model_cfg,
        "inputs": fingerprint,
        "log": rows,
        "rng": checkpoint.rng_state(),
        "trainer": trainer.state_dict(),
        "best": best.as_record() if best is not None else None,
        "scope": scope,
    }


def finish_training(
    record: dict, rows: list[dict], out_weights: str, out_log: str, checkpoint_dir: str, keep: bool
) -> None:
    """Write the weights and the log; drop the resume checkpoint unless ``keep``."""
    save_weights(out_weights, record)
    write_log(out_log, rows)
    sel = record["selected"]
    log.info(
        "saved the %s of epoch %d (%s, val acc %.4f)", sel["net"], sel["epoch"], sel["rule"], sel["val_acc"]
    )
    if not keep:
        checkpoint.remove(checkpoint_dir)


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
    soft_targets: list[str] | None = None,
    round_: int = 0,
    keep_checkpoint: bool = False,
    device: str = "auto",
    threads: int | None = None,
    fail_after_epoch: int | None = None,
) -> None:
    """Train (or resume) one model; ``fail_after_epoch`` raises after that epoch's checkpoint (tests)."""
    cfg = dataclasses.replace(hparams, seed=round_seed(hparams.seed, round_))
    rt = setup_runtime(device, threads)
    # one training per checkpoint directory (see checkpoint_lock); rank 0 holds it for all ranks
    with checkpoint.checkpoint_lock(checkpoint_dir) if rt.is_main else contextlib.nullcontext():
        if rt.cuda and cfg.cudnn_benchmark:
            torch.backends.cudnn.benchmark = True
        random.seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)
        setup = setup_training(
            cfg, rt, sites=sites, classes=classes, stacks=stacks, stats=stats, scope=scope,
            val_experiments=val_experiments, pseudo_labels=pseudo_labels, soft_targets=soft_targets,
        )  # fmt: skip
        trainer, td = setup.trainer, setup.td
        ckpt_path = Path(checkpoint_dir) / checkpoint.CHECKPOINT_NAME
        if rt.is_main:  # a killed save's temporary file (a model and its optimiser: ~73 MB) goes now
            for stale in atomic.remove_stale(ckpt_path):
                log.info("removed %s, left by an interrupted checkpoint save", stale)
        fingerprint = checkpoint.inputs_fingerprint(
            [sites, classes, *stacks, *stats, init, pseudo_labels, *(soft_targets or [])],
            {"scope": scope, "val_experiments": sorted(val_experiments), "world": rt.world, "round": round_},
        )
        start_epoch, rows, best = resume_or_init(trainer, ckpt_path, trainer.model_cfg, fingerprint, init, rt)
        loaders = make_loaders(cfg, td, rt, setup.b_lab, setup.b_unl, setup.steps, setup.use_unl)
        for epoch in range(start_epoch, cfg.epochs):
            row, scores = run_epoch(trainer, loaders, epoch, td.n_treatments)
            best = update_best(best, trainer, epoch, scores)
            rows.append(row)
            if rt.is_main:
                record = checkpoint_record(epoch, trainer, fingerprint, rows, best, scope)
                checkpoint.save_checkpoint(ckpt_path, record)
            _barrier(rt)
            if fail_after_epoch is not None and epoch == fail_after_epoch:
                raise RuntimeError(f"injected failure after epoch {epoch}")
        if rt.is_main:
            record = weights_record(trainer, td, best, scope, val_experiments, round_)
            keep = keep_checkpoint or cfg.keep_checkpoint
            finish_training(record, rows, out_weights, out_log, checkpoint_dir, keep)
        _barrier(rt)


def _main(args: argparse.Namespace) -> int:
    cfg = with_runtime(load_hparams(args.hparams), args)
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
        soft_targets=args.soft_targets,
        round_=args.round,
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
    p.add_argument("--init", help="weights.pt to start from (its selected model)")
    p.add_argument("--pseudo-labels", help="pseudo-label CSV of the previous round (hard targets)")
    p.add_argument(
        "--soft-targets", nargs="+", help="ensemble npz files of the previous round (soft targets)"
    )
    p.add_argument("--round", type=int, default=0, help="pseudo-label round (seeds the run)")
    p.add_argument("--out-weights", required=True)
    p.add_argument("--out-log", required=True)
    p.add_argument("--checkpoint-dir", required=True)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    add_runtime_arguments(p)  # --num-workers, --val-batch-size, --[no-]amp, ...
    p.set_defaults(func=_main)
