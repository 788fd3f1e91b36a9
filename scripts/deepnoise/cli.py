"""Command-line entry point: ``deepnoise <subcommand>``; one subcommand per workflow rule."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from deepnoise import __version__
from deepnoise.errors import InputError

# Modules that contribute subcommands through ``register(subparsers)``. Imported lazily on use so
# that ``deepnoise sites`` does not pay for importing torch.
SUBCOMMAND_MODULES = {
    "synthesize": "synth",
    "sites": "metadata",
    "stack": "stacks",
    "plate-stats": "stats",
    "aggregate-stats": "stats",
    "train": "train",
    "predict": "predict",
    "ensemble": "ensemble",
    "balance": "balance",
    "pseudo-labels": "pseudo",
    "metrics": "evaluate",
    "submission": "evaluate",
    "summary": "evaluate",
    "plot-training": "report",
    "plot-summary": "report",
    "plot-composites": "report",
    "report-table": "report",
    "report-provenance": "report",
    "bench": "bench",
    "plan": "plan",
    "why": "why",
    "dag-html": "dag",
    "dag-rules": "dag",
    "dag-slice": "dag",
    "install-profile": "profile",
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deepnoise", description=__doc__)
    parser.add_argument("--version", action="version", version=f"deepnoise {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    modules = (
        [SUBCOMMAND_MODULES[command]]
        if command in SUBCOMMAND_MODULES
        else list(dict.fromkeys(SUBCOMMAND_MODULES.values()))
    )
    for name in modules:
        module = importlib.import_module(f"deepnoise.{name}")
        module.register(sub)
    return parser


def _command_of(argv: list[str]) -> str | None:
    return next((a for a in argv if not a.startswith("-")), None)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(_command_of(argv))
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.func(args) or 0)
    except InputError as exc:
        print(f"deepnoise {args.command}: error: {_message(exc)}", file=sys.stderr)
        return 2


def _message(exc: InputError) -> str:
    """The error's own message; a DataLoader worker's re-raised error carries the worker's
    traceback, whose last line is the original message."""
    text = str(exc).strip()
    if "Original Traceback" in text:
        last = text.splitlines()[-1]
        return last.split("InputError: ", 1)[-1]
    return text


if __name__ == "__main__":
    sys.exit(main())
