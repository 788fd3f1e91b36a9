"""Install the Slurm profile where ``snakemake --profile slurm`` finds it (``deepnoise install-profile``).

Snakemake looks up a profile given by name in ``~/.config/snakemake/<name>`` (and
``/etc/xdg/snakemake/<name>``), not in the workflow's ``profiles/`` folder. This command copies
``profiles/slurm/config.yaml`` there (``--dest``, default ``~/.config/snakemake/slurm``) with the
site's settings filled in: the partition and account of every job (``default-resources``), the GPU
partition and GPU type of the GPU rules (``set-resources`` of train, finetune and predict). Every
comment of the shipped profile is kept; the filled keys replace their commented examples.

An existing profile is left alone unless it is the same text, or ``--force`` is given (it is then
replaced atomically). Afterwards, in the workflow's folder::

    snakemake --profile slurm --configfile my.yaml
"""

from __future__ import annotations

import argparse
import logging
import os
import re
from pathlib import Path

from deepnoise.atomic import write_text
from deepnoise.errors import InputError

log = logging.getLogger(__name__)

SOURCE = Path(__file__).resolve().parents[2] / "profiles" / "slurm" / "config.yaml"
GPU_RULES = ("train", "finetune", "predict")
# a site setting: letters, digits and the punctuation Slurm names use
_NAME = re.compile(r"^[A-Za-z0-9_.:+-]+$")


def default_dest() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "snakemake" / "slurm"


def _set(text: str, section: str, key: str, value: str, rule: str | None = None) -> str:
    """``text`` with the commented example ``# key: "..."`` of ``section`` (and of ``rule`` inside
    it) replaced by ``key: "value"``, indentation kept; InputError when the profile has no such
    example (the shipped profile changed)."""
    lines = text.splitlines(keepends=True)
    in_section = in_rule = rule is None
    for i, line in enumerate(lines):
        if not line.startswith((" ", "#", "\n")):
            in_section = line.startswith(f"{section}:")
            in_rule = rule is None
            continue
        if in_section and rule is not None and re.match(r"^  \S", line):
            in_rule = line.strip() == f"{rule}:"
            continue
        m = re.match(rf"^(\s+)#?\s*{re.escape(key)}: .*$", line)
        if in_section and in_rule and m:
            lines[i] = f'{m.group(1)}{key}: "{value}"\n'
            return "".join(lines)
    where = f"{section}.{rule}" if rule else section
    raise InputError(f"{SOURCE}: no `{key}:` line under {where} to fill in")


def profile_text(
    source: str,
    partition: str | None = None,
    account: str | None = None,
    gpu_partition: str | None = None,
    gpu_model: str | None = None,
) -> str:
    """The shipped profile with the site's settings filled in (None: left as shipped)."""
    for name, value in (
        ("--partition", partition),
        ("--account", account),
        ("--gpu-partition", gpu_partition),
        ("--gpu-model", gpu_model),
    ):
        if value is not None and not _NAME.match(value):
            raise InputError(f"{name} {value!r}: expected a Slurm name (letters, digits, _.:+-)")
    text = source
    if partition:
        text = _set(text, "default-resources", "slurm_partition", partition)
    if account:
        text = _set(text, "default-resources", "slurm_account", account)
    for rule in GPU_RULES:
        if gpu_partition:
            text = _set(text, "set-resources", "slurm_partition", gpu_partition, rule)
        if gpu_model:
            text = _set(text, "set-resources", "gpu_model", gpu_model, rule)
    return text


def install(dest: Path, text: str, force: bool = False) -> Path:
    """Write ``dest/config.yaml``; an existing, different one only with ``force``."""
    target = dest / "config.yaml"
    if target.exists() and target.read_text() != text and not force:
        raise InputError(
            f"{target}: a different profile is installed there; compare it with `deepnoise "
            "install-profile --print ...` and rerun with --force to replace it"
        )
    dest.mkdir(parents=True, exist_ok=True)
    write_text(target, text)
    return target


def _run(args: argparse.Namespace) -> int:
    try:
        source = Path(args.source).read_text()
    except OSError as exc:
        raise InputError(f"{args.source}: cannot read the shipped profile ({exc.strerror})") from exc
    text = profile_text(source, args.partition, args.account, args.gpu_partition, args.gpu_model)
    if args.print:
        print(text, end="")
        return 0
    target = install(Path(args.dest).expanduser(), text, args.force)
    print(f"installed {target}; run `snakemake --profile {target.parent.name} --configfile my.yaml`")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "install-profile",
        help="install the Slurm profile where `snakemake --profile slurm` finds it",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--partition", help="partition of every job (default: Slurm's default partition)")
    p.add_argument("--account", help="account of every job (default: the plugin guesses yours)")
    p.add_argument("--gpu-partition", help="partition of the GPU jobs (train, finetune, predict)")
    p.add_argument("--gpu-model", help="GPU type of the GPU jobs, as your site names it (e.g. a100)")
    p.add_argument("--dest", default=str(default_dest()), help="profile folder (default: %(default)s)")
    p.add_argument("--source", default=str(SOURCE), help="the shipped profile (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="replace a different installed profile")
    p.add_argument("--print", action="store_true", help="print the profile instead of installing it")
    p.set_defaults(func=_run)
