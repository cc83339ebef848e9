"""``laplace-vlm active``: active learning on the demo data sets, one cell or the sweep.

The options are generated from the fields of the config dataclasses
(:class:`laplace_vlm.active.config.ActiveLearningConfig`, the demo's ``DemoSetting`` and the
sweep's ``SweepSetting``): their defaults, help texts and argparse types live in one place.
The experiment modules are imported only when the subcommand runs.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from laplace_vlm.cli.errors import CliError
from laplace_vlm.docstrings import fill_doc


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, title: str) -> None:
    """One ``--field-name`` option per field of the dataclass ``cls``.

    The default is the field's; ``help`` and argparse keywords (``type``, ``choices``) come
    from the field's metadata; without a ``type`` the default's type is used, and a bool
    becomes ``--flag / --no-flag``.

    Parameters
    ----------
    parser : argparse.ArgumentParser
        where the options go (in an argument group ``title``).
    cls : type
        a dataclass whose fields all have defaults.
    title : str
        the group's title in ``--help``.
    """
    group = parser.add_argument_group(title)
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kwargs: dict[str, Any] = {k: v for k, v in f.metadata.items() if k != "help"}
        help_text = f"{f.metadata.get('help', '')} (default: {_show(default)})"
        if isinstance(default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            if "choices" not in kwargs:
                kwargs.setdefault("metavar", f.name.upper())
            if "type" not in kwargs and default is not None:
                kwargs["type"] = type(default)
        group.add_argument(f"--{f.name.replace('_', '-')}", dest=f"{cls.__name__}.{f.name}",
                           default=default, help=help_text, **kwargs)  # fmt: skip


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value) if len(value) < 12 else f"{len(value)} values"
    return str(value)


def dataclass_from_args(cls: type, args: argparse.Namespace):
    """``cls(**fields)`` from the options :func:`add_dataclass_arguments` added.

    The dataclass's validation error (a ``ValueError`` naming the field) ends the command
    with that message and exit code 2.

    Parameters
    ----------
    cls : type
        the dataclass.
    args : argparse.Namespace
        parsed arguments.

    Returns
    -------
    object
        the ``cls`` instance.

    Raises
    ------
    CliError
        with the dataclass's ``ValueError`` message.
    """
    values = {f.name: getattr(args, f"{cls.__name__}.{f.name}") for f in dataclasses.fields(cls)}
    try:
        return cls(**values)
    except ValueError as err:
        raise CliError(str(err)) from None


def configure_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """All options of ``laplace-vlm active``.

    Parameters
    ----------
    parser : argparse.ArgumentParser
        the subcommand's parser, filled in and returned.

    Returns
    -------
    argparse.ArgumentParser
        ``parser``.
    """
    from laplace_vlm.active.config import ActiveLearningConfig
    from laplace_vlm.experiments.active import DemoSetting
    from laplace_vlm.experiments.active_sweep import SweepSetting

    parser.description = (
        "Active few-shot adaptation on the demo data: pool = clean + shifted training images, "
        "target = shifted test images; accuracy/ECE/NLPD vs labelled budget, paired "
        "differences to targeted random and MAP entropy. --sweep runs every cell of the grid."
    )
    parser.add_argument("--sweep", action="store_true", help="run the sweep over data sets, "
                        "shifts and severities instead of one cell")  # fmt: skip
    parser.add_argument("--json", type=Path, default=None, help="write the summary JSON here "
                        "(required with --sweep, which writes it after every cell)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=None, help="folder for the PNG plots")
    parser.add_argument("--markdown", type=Path, default=None, metavar="PATH",
                        help="also write the report's tables as markdown to PATH (a new file: "
                        "an existing one is refused)")  # fmt: skip
    parser.add_argument("--train-seeds", type=int, default=1, metavar="K",
                        help="run the cell on K stand-ins trained with seeds --train-seed .. "
                        "+K-1 (0 is the shipped one; others are trained into the cache on first "
                        "use) and report means and standard errors over them; --workers runs "
                        "stand-ins in parallel (default: 1)")  # fmt: skip
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (the matrices are tiny: 1 is fastest)")  # fmt: skip
    parser.add_argument("--progress-bar", action=argparse.BooleanOptionalAction, default=True)
    add_dataclass_arguments(parser, ActiveLearningConfig, "experiment")
    add_dataclass_arguments(parser, DemoSetting, "data (one cell)")
    add_dataclass_arguments(parser, SweepSetting, "sweep (with --sweep)")
    return parser


@fill_doc
def run(args: argparse.Namespace) -> int:
    """Run ``laplace-vlm active``: the one cell, or the sweep with ``--sweep``.

    The options are those of :func:`configure_parser`.

    %(cli_run)s
    """
    from laplace_vlm.active.config import ActiveLearningConfig
    from laplace_vlm.experiments import active, active_standins, active_sweep, recipe

    if args.threads < 1:
        raise CliError(f"--threads must be >= 1, got {args.threads}")
    if args.train_seeds < 1:
        raise CliError(f"--train-seeds must be >= 1, got {args.train_seeds}")
    if args.markdown is not None and args.markdown.exists():
        raise CliError(f"--markdown: {args.markdown} exists; remove it or choose another path")
    if args.sweep and args.train_seeds > 1:
        raise CliError("--train-seeds runs one cell on several stand-ins; with --sweep, run "
                       "the sweep once per --train-seed instead")  # fmt: skip
    config = dataclass_from_args(ActiveLearningConfig, args)
    setting = dataclass_from_args(active.DemoSetting, args)
    sweep = dataclass_from_args(active_sweep.SweepSetting, args)  # also the --workers of the rest
    with recipe.torch_threads(args.threads):
        if args.train_seeds > 1:
            return active_standins.main(setting, config, args.train_seeds, sweep.workers,
                                        args.json, args.out, args.markdown)  # fmt: skip
        if args.sweep:
            if args.json is None:
                raise CliError("--sweep needs --json PATH: it writes its results there after "
                               "every cell")  # fmt: skip
            return active_sweep.main(sweep, config, setting, args.json, args.out,
                                     args.progress_bar, args.markdown)  # fmt: skip
        return active.main(setting, config, args.json, args.out, args.progress_bar,
                           sweep.workers, args.markdown)  # fmt: skip


@fill_doc
def add_parser(sub, wanted: bool) -> None:
    """Register ``active``; its options (and imports) only when it is the command run.

    Parameters
    ----------
    %(subparsers)s
    wanted : bool
        whether ``active`` is the command being run.
    """
    p = sub.add_parser("active", help="active learning with the posterior (see `active --help`)")
    if wanted:
        configure_parser(p)
        p.set_defaults(func=run)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(run(configure_parser(argparse.ArgumentParser()).parse_args()))
