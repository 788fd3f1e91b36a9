"""Training hyper-parameters: the ONE definition of every training key (``deepnoise train --hparams``).

Each ``TrainConfig`` field is declared with ``key(default, doc, bounds...)``: its type (from the
default), bounds, allowed values, documentation and whether it is a *runtime knob* (changes speed,
never the result: passed to the job as a plain flag, never a rerun trigger). From these fields come

* the training parts of workflow/schemas/config.schema.yaml and the key table of config/README.md
  (``python -m deepnoise.hparams --write``; tests/test_config.py fails when they drift);
* the checks of ``deepnoise train`` (``TrainConfig.from_dict``), the same bounds as the schema;
* ``merged``: the one merge of a model's keys (train <- models.<m> <- finetune <- models.<m>.finetune)
  used by the parse-time check (``deepnoise.configcheck``) and the rules (workflow/rules/common.smk).

Adding a key is one change here: a field with ``key(...)``; then ``python -m deepnoise.hparams --write``.
Torch-free, so the Snakefile checks the config at parse time, before any job runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deepnoise.errors import InputError, did_you_mean

NORMALIZATIONS = ("plate", "experiment", "cell_type", "negative_control", "none")
_JSON_TYPE = {"boolean": "boolean", "integer": "integer", "number": "number", "string": "string"}


def _kind(default: Any) -> str:
    if isinstance(default, bool):
        return "boolean"
    if isinstance(default, int):
        return "integer"
    if isinstance(default, float):
        return "number"
    if isinstance(default, str):
        return "string"
    if isinstance(default, list):
        return f"{_kind(default[0])} list"
    raise TypeError(f"no config kind for {default!r}")


def key(
    default: Any,
    doc: str,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    choices: tuple[str, ...] | None = None,
    length: int | None = None,
    kind: str | None = None,
    nullable: bool = False,
    runtime: bool = False,
    finetune: bool = True,
) -> Any:
    """A ``TrainConfig`` field and its definition as a config key. Bounds (``ge``/``gt``/``le``/``lt``)
    apply to the value or, for lists, to every item; ``runtime``: a knob that never changes results
    (set under ``train:`` only, passed as a flag); ``finetune=False``: not allowed in fine-tuning."""
    meta = {
        "doc": doc,
        "kind": kind or _kind(default),
        "bounds": {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None},
        "choices": choices,
        "length": length,
        "nullable": nullable or default is None,
        "runtime": runtime,
        "finetune": finetune and not runtime,
    }
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """Training hyper-parameters (``--hparams``). Defaults are the DeepNoise paper's values.

    Each field is the ONE definition of its config key: type (from the default), bounds, allowed
    values, documentation, and whether it is a runtime knob (see ``key``).
    """

    backbone: str = key(
        "legacy_xception",
        "timm model name (6 input channels, no classifier), or `xception_wide`.",
        finetune=False,
    )
    pretrained: bool | str = key(
        False,
        "ImageNet init: false, true (timm download, needs a network) or a local .pth/.safetensors path.",
        kind="boolean or path",
        nullable=True,
    )
    head: str = key("arcface", "Classification head.", choices=("arcface", "softmax"))
    arcface_s: float = key(30.0, "ArcFace scale s.", gt=0)
    arcface_m: float = key(
        0.1, "ArcFace additive angular margin m (radians), applied to the target class in training.", ge=0
    )
    dropout: float = key(0.0, "Dropout on the embedding before the head.", ge=0, lt=1)
    epochs: int = key(
        160, "Number of epochs (one epoch = one pass over the labelled wells, one random site each).", ge=1
    )
    batch_size: int = key(64, "Labelled images per optimiser step and process (GPU).", ge=1)
    unlabelled_batch_size: int | None = key(
        None,
        "Unlabelled images per step and process; null: round(unlabelled_ratio * batch_size).",
        ge=0,
        kind="integer",
    )
    unlabelled_ratio: float = key(
        1.0, "Unlabelled images per labelled image in a step, when unlabelled_batch_size is null.", ge=0
    )
    lr: float = key(3e-4, "Adam learning rate from epoch 0.", gt=0)
    lr_milestones: list[int] = key(
        [100, 140],
        "Epochs at which the learning rate changes to the matching lr_values entry (increasing).",
        ge=1,
    )
    lr_values: list[float] = key(
        [1e-4, 1e-5], "Learning rates from each milestone on (one per lr_milestones entry).", gt=0
    )
    weight_decay: float = key(2e-4, "Adam weight decay (L2, as torch.optim.Adam).", ge=0)
    mean_teacher: bool = key(
        True, "Consistency loss between student and EMA teacher on labelled and unlabelled images."
    )
    ema_decay: float = key(0.999, "Teacher EMA decay.", ge=0, lt=1)
    ema_warmup: bool = key(True, "Warm the decay up as min(1 - 1/(step + 1), ema_decay) (Tarvainen et al.).")
    ema_max_window: float = key(
        0.1,
        "Cap the decay at 1 - 1/(ema_max_window * run steps): the teacher averages over at most this "
        "fraction of the run (bites on short runs only; 0: no cap).",
        ge=0,
        le=1,
    )
    consistency_weight: float = key(
        10.0, "Weight of the consistency loss (sum over classes of squared softmax differences).", ge=0
    )
    consistency_rampup_epochs: float = key(
        5.0, "Sigmoid ramp-up length of the consistency weight, in epochs (0: none).", ge=0
    )
    pseudo_weight: float = key(
        1.0, "Weight of the pseudo-label cross-entropy on unlabelled wells that have a pseudo label.", ge=0
    )
    unlabelled_include_validation: bool = key(
        True, "Use the validation experiments' wells as unlabelled images (consistency only)."
    )
    controls_as_classes: bool = key(
        True, "Controls are extra classes (n_treatments + n_controls outputs); predictions keep treatments."
    )
    input_size: int = key(
        512, "Side of the network input; training crops/rescales to it, prediction resizes to it.", ge=1
    )
    aug_flips: bool = key(True, "Random flips and 90 degree rotations.")
    aug_crop_scale: list[float] | None = key(
        [0.6, 1.0],
        "Random crop area fraction range [min, max], resampled to input_size; null: resize only.",
        gt=0,
        le=1,
        length=2,
        nullable=True,
    )
    aug_erase_p: float = key(
        0.25, "Probability of random erasing (one rectangle, 2-20% of the area) per image.", ge=0, le=1
    )
    normalization: str = key("plate", "Normalisation statistics of each image.", choices=NORMALIZATIONS)
    norm_jitter: float = key(
        0.05,
        "Training jitter of the normalisation: mean += j*std*N(0,1), std *= 1 + j*N(0,1), per channel.",
        ge=0,
    )
    seed: int = key(0, "Seed of everything (weights init, sampling, augmentation).", ge=0)
    num_workers: int = key(
        4, "DataLoader worker processes per loader (0: load in the main process).", ge=0, runtime=True
    )
    amp: bool = key(True, "bfloat16 autocast on CUDA (ignored on CPU).", runtime=True)
    channels_last: bool = key(True, "channels_last memory format on CUDA (ignored on CPU).", runtime=True)
    cudnn_benchmark: bool = key(True, "torch.backends.cudnn.benchmark on CUDA.", runtime=True)
    compile: bool = key(
        False,
        "torch.compile the student's and teacher's training forward passes (CUDA only: refused on CPU).",
        runtime=True,
    )
    val_batch_size: int = key(64, "Wells per validation batch (two sites each).", ge=1, runtime=True)
    keep_checkpoint: bool = key(
        False,
        "Keep the resume checkpoint (student, teacher, Adam state, best model: ~5x the model) once the "
        "weights are written; false deletes it (RxRx1 recipe: ~0.44 GB per Xception and ~0.73 GB per "
        "Xception-Wide training, ~17 GB for the 30 trainings of 3 rounds).",
        runtime=True,
    )

    @classmethod
    def keys(cls) -> dict[str, dataclasses.Field]:
        return {f.name: f for f in dataclasses.fields(cls)}

    @classmethod
    def key_problems(cls, values: dict[str, Any], source: str) -> list[str]:
        """Unknown keys and values of the wrong type or out of bounds (``source.key: ...``)."""
        if not isinstance(values, dict):
            return [f"{source}: expected a mapping of training keys, got {values!r}"]
        fields = cls.keys()
        out = []
        for name, value in values.items():
            if name not in fields:
                hint = did_you_mean(name, list(fields))
                out.append(f"{source}.{name}: unknown key{hint}; allowed keys: {', '.join(fields)}")
                continue
            try:
                check_value(fields[name], value, source)
            except InputError as exc:
                out.append(str(exc))
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "hparams") -> TrainConfig:
        """Validated config; unknown keys and values of the wrong type raise ``InputError``."""
        cfg = cls.unchecked_across_keys(values, source)
        cfg.validate(source)
        return cfg

    @classmethod
    def unchecked_across_keys(cls, values: dict[str, Any], source: str = "hparams") -> TrainConfig:
        """Each key checked (``InputError``), the rules between keys not (``cross_key_problems``)."""
        problems = cls.key_problems(values, source)
        if problems:
            raise InputError(problems[0])
        fields = cls.keys()
        return cls(**{k: check_value(fields[k], v, source) for k, v in values.items()})

    def cross_key_problems(self) -> list[tuple[tuple[str, ...], str]]:
        """Rules between keys: (the keys involved, why)."""
        out = []
        if len(self.lr_milestones) != len(self.lr_values):
            out.append((("lr_values", "lr_milestones"), "need one lr_values entry per lr_milestones entry"))
        if any(b <= a for a, b in zip(self.lr_milestones, self.lr_milestones[1:], strict=False)):
            out.append((("lr_milestones",), "must be increasing"))
        if self.aug_crop_scale is not None and self.aug_crop_scale[0] > self.aug_crop_scale[1]:
            out.append((("aug_crop_scale",), "expected [min, max] with min <= max"))
        return out

    def validate(self, source: str = "hparams") -> None:
        for keys, why in self.cross_key_problems():
            raise InputError(f"{source}.{keys[0]}: {why}")

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


RUNTIME_KEYS = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.metadata["runtime"])
_OPS = {"ge": (">=", lambda v, b: v >= b), "gt": (">", lambda v, b: v > b),
        "le": ("<=", lambda v, b: v <= b), "lt": ("<", lambda v, b: v < b)}  # fmt: skip
_WANT = {
    "boolean": "true or false",
    "integer": "an integer",
    "number": "a number",
    "string": "a string",
    "boolean or path": "false, true or a weights file path",
}


def _scalar(kind: str, value: Any) -> tuple[bool, Any]:
    """(ok, coerced value) of one scalar of ``kind``; integral floats count as integers (as JSON
    schema's ``integer``), booleans are never numbers."""
    if isinstance(value, bool):
        return (kind in ("boolean", "boolean or path"), value)
    if kind == "integer":
        ok = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
        return ok, int(value) if ok else value
    if kind == "number":
        ok = isinstance(value, int | float) and math.isfinite(value)
        return ok, float(value) if ok else value
    if kind == "string":
        return isinstance(value, str) and value != "", value
    if kind == "boolean or path":
        return isinstance(value, str) and value != "", value
    return False, value


def check_value(f: dataclasses.Field, value: Any, source: str) -> Any:
    """The value of key ``f`` checked against its definition (type, bounds, choices), coerced to
    the field's type; ``InputError`` naming ``source.key`` otherwise."""
    meta, name = f.metadata, f.name
    kind = meta["kind"]
    if value is None:
        if meta["nullable"]:
            return False if kind == "boolean or path" else None
        raise InputError(f"{source}.{name}: expected {_WANT.get(kind, 'a list')}, got None")
    items_kind = kind[: -len(" list")] if kind.endswith(" list") else None
    if items_kind:
        if not isinstance(value, list):
            raise InputError(f"{source}.{name}: expected a list of {items_kind}s, got {value!r}")
        if meta["length"] is not None and len(value) != meta["length"]:
            raise InputError(f"{source}.{name}: expected {meta['length']} items, got {value!r}")
        return [_check_scalar(meta, items_kind, v, f"{source}.{name}.{i}") for i, v in enumerate(value)]
    return _check_scalar(meta, kind, value, f"{source}.{name}")


def _check_scalar(meta, kind: str, value: Any, where: str) -> Any:
    ok, value = _scalar(kind, value)
    if not ok:
        raise InputError(f"{where}: expected {_WANT[kind]}, got {value!r}")
    if meta["choices"] and value not in meta["choices"]:
        hint = did_you_mean(str(value), list(meta["choices"]))
        raise InputError(
            f"{where}: {value!r} is not allowed{hint}; allowed values: {', '.join(meta['choices'])}"
        )
    for op, bound in meta["bounds"].items():
        sign, holds = _OPS[op]
        if not holds(value, bound):
            raise InputError(f"{where}: must be {sign} {bound}, got {value!r}")
    return value


# ------------------------------------------------------------------------------------------------
# The one merge of a model's keys, and the split into recipe (params) and runtime (flags)


def merged(config: dict, model: str, finetune: bool = False) -> dict[str, Any]:
    """A model's training keys: ``train`` <- ``models.<m>`` [<- ``finetune`` <- ``models.<m>.finetune``]."""
    own = dict(config["models"][model] or {})
    own_finetune = own.pop("finetune", None) or {}
    out = {**(config.get("train") or {}), **own}
    if finetune:
        out.update(config.get("finetune") or {})
        out.update(own_finetune)
    return out


def origin(config: dict, model: str, finetune: bool, name: str) -> str:
    """The config section whose value of ``name`` wins in ``merged`` (``train`` when none sets it)."""
    own = config["models"][model] or {}
    layers = [("train", config.get("train")), (f"models.{model}", own)]
    if finetune:
        layers += [("finetune", config.get("finetune")), (f"models.{model}.finetune", own.get("finetune"))]
    found = [where for where, values in layers if name in (values or {})]
    return found[-1] if found else "train"


def recipe(config: dict, model: str, finetune: bool = False) -> dict[str, Any]:
    """The keys that change a model's weights: the `params:` JSON whose change reruns its jobs."""
    return {k: v for k, v in merged(config, model, finetune).items() if k not in RUNTIME_KEYS}


def runtime_args(train: dict) -> list[str]:
    """Command-line words of the runtime knobs set under ``train:`` (defaults otherwise)."""
    fields = TrainConfig.keys()
    out = []
    for name in RUNTIME_KEYS:
        value = check_value(fields[name], train.get(name, fields[name].default), "config train")
        flag = "--" + name.replace("_", "-")
        out += ([flag] if value else [f"--no-{flag[2:]}"]) if isinstance(value, bool) else [flag, str(value)]
    return out


def add_runtime_arguments(parser: argparse.ArgumentParser) -> None:
    """``deepnoise train`` flags of the runtime knobs (override the ``--hparams`` values)."""
    for name in RUNTIME_KEYS:
        f = TrainConfig.keys()[name]
        flag = "--" + name.replace("_", "-")
        if f.metadata["kind"] == "boolean":
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=None, help=f.metadata["doc"]
            )
        else:
            parser.add_argument(flag, type=int, default=None, help=f.metadata["doc"])


def with_runtime(cfg: TrainConfig, args: argparse.Namespace) -> TrainConfig:
    """``cfg`` with the runtime knobs given on the command line."""
    fields = TrainConfig.keys()
    given = {k: getattr(args, k) for k in RUNTIME_KEYS if getattr(args, k, None) is not None}
    return dataclasses.replace(
        cfg, **{k: check_value(fields[k], v, "command line") for k, v in given.items()}
    )


def cross_problems(config: dict) -> list[str]:
    """Rules between keys for every model's merged training and fine-tuning keys, each reported
    once against the sections that hold the keys (the per-key checks are the schema's)."""
    out: list[str] = []
    for model in config.get("models") or {}:
        for finetune in (False, True):
            try:
                cfg = TrainConfig.unchecked_across_keys(merged(config, model, finetune), "config")
            except InputError as exc:  # a per-key problem the schema did not see (not expected)
                problems = [str(exc)]
            else:
                problems = [
                    "config "
                    + " and ".join(f"{origin(config, model, finetune, k)}.{k}" for k in keys)
                    + f": {why}"
                    for keys, why in cfg.cross_key_problems()
                ]
            out += [p for p in problems if p not in out]
    return out


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


# ------------------------------------------------------------------------------------------------
# Generated documents: the schema's training sections and config/README.md's key table

SCHEMA_FILE = "workflow/schemas/config.schema.yaml"
README_FILE = "config/README.md"
BEGIN = "BEGIN generated by `python -m deepnoise.hparams --write` from deepnoise.hparams.TrainConfig"
END = "END generated"
MODEL_NAME = "^[A-Za-z0-9][A-Za-z0-9-]*$"


def value_schema(f: dataclasses.Field) -> dict[str, Any]:
    """The JSON schema of one key's value (the bounds ``check_value`` applies)."""
    meta = f.metadata
    kind = meta["kind"]
    if kind == "boolean or path":
        return {"type": ["boolean", "string", "null"], "minLength": 1}
    scalar_kind = kind[: -len(" list")] if kind.endswith(" list") else kind
    scalar: dict[str, Any] = {"type": _JSON_TYPE[scalar_kind]}
    if scalar_kind == "string":
        scalar["minLength"] = 1
    if meta["choices"]:
        scalar["enum"] = list(meta["choices"])
    names = {"ge": "minimum", "gt": "exclusiveMinimum", "le": "maximum", "lt": "exclusiveMaximum"}
    scalar.update({names[op]: bound for op, bound in meta["bounds"].items()})
    out = scalar
    if scalar_kind != kind:
        out = {"type": "array", "items": scalar}
        if meta["length"] is not None:
            out["minItems"] = out["maxItems"] = meta["length"]
    if meta["nullable"]:
        out["type"] = [out["type"], "null"]
    return out


def section_schema(section: str) -> dict[str, Any]:
    """``train``, ``finetune``, ``model`` (``models.<m>``) or ``model_finetune``."""
    finetune = section in ("finetune", "model_finetune")
    props = {}
    for f in dataclasses.fields(TrainConfig):
        if (f.metadata["runtime"] and section != "train") or (finetune and not f.metadata["finetune"]):
            continue
        props[f.name] = {**value_schema(f), "description": f.metadata["doc"]}
    out: dict[str, Any] = {"type": "object", "properties": props}
    if section == "model":
        props["finetune"] = section_schema("model_finetune")
        out["required"] = ["backbone"]
    out["additionalProperties"] = False
    return out


def schema_sections() -> dict[str, Any]:
    return {
        "train": section_schema("train"),
        "finetune": section_schema("finetune"),
        "models": {
            "type": "object",
            "minProperties": 1,
            "propertyNames": {"pattern": MODEL_NAME},
            "additionalProperties": section_schema("model"),
        },
    }


def _schema_block() -> str:
    return "\n".join(
        f"  {name}: {json.dumps(value, separators=(', ', ': '))}" for name, value in schema_sections().items()
    )


def _where(f: dataclasses.Field) -> str:
    if f.metadata["runtime"]:
        return "train (runtime)"
    return "all" if f.metadata["finetune"] else "train, models.&lt;m&gt;"


def _allowed(f: dataclasses.Field) -> str:
    meta = f.metadata
    parts = [meta["kind"]]
    if meta["choices"]:
        parts = [" \\| ".join(meta["choices"])]
    signs = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
    parts += [f"{signs[op]} {bound:g}" for op, bound in meta["bounds"].items()]
    if meta["length"]:
        parts.append(f"{meta['length']} items")
    if meta["nullable"]:
        parts.append("or null")
    return ", ".join(parts)


def key_table() -> str:
    rows = [
        "| key | allowed | default | sections | meaning |",
        "|---|---|---|---|---|",
    ]
    for f in dataclasses.fields(TrainConfig):
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        rows.append(
            f"| `{f.name}` | {_allowed(f)} | `{json.dumps(default)}` | {_where(f)} | {f.metadata['doc']} |"
        )
    return "\n".join(rows)


def _replace_block(text: str, block: str, begin: str, end: str, path: str) -> str:
    """``text`` with the lines between the marker lines ``begin`` and ``end`` replaced by ``block``."""
    if begin not in text or end not in text:
        raise InputError(f"{path}: markers '{begin}' ... '{end}' not found")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    indent = head[head.rfind("\n") + 1 :]
    return f"{head}{begin}\n{block}\n{indent}{end}{tail}"


def generated(repo: Path) -> dict[Path, str]:
    """The schema and README as they should be, from their current text and ``TrainConfig``."""
    schema, readme = repo / SCHEMA_FILE, repo / README_FILE
    return {
        schema: _replace_block(schema.read_text(), _schema_block(), f"# {BEGIN}", f"# {END}", SCHEMA_FILE),
        readme: _replace_block(
            readme.read_text(), key_table(), f"<!-- {BEGIN} -->", f"<!-- {END} -->", README_FILE
        ),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m deepnoise.hparams",
        description=f"Write (or --check) the training keys of {SCHEMA_FILE} and {README_FILE}.",
    )
    p.add_argument("--repo", default=str(Path(__file__).resolve().parents[2]), help="repository root")
    p.add_argument("--check", action="store_true", help="exit 1 when a file differs from TrainConfig")
    p.add_argument("--write", action="store_true", help="rewrite the generated parts")
    args = p.parse_args(argv)
    stale = [path for path, text in generated(Path(args.repo)).items() if path.read_text() != text]
    if args.write:
        for path, text in generated(Path(args.repo)).items():
            path.write_text(text)
        return 0
    for path in stale:
        print(
            f"{path}: out of date with deepnoise.hparams.TrainConfig; run python -m deepnoise.hparams --write"
        )
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
