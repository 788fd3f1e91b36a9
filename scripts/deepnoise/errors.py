"""Errors that name the input at fault; the CLI prints them without a traceback and exits 2."""


class InputError(Exception):
    """A bad input: the message names the file, plate, well, site or config key at fault."""
