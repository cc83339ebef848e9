"""``laplace-vlm demo``: the offline digits experiment, with its figures."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from laplace_vlm.docstrings import fill_doc

DEFAULT_OUT = Path("laplace-vlm-demo")


@fill_doc
def add_parser(sub) -> None:
    """Add the ``demo`` subcommand to ``sub``.

    %(cli_add_parser)s
    """
    p = sub.add_parser("demo", help="offline zero-shot calibration demo on handwritten digits")
    p.add_argument("--json", type=Path, help='write {"settings", "rows"} as JSON here')
    p.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help=f"folder for the PNG figures (default: {DEFAULT_OUT}); only the demo's own file "
        "names are written there, other files are left alone",
    )
    p.add_argument("--no-plots", action="store_true", help="write no figures")
    p.add_argument("--cache-dir", type=Path, help="cache of the trained digits CLIP")
    p.add_argument("--seed", type=int, default=0, help="data split / caption / shift seed")
    p.add_argument(
        "--retrain",
        action="store_true",
        help="train the digits stand-in here into the cache instead of loading the shipped one",
    )
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=run)


@fill_doc
def run(args: argparse.Namespace) -> int:
    """Run the demo, print its tables, write the figures (unless ``--no-plots``) and ``--json``.

    %(cli_run)s
    """
    from laplace_vlm.experiments.demo import format_report, run_demo

    start = time.perf_counter()
    out = None if args.no_plots else args.out
    if args.retrain:
        print("--retrain: training the digits stand-in here into the cache (not the shipped one)")
    result = run_demo(
        args.seed, args.cache_dir, out, args.json, not args.no_progress, retrain=args.retrain
    )
    print(format_report(result))
    chosen = ", ".join(f"{m} n={n:g}" for m, n in result.settings["pseudo_counts"].items())
    print(f"\npseudo-counts chosen on validation NLPD: {chosen}")
    print(f"temperature scaling: T = {result.settings['temperature']:.3f}")
    if out is not None:
        print(f"figures: {out.resolve()}")
    if args.json is not None:
        print(f"metrics: {args.json}")
    print(f"done in {time.perf_counter() - start:.0f} s")
    return 0
