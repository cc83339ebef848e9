"""Expected command-line failures: one line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

from pathlib import Path


class CliError(Exception):
    """An expected failure: its message is printed as one line and the exit code is 2."""


def check_output(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise CliError(f"--output: {path} exists; pass --overwrite to replace it")
    if not path.parent.is_dir():
        raise CliError(f"--output: folder {path.parent} does not exist")


def check_positive(flag: str, value: float | None) -> None:
    if value is not None and not value > 0:
        raise CliError(f"{flag} must be positive, got {value}")
