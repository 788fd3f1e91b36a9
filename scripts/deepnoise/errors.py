"""Errors that name the input at fault; the CLI prints them without a traceback and exits 2."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class InputError(Exception):
    """A bad input: the message names the file, plate, well, site or config key at fault."""


def did_you_mean(word: str, options: Iterable[str]) -> str:
    """`` (did you mean a, b?)`` with up to 3 close matches of ``word``, or ``""``."""
    near = difflib.get_close_matches(word, list(options), n=3, cutoff=0.6)
    return f" (did you mean {', '.join(near)}?)" if near else ""
