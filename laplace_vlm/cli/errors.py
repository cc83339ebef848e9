"""Expected command-line failures: one line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path


class CliError(Exception):
    """An expected failure: its message is printed as one line and the exit code is 2."""


def check_output(path: Path, overwrite: bool) -> None:
    """Fail with a :class:`CliError` unless ``--output`` ``path`` may be written.

    Parameters
    ----------
    path : Path
        the output file.
    overwrite : bool
        whether an existing ``path`` may be replaced.
    """
    if path.exists() and not overwrite:
        raise CliError(f"--output: {path} exists; pass --overwrite to replace it")
    if not path.parent.is_dir():
        raise CliError(f"--output: folder {path.parent} does not exist")


def positive(kind: type) -> Callable[[str], float]:
    """An argparse ``type=``: ``kind(text)`` if it is positive, else argparse's own error.

    Parameters
    ----------
    kind : type
        ``int`` or ``float``.

    Returns
    -------
    Callable[[str], float]
        the parser; it raises ``argparse.ArgumentTypeError`` for a non-number or a value <= 0.
    """

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    parse.__name__ = f"positive {kind.__name__}"
    return parse
