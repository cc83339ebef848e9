"""Checks of plain arguments: integer counts, bool switches, generators, command-line numbers."""

from __future__ import annotations

import argparse
import operator
from collections.abc import Callable

import torch


def check_int(name: str, value: object, minimum: int = 1) -> int:
    """An integer ``>= minimum`` (sample counts, chunk sizes, bins, iteration budgets).

    ``bool`` is refused (``True`` is not a count); numpy and 0-d integer torch scalars are
    accepted (anything with ``__index__``).

    Parameters
    ----------
    name : str
        the argument's name, for the error messages.
    value : object
        what was passed.
    minimum : int, default=1
        the smallest valid value.

    Returns
    -------
    int
        ``value`` as a Python int.

    Raises
    ------
    TypeError
        if ``value`` is not an integer (e.g. ``1.5``, ``"a"``, ``True``).
    ValueError
        if it is below ``minimum``.
    """
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, got the bool {value!r}.")
    try:
        number = operator.index(value)
    except TypeError:
        raise TypeError(
            f"{name} must be an integer, got {type(value).__name__} {value!r}."
        ) from None
    if number < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {number}.")
    return number


def check_optional_int(name: str, value: object, minimum: int = 1) -> int | None:
    """``None``, or :func:`check_int` of ``value``.

    Parameters
    ----------
    name : str
        the argument's name, for the error messages.
    value : object
        what was passed; None means "the default".
    minimum : int, default=1
        the smallest valid value.

    Returns
    -------
    int or None
        ``value`` as a Python int, or None.
    """
    return None if value is None else check_int(name, value, minimum)


def check_bool(name: str, value: object) -> bool:
    """A ``bool`` switch: a truthy tensor, string or number is refused, not interpreted.

    Parameters
    ----------
    name : str
        the argument's name, for the error messages.
    value : object
        what was passed.

    Returns
    -------
    bool
        ``value`` itself.

    Raises
    ------
    TypeError
        if ``value`` is not a bool.
    """
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}.")
    return value


def check_generator(name: str, value: object) -> torch.Generator | None:
    """``None`` or a ``torch.Generator`` (laplace refuses anything else as well).

    Parameters
    ----------
    name : str
        the argument's name, for the error messages.
    value : object
        what was passed.

    Returns
    -------
    torch.Generator or None
        ``value`` itself.

    Raises
    ------
    TypeError
        for anything else (a seed: wrap it in ``torch.Generator().manual_seed(seed)``).
    """
    if value is not None and not isinstance(value, torch.Generator):
        raise TypeError(
            f"{name} must be a torch.Generator or None, got {type(value).__name__}; for a seed "
            "pass torch.Generator().manual_seed(seed)."
        )
    return value


def positive_number(kind: type) -> Callable[[str], int | float]:
    """An argparse ``type=``: ``kind(text)`` if it is positive, else argparse's own error.

    One parser for every command line: the options of ``laplace-vlm fit`` / ``zeroshot`` /
    ``benchmark`` and the fields of the active-learning config (whose options are generated).

    Parameters
    ----------
    kind : {int, float}
        the number type.

    Returns
    -------
    callable
        ``str -> kind``, named ``positive_<kind>``; it raises ``argparse.ArgumentTypeError``
        (argparse prints the option and the message, and exits with code 2) for a non-number
        or a value <= 0.
    """
    if kind not in (int, float):
        raise ValueError(f"kind must be int or float, got {kind!r}.")

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    parse.__name__ = f"positive_{kind.__name__}"
    return parse
