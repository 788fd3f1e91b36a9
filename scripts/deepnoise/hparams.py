"""Training hyper-parameters (``deepnoise train --hparams``), validated key by key.

Torch-free, so the Snakefile checks every model's merged ``train``/``models``/``finetune`` config at
parse time, before any job runs.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deepnoise.errors import InputError, did_you_mean

NORMALIZATIONS = ("plate", "experiment", "cell_type", "negative_control", "none")


@dataclass
class TrainConfig:
    """Training hyper-parameters (``--hparams``). Defaults are the DeepNoise paper's values."""

    backbone: str = "legacy_xception"
    """timm model name (6 input channels, no classifier), or ``xception_wide``."""
    pretrained: bool | str = False
    """ImageNet init: false, true (timm download, needs a network) or a local .pth/.safetensors path."""
    head: str = "arcface"
    """Classification head: ``arcface`` or ``softmax``."""
    arcface_s: float = 30.0
    """ArcFace scale s."""
    arcface_m: float = 0.1
    """ArcFace additive angular margin m (radians), applied to the target class in training."""
    dropout: float = 0.0
    """Dropout on the embedding before the head."""
    epochs: int = 160
    """Number of epochs (one epoch = one pass over the labelled wells, one random site each)."""
    batch_size: int = 64
    """Labelled images per optimiser step and process (GPU)."""
    unlabelled_batch_size: int | None = None
    """Unlabelled images per step and process; null: round(unlabelled_ratio * batch_size)."""
    unlabelled_ratio: float = 1.0
    """Unlabelled images per labelled image in a step, when unlabelled_batch_size is null."""
    lr: float = 3e-4
    """Adam learning rate from epoch 0."""
    lr_milestones: list[int] = field(default_factory=lambda: [100, 140])
    """Epochs at which the learning rate changes to the matching lr_values entry."""
    lr_values: list[float] = field(default_factory=lambda: [1e-4, 1e-5])
    """Learning rates from each milestone on."""
    weight_decay: float = 2e-4
    """Adam weight decay (L2, as torch.optim.Adam)."""
    mean_teacher: bool = True
    """Consistency loss between student and EMA teacher on labelled and unlabelled images."""
    ema_decay: float = 0.999
    """Teacher EMA decay."""
    ema_warmup: bool = True
    """Warm the decay up as min(1 - 1/(step + 1), ema_decay) (Tarvainen et al.)."""
    ema_max_window: float = 0.1
    """Cap the decay at 1 - 1/(ema_max_window * run steps): the teacher averages over at most this
    fraction of the run (bites on short runs only; 0: no cap)."""
    consistency_weight: float = 10.0
    """Weight of the consistency loss (sum over classes of squared softmax differences)."""
    consistency_rampup_epochs: float = 5.0
    """Sigmoid ramp-up length of the consistency weight, in epochs (0: none)."""
    pseudo_weight: float = 1.0
    """Weight of the pseudo-label cross-entropy on unlabelled wells that have a pseudo label."""
    unlabelled_include_validation: bool = True
    """Use the validation experiments' wells as unlabelled images (consistency only)."""
    controls_as_classes: bool = True
    """Controls are extra classes (n_treatments + n_controls outputs); predictions keep treatments."""
    input_size: int = 512
    """Side of the network input; training crops/rescales to it, prediction resizes to it."""
    aug_flips: bool = True
    """Random flips and 90 degree rotations."""
    aug_crop_scale: list[float] | None = field(default_factory=lambda: [0.6, 1.0])
    """Random crop area fraction range [min, max], resampled to input_size; null: resize only."""
    aug_erase_p: float = 0.25
    """Probability of random erasing (one rectangle, 2-20% of the area) per image."""
    normalization: str = "plate"
    """Normalisation statistics: plate | experiment | cell_type | negative_control | none."""
    norm_jitter: float = 0.05
    """Training jitter of the normalisation: mean += j*std*N(0,1), std *= 1 + j*N(0,1), per channel."""
    seed: int = 0
    """Seed of everything (weights init, sampling, augmentation)."""
    num_workers: int = 4
    """DataLoader worker processes per loader (0: load in the main process)."""
    amp: bool = True
    """bfloat16 autocast on CUDA (ignored on CPU)."""
    channels_last: bool = True
    """channels_last memory format on CUDA (ignored on CPU)."""
    cudnn_benchmark: bool = True
    """torch.backends.cudnn.benchmark on CUDA."""
    val_batch_size: int = 64
    """Wells per validation batch (two sites each)."""

    @classmethod
    def key_problems(cls, values: dict[str, Any], source: str) -> list[str]:
        """Unknown keys and values of the wrong type in one config section (``source.key: ...``)."""
        if not isinstance(values, dict):
            return [f"{source}: expected a mapping of training keys, got {values!r}"]
        fields = [f.name for f in dataclasses.fields(cls)]
        default = cls()
        out = []
        for key, value in values.items():
            if key not in fields:
                hint = did_you_mean(key, fields)
                out.append(f"{source}.{key}: unknown key{hint}; allowed keys: {', '.join(fields)}")
                continue
            try:
                _coerce(key, value, getattr(default, key), source)
            except InputError as exc:
                out.append(str(exc))
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "hparams") -> TrainConfig:
        """Validated config; unknown keys and values of the wrong type raise ``InputError``."""
        problems = cls.key_problems(values, source)
        if problems:
            raise InputError(problems[0])
        default = cls()
        cfg = cls(**{k: _coerce(k, v, getattr(default, k), source) for k, v in values.items()})
        cfg.validate(source)
        return cfg

    def validate(self, source: str = "hparams") -> None:
        def bad(key: str, why: str):
            raise InputError(f"{source}.{key}: {why}")

        if self.head not in ("arcface", "softmax"):
            bad("head", f"{self.head!r} is not allowed; allowed values: arcface, softmax")
        if self.normalization not in NORMALIZATIONS:
            bad(
                "normalization",
                f"{self.normalization!r} is not allowed; allowed values: {', '.join(NORMALIZATIONS)}",
            )
        if len(self.lr_milestones) != len(self.lr_values):
            bad("lr_values", "needs one value per lr_milestones entry")
        if list(self.lr_milestones) != sorted(self.lr_milestones):
            bad("lr_milestones", "must be increasing")
        for key in ("epochs", "batch_size", "input_size", "val_batch_size"):
            if getattr(self, key) < 1:
                bad(key, "must be >= 1")
        if not 0.0 <= self.ema_decay <= 1.0:
            bad("ema_decay", "must be in [0, 1]")
        if not 0.0 <= self.ema_max_window <= 1.0:
            bad("ema_max_window", "must be in [0, 1]")
        if self.aug_crop_scale is not None and (
            len(self.aug_crop_scale) != 2 or not 0 < self.aug_crop_scale[0] <= self.aug_crop_scale[1] <= 1
        ):
            bad("aug_crop_scale", "expected [min, max] with 0 < min <= max <= 1")

    def unlabelled_per_step(self, labelled: int | None = None) -> int:
        """Unlabelled images per step for ``labelled`` (default ``batch_size``) labelled ones."""
        if self.unlabelled_batch_size is not None:
            return int(self.unlabelled_batch_size)
        return int(round(self.unlabelled_ratio * (self.batch_size if labelled is None else labelled)))

    def lr_at(self, epoch: int) -> float:
        lr = self.lr
        for milestone, value in zip(self.lr_milestones, self.lr_values, strict=True):
            if epoch >= milestone:
                lr = value
        return float(lr)


def _coerce(key: str, value: Any, default: Any, source: str) -> Any:
    def bad():
        kind = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
        want = "a list" if isinstance(default, list) else kind.get(type(default), type(default).__name__)
        if key == "pretrained":
            want = "false, true or a weights file path"
        raise InputError(f"{source}.{key}: expected {want}, got {value!r}")

    if key == "pretrained":
        if isinstance(value, bool) or (isinstance(value, str) and value):
            return value
        return False if value is None else bad()
    if key == "unlabelled_batch_size":
        return None if value is None else (int(value) if isinstance(value, int) and value >= 0 else bad())
    if key == "aug_crop_scale" and value is None:
        return None
    if isinstance(default, bool):
        return value if isinstance(value, bool) else bad()
    if isinstance(default, int):
        return value if isinstance(value, int) and not isinstance(value, bool) else bad()
    if isinstance(default, float):
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        return float(value) if ok else bad()
    if isinstance(default, str):
        return value if isinstance(value, str) else bad()
    if isinstance(default, list):
        if not isinstance(value, list):
            bad()
        kind = type(default[0]) if default else float
        try:
            return [kind(v) for v in value]
        except (TypeError, ValueError):
            bad()
    return value


def load_hparams(text_or_path: str) -> TrainConfig:
    """``--hparams``: inline JSON (starting with ``{``) or a JSON file."""
    source = "hparams"
    if text_or_path.lstrip().startswith("{"):
        text = text_or_path
    else:
        source = text_or_path
        try:
            text = Path(text_or_path).read_text()
        except OSError as exc:
            raise InputError(f"{text_or_path}: cannot read hparams: {exc}") from exc
    try:
        values = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{source}: invalid JSON: {exc}") from exc
    return TrainConfig.from_dict(values, source)
