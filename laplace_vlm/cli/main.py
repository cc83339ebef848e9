"""``laplace-vlm``: offline demo, benchmark and active learning; fit and zero-shot with open_clip.

Subcommands:

- ``demo``: the offline digits experiment of :mod:`laplace_vlm.experiments.demo`, with its figures.
- ``benchmark``: calibration, selective/failure, OOD and conformal rows of one demo data set.
- ``fit``: a posterior for an open_clip model from image-caption pairs, saved as safetensors.
- ``zeroshot``: predictions with uncertainty for a folder of images, as CSV.
- ``active``: active learning on the demo data sets, one cell or the sweep.

Expected failures (a missing checkpoint offline, a file that would be overwritten, bad paths)
end in one line on stderr with exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from laplace_vlm.cli import active, benchmark, demo, fit, zeroshot
from laplace_vlm.cli.errors import CliError


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line.

    Parameters
    ----------
    argv : Sequence of str or None, default=None
        the arguments; None: ``sys.argv[1:]``.

    Returns
    -------
    int
        the exit code: the subcommand's, or 2 after a :class:`CliError` (one line on stderr).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CliError as err:
        print(f"laplace-vlm {args.command}: error: {err}", file=sys.stderr)
        return 2


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The argument parser; ``argv`` decides whether the active-learning module is imported.

    Parameters
    ----------
    argv : Sequence of str, default=()
        the arguments; ``active``'s options are added only if ``argv[0] == "active"``.

    Returns
    -------
    argparse.ArgumentParser
        with one subparser per subcommand.
    """
    parser = argparse.ArgumentParser(
        prog="laplace-vlm", description="Post-hoc Laplace uncertainty for CLIP/SigLIP."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo.add_parser(sub)
    benchmark.add_parser(sub)
    fit.add_parser(sub)
    zeroshot.add_parser(sub)
    active.add_parser(sub, wanted=bool(argv) and argv[0] == "active")
    return parser


if __name__ == "__main__":
    raise SystemExit(main())
