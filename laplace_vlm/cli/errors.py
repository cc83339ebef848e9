"""Expected command-line failures: one line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

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
