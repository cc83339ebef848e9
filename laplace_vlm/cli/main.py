"""``laplace-vlm``: the offline demo, and fitting / zero-shot prediction with real open_clip models.

Subcommands:

- ``demo``: the digits experiment of :mod:`laplace_vlm.demo.run` (offline, a few minutes).
- ``fit``: a posterior for an open_clip model from image-caption pairs, saved as safetensors.
- ``zeroshot``: predictions with uncertainty for a folder of images, as CSV.
- ``active``: active learning on the digits demo (:mod:`laplace_vlm.demo.active`, imported only when used).

Expected failures (a missing checkpoint offline, a file that would be overwritten, bad paths)
end in one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from laplace_vlm.cli import active, benchmark, demo, fit, zeroshot
from laplace_vlm.cli.errors import CliError


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CliError as err:
        print(f"laplace-vlm {args.command}: error: {err}", file=sys.stderr)
        return 2


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The argument parser; ``argv`` decides whether the active-learning module is imported."""
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
