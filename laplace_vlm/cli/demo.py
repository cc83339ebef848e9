"""``laplace-vlm demo``: the offline digits experiment."""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="offline zero-shot calibration demo on handwritten digits")
    p.add_argument("--json", type=Path, help="write the metrics as JSON here")
    p.add_argument("--out", type=Path, help="folder for the PNG plots (none if omitted)")
    p.add_argument("--cache-dir", type=Path, help="cache of the trained digits CLIP")
    p.add_argument("--seed", type=int, default=0, help="data split / caption / shift seed")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from laplace_vlm.demo.run import format_table, run_demo

    start = time.perf_counter()
    result = run_demo(args.seed, args.cache_dir, args.out, args.json, not args.no_progress)
    print(format_table(result.results))
    chosen = ", ".join(f"{m} n={n:g}" for m, n in result.pseudo_counts.items())
    print(f"\npseudo-counts chosen on validation NLPD: {chosen}")
    print(f"temperature scaling: T = {result.temperature:.3f}")
    if args.out is not None:
        print(f"plots: {args.out}")
    if args.json is not None:
        print(f"metrics: {args.json}")
    print(f"done in {time.perf_counter() - start:.0f} s")
    return 0
