"""``deepnoise why``: why each planned job reruns, as config keys with their old -> new values.

One ``snakemake -n`` of the config gives the planned jobs and their reasons. For a job whose params
changed, the values Snakemake recorded for its outputs (``.snakemake/metadata/<base64 of the path>``,
a JSON record whose ``params`` is the sorted list of ``repr()`` of the rule's params, without their
names) are compared with the current ones (the dry run's "now:" set). The training settings are one
JSON string per job (``common.smk`` ``hparams_json``): it is decoded and compared key by key, and each
key is named by the config section it comes from (``train.lr``, ``models.r10.lr``, ``finetune.lr``).
Jobs that rerun for another reason (missing outputs, an upstream job that reruns) are counted apart.
"""

from __future__ import annotations

import argparse
import ast
import base64
import json
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from deepnoise import plan

_CHANGE = re.compile(r"Params have changed since last execution: .*?before: (.*?) now: (.*?) ?(?:;|$)")
NOTHING = "<nothing exclusive>"


def parse_values(text: str) -> list:
    """The values of a ``','.join(repr(v) ...)`` list as Snakemake prints it (empty for none)."""
    text = text.strip()
    if not text or text == NOTHING:
        return []
    try:
        return list(ast.literal_eval(f"({text},)"))
    except (ValueError, SyntaxError):
        return [text]


def params_change(reason: str) -> tuple[list, list] | None:
    """(values only before, values only now) from a dry-run reason, or None without a params change."""
    m = _CHANGE.search(reason)
    if not m:
        return None
    return parse_values(m.group(1)), parse_values(m.group(2))


def recorded_params(directory: str | Path, output: str) -> list | None:
    """The params Snakemake recorded for an output file (values, decoded from their reprs)."""
    key = base64.urlsafe_b64encode(output.encode()).decode()
    base = Path(directory) / ".snakemake" / "metadata"
    # long names are split into folders of at most NAME_MAX - 1 characters, all but the last "@"-prefixed
    parts = [key[i : i + 254] for i in range(0, len(key), 254)]
    path = base.joinpath(*["@" + p for p in parts[:-1]], parts[-1])
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    out = []
    for r in record.get("params") or []:
        try:
            out.append(ast.literal_eval(r))
        except (ValueError, SyntaxError):
            out.append(r)
    return out


def _json_dict(value):
    if isinstance(value, str) and value.startswith("{"):
        try:
            d = json.loads(value)
        except json.JSONDecodeError:
            return None
        return d if isinstance(d, dict) else None
    return None


def key_source(config: dict, rule: str, model: str | None, key: str) -> str:
    """The config key a merged training key comes from (the last section that sets it)."""
    if rule == "synthesize":
        return f"synthetic.{key}"
    model_cfg = (config.get("models") or {}).get(model) or {}
    if rule in ("finetune",):
        if key in (model_cfg.get("finetune") or {}):
            return f"models.{model}.finetune.{key}"
        if key in (config.get("finetune") or {}):
            return f"finetune.{key}"
    if key in model_cfg:
        return f"models.{model}.{key}"
    return f"train.{key}" if rule in ("train", "finetune") else f"{rule}.{key}"


def _leaves(node, prefix=""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _leaves(v, f"{prefix}{k}.")
    else:
        yield prefix[:-1], node


def value_source(config: dict, rule: str, value) -> str:
    """The config key holding this new value, when exactly one outside the training sections does."""
    skip = ("train.", "finetune.", "models.", "synthetic.")
    hits = [k for k, v in _leaves(config) if v == value and not k.startswith(skip)]
    return hits[0] if len(hits) == 1 else f"a {rule} param"


def changes(job: plan.PlannedJob, before: list, now: list, config: dict) -> list[str]:
    """Readable changes of one job: ``name: old -> new`` (a JSON settings string key by key)."""
    model = job.wc.get("model")
    out = []
    old_d = [d for v in before if (d := _json_dict(v)) is not None]
    new_d = [d for v in now if (d := _json_dict(v)) is not None]
    if len(old_d) == 1 and len(new_d) == 1:
        old, new = old_d[0], new_d[0]
        for key in sorted(set(old) | set(new)):
            if old.get(key, "(unset)") != new.get(key, "(unset)"):
                name = key_source(config, job.rule, model, key)
                where = f" of model {model}" if model and not name.startswith("models.") else ""
                out.append(
                    f"{name}{where}: {_fmt(old.get(key, '(unset)'))} -> {_fmt(new.get(key, '(unset)'))}"
                )
        before = [v for v in before if _json_dict(v) is None]
        now = [v for v in now if _json_dict(v) is None]
    by_type_old, by_type_new = defaultdict(list), defaultdict(list)
    for v in before:
        by_type_old[type(v).__name__].append(v)
    for v in now:
        by_type_new[type(v).__name__].append(v)
    for kind in sorted(set(by_type_old) | set(by_type_new)):
        olds, news = by_type_old[kind], by_type_new[kind]
        if len(olds) == len(news) == 1:
            out.append(f"{value_source(config, job.rule, news[0])}: {_fmt(olds[0])} -> {_fmt(news[0])}")
        else:
            old_txt = ", ".join(map(_fmt, olds)) or "(none)"
            new_txt = ", ".join(map(_fmt, news)) or "(none)"
            out.append(f"params of rule {job.rule}: {old_txt} -> {new_txt}")
    return out


def _fmt(v) -> str:
    return json.dumps(v) if isinstance(v, list | dict) else str(v)


def other_reason(reason: str) -> str:
    r = reason.lower()
    for needle, label in (
        ("forced", "forced"),
        ("missing output", "outputs missing (never run, or deleted)"),
        ("incomplete output", "outputs incomplete (interrupted run)"),
        ("code has changed", "the rule's code changed"),
        ("set of input files has changed", "the rule's set of input files changed"),
        ("updated input files", "an input file is newer than the outputs"),
        ("input files updated by another job", "an upstream job reruns"),
    ):
        if needle in r:
            return label
    return reason or "(no reason given)"


@dataclass
class Why:
    changed: dict[str, list[plan.PlannedJob]]  # line -> jobs
    other: dict[str, list[plan.PlannedJob]]
    jobs: int


def explain(jobs: list[plan.PlannedJob], config: dict, directory: str | Path) -> Why:
    changed: dict[str, list] = defaultdict(list)
    other: dict[str, list] = defaultdict(list)
    for job in jobs:
        pc = params_change(job.reason)
        if pc is None:
            other[other_reason(job.reason)].append(job)
            continue
        before, now = pc
        recorded = recorded_params(directory, job.output[0]) if job.output else None
        if recorded is not None:  # the values recorded in .snakemake/metadata are the "before"
            before = [v for v in recorded if v in before] or before
        lines = changes(job, before, now, config) or ["params changed (no readable difference)"]
        for line in lines:
            changed[line].append(job)
    return Why(dict(changed), dict(other), len(jobs))


def _rules(jobs) -> str:
    return ", ".join(f"{r} {n}" for r, n in Counter(j.rule for j in jobs).most_common())


def format_why(w: Why) -> str:
    if not w.jobs:
        return "Nothing to do: no job is planned, so no config value changed."
    lines = []
    if w.changed:
        lines.append("Config values changed since the last run (params recorded by Snakemake):")
        for line, jobs in sorted(w.changed.items()):
            lines.append(f"  {line}: {len(jobs)} job{'s' if len(jobs) != 1 else ''} ({_rules(jobs)})")
    else:
        lines.append("No config value changed since the last run.")
    if w.other:
        lines.append(f"{sum(len(j) for j in w.other.values())} job(s) planned for other reasons:")
        for line, jobs in sorted(w.other.items()):
            lines.append(f"  {line}: {len(jobs)} job{'s' if len(jobs) != 1 else ''} ({_rules(jobs)})")
    lines.append(f"{w.jobs} jobs planned in all.")
    return "\n".join(lines)


def _run(args: argparse.Namespace) -> int:
    jobs, facts, _ = plan.dry_run(args.configfile, args.snakefile, args.directory)
    print(format_why(explain(jobs, facts["config"], args.directory)))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "why", help="config keys whose change reruns the planned jobs", description=__doc__
    )
    p.add_argument("--configfile", help="the workflow config (as for snakemake)")
    p.add_argument("--snakefile", default=str(plan.default_snakefile()))
    p.add_argument("--directory", default=".", help="working directory of the run")
    p.set_defaults(func=_run)
