"""``laplace-vlm active``: active learning on the digits demo (imported only when used)."""

from __future__ import annotations

import importlib


def add_parser(sub, wanted: bool) -> None:
    p = sub.add_parser("active", help="active learning with the posterior (see `active --help`)")
    if wanted:  # importing the experiment costs time: only when the subcommand runs
        module = importlib.import_module("laplace_vlm.demo.active")
        module.configure_parser(p)
        p.set_defaults(func=module.main)
