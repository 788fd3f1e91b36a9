"""Configuration checks run by the Snakefile at parse time, before any job starts. No torch here.

``check_config(config, schema)`` collects every problem of a workflow config and raises one
``ConfigError`` that lists them, each naming the dotted key at fault and, where the set is closed,
the allowed values:

* the JSON schema (workflow/schemas/config.schema.yaml): unknown keys, wrong types, out-of-range
  numbers such as ``rounds: 0``, values outside an enum;
  the training sections of the schema are generated from ``deepnoise.hparams.TrainConfig``, so the
  schema is the one per-key check of every training key, whichever section holds it;
* every model's merged training keys (``deepnoise.hparams.merged``) against the rules between keys,
  and its ``backbone`` against timm's model registry;
* the synthetic generator's keys (``deepnoise.synth``) when the source is synthetic;
* the data folder and its metadata files when the source is rxrx1 or kaggle (the images are checked
  by the ``sites`` job, so a whole DAG can be planned from the metadata alone).

The timm registry is read from timm's source (the ``@register_model`` functions) rather than by
importing timm, which imports torch and would add seconds to every ``snakemake`` invocation;
``tests/test_reliability.py`` checks that the two agree for the pinned timm.
"""

from __future__ import annotations

import difflib
import functools
import importlib.metadata
import importlib.util
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from deepnoise.errors import InputError, did_you_mean

# Backbones built by deepnoise itself (deepnoise.models), on top of timm's registry.
OWN_BACKBONES = ("xception_wide",)
_REGISTER = re.compile(r"^@register_model\s*\ndef\s+(\w+)\s*\(", re.M)

# The metadata files each real data source needs under data.root (images: checked by `sites`).
SOURCE_FILES = {
    "rxrx1": ("metadata.csv",),
    "kaggle": ("train.csv", "test.csv", "train_controls.csv", "test_controls.csv"),
}


class ConfigError(InputError):
    """A workflow configuration that cannot run; the message lists every problem found."""


def dotted(path: Iterable[Any]) -> str:
    return ".".join(str(p) for p in path) or "<top level>"


def _type_name(value: Any) -> str:
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "a mapping",
        type(None): "null",
    }.get(type(value), type(value).__name__)


def _unknown_key(path, name: str, allowed: list[str]) -> str:
    from deepnoise.hparams import RUNTIME_KEYS

    where = dotted([*path, name])
    if name in RUNTIME_KEYS and name not in allowed:
        return f"config {where}: a runtime knob (never changes results): set it once under train"
    return (
        f"config {where}: unknown key{did_you_mean(name, allowed)}; "
        f"allowed keys under {dotted(path)}: {', '.join(allowed)}"
    )


def _schema_message(error) -> str:
    """One line per jsonschema error: the dotted key, what is wrong and what is allowed."""
    key = dotted(error.absolute_path)
    value = error.instance
    schema = error.schema
    kind = error.validator
    if kind == "additionalProperties":
        allowed = sorted(schema.get("properties", {}))
        extra = sorted(set(value) - set(allowed))
        return "; ".join(_unknown_key(error.absolute_path, k, allowed) for k in extra)
    if kind == "required":
        missing = [k for k in error.validator_value if k not in value]
        return f"config {key}: missing key {', '.join(missing)}"
    if kind == "enum":
        options = [str(v) for v in error.validator_value]
        hint = did_you_mean(str(value), options)
        if key == "balance.method":  # an old method name: say what replaced it
            from deepnoise.balance import renamed_hint

            hint = renamed_hint(str(value)) or hint
        return f"config {key}: {value!r} is not allowed{hint}; allowed values: {', '.join(options)}"
    if kind == "type":
        want = error.validator_value
        want = " or ".join(want) if isinstance(want, list) else want
        return f"config {key}: expected {want}, got {_type_name(value)} ({value!r})"
    if kind in ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum"):
        op = {"minimum": ">=", "exclusiveMinimum": ">", "maximum": "<=", "exclusiveMaximum": "<"}[kind]
        return f"config {key}: must be {op} {error.validator_value}, got {value!r}"
    if kind == "minItems":
        return f"config {key}: needs at least {error.validator_value} item(s), got {value!r}"
    if kind == "minProperties":
        return f"config {key}: needs at least {error.validator_value} entry(ies)"
    if kind == "pattern":
        return f"config {key}: {value!r} does not match the pattern {error.validator_value}"
    return f"config {key}: {error.message}"


def schema_problems(config: dict, schema: dict) -> list[str]:
    import jsonschema

    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: [str(p) for p in e.absolute_path])
    out = []
    for e in errors:
        # `propertyNames` errors carry the offending name in their context
        if e.validator == "propertyNames":
            for sub in e.context or [e]:
                out.append(
                    f"config {dotted(e.absolute_path)}: invalid name {sub.instance!r} "
                    f"(letters, digits and '-', starting with a letter or digit)"
                )
            continue
        message = _schema_message(e)
        if message not in out:  # a missing key list is one error per missing key
            out.append(message)
    return out


@functools.cache
def timm_models() -> frozenset[str]:
    """The names of timm's registered models, read from its source without importing it."""
    spec = importlib.util.find_spec("timm")
    if spec is None or spec.origin is None:
        return frozenset()
    root = Path(spec.origin).parent / "models"
    names: set[str] = set()
    for path in root.glob("*.py"):
        names.update(_REGISTER.findall(path.read_text(encoding="utf-8")))
    return frozenset(names)


def backbone_hint(base: str, known: frozenset[str]) -> str:
    """`` (did you mean ...?)`` for a backbone name: first the models that are the name with a
    prefix or suffix (``xception`` -> ``legacy_xception``, the recipe's, and ``xception_wide``),
    then close spellings; up to 4."""
    names = sorted({*known, *OWN_BACKBONES})
    affixed = [k for k in names if k.endswith(f"_{base}")] + [k for k in names if k.startswith(f"{base}_")]
    close = difflib.get_close_matches(base, names, n=4, cutoff=0.6)
    near = list(dict.fromkeys([*affixed, *close]))[:4]
    return f" (did you mean {', '.join(near)}?)" if near else ""


def backbone_problem(name: Any, key: str) -> str | None:
    """Why ``name`` is not a backbone deepnoise can build (None when it is)."""
    if not isinstance(name, str):
        return f"config {key}: expected a string, got {_type_name(name)} ({name!r})"
    known = timm_models()
    base = name.split(".", 1)[0]  # a pretrained tag (resnet18.a1_in1k) selects weights only
    if base in OWN_BACKBONES or base in known:
        return None
    if not known:
        return None  # timm not installed here (the jobs' environment checks at run time)
    try:
        version = importlib.metadata.version("timm")
    except importlib.metadata.PackageNotFoundError:
        version = "?"
    return (
        f"config {key}: {name!r} is not a timm {version} model nor one of {', '.join(OWN_BACKBONES)}"
        f"{backbone_hint(base, known)}; list them with "
        f"python -c \"import timm; print(timm.list_models('*xception*'))\""
    )


def data_problems(source: str, root: str) -> list[str]:
    """Missing data folder or metadata files of an rxrx1 / kaggle source."""
    if source not in SOURCE_FILES:
        return []
    base = Path(root)
    if not base.is_dir():
        return [
            f"config data.root: {root!r} is not a folder (data.source {source} reads "
            f"{', '.join(SOURCE_FILES[source])} from it)"
        ]
    out = []
    for name in SOURCE_FILES[source]:
        if not (base / name).is_file():
            out.append(f"config data.root: {base / name} not found (needed by data.source {source})")
    return out


def train_problems(config: dict) -> list[str]:
    """What the schema cannot see in the training keys (its per-key checks are generated from
    ``deepnoise.hparams.TrainConfig``): rules between keys of every model's merged training and
    fine-tuning keys (each reported once, against the sections holding the keys), and backbones."""
    from deepnoise import hparams

    out = hparams.cross_problems(config)
    for name in config.get("models") or {}:
        problem = backbone_problem(hparams.merged(config, name).get("backbone"), f"models.{name}.backbone")
        if problem:
            out.append(problem)
    return out


def synthetic_problems(config: dict) -> list[str]:
    if (config.get("data") or {}).get("source") != "synthetic":
        return []
    from deepnoise import synth

    try:
        synth.validate_config(dict(config.get("synthetic") or {}))
    except InputError as exc:
        return [f"config {str(exc).replace('synthetic config: ', 'synthetic: ', 1)}"]
    return []


def check_config(config: dict, schema: dict) -> None:
    """Raise ``ConfigError`` listing every problem of ``config``; silent when it can run."""
    problems = schema_problems(config, schema)
    if not problems:  # the deeper checks assume the schema's shape
        problems += train_problems(config)
        problems += synthetic_problems(config)
        data = config["data"]
        problems += data_problems(data["source"], data["root"])
    if problems:
        raise ConfigError(
            f"{len(problems)} configuration problem(s):\n" + "\n".join(f"  - {p}" for p in problems)
        )


def load_schema(path: str | Path) -> dict:
    import yaml

    return yaml.safe_load(Path(path).read_text())
