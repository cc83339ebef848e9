"""``laplace-vlm benchmark``: calibration, selective/failure, OOD and conformal rows of one data set."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from laplace_vlm.cli.errors import CliError
from laplace_vlm.docstrings import fill_doc
from laplace_vlm.validation import positive_number

DATASETS = (
    "digits",
    "fashion-mnist",
)  # laplace_vlm.experiments.recipe.DATASETS, without importing it


@fill_doc
def add_parser(sub) -> None:
    """Add the ``benchmark`` subcommand to ``sub``.

    %(cli_add_parser)s
    """
    p = sub.add_parser(
        "benchmark",
        help="uncertainty benchmark (calibration, selective, failure, OOD, conformal) offline",
    )
    p.add_argument("--dataset", choices=DATASETS, default="digits", help="in-distribution data")
    p.add_argument("--json", type=Path, help='write {"settings", "rows"} as JSON here')
    p.add_argument(
        "--format",
        choices=("rows", "clip_benchmark"),
        default="rows",
        help="what --json holds: the benchmark's rows (default) or CLIP_benchmark's result "
        "objects, one per condition and method, calibration metrics added",
    )
    p.add_argument("--out", type=Path, help="folder for the PNG figures (none if omitted)")
    p.add_argument(
        "--data-dir",
        type=Path,
        help="folder of Fashion-MNIST's four idx files (default /usr/share/datasets/fashion-mnist)",
    )
    p.add_argument("--cache-dir", type=Path, help="cache of the trained CLIPs")
    p.add_argument("--seed", type=int, default=0, help="split / training / caption / shift seed")
    p.add_argument(
        "--alpha", type=positive_number(float), default=0.1, help="conformal miscoverage"
    )
    p.add_argument(
        "--curvature-pairs",
        choices=("curvature", "train"),
        default="curvature",
        help="fit the curvature on the held-out curvature pairs (default) or on the stand-in's "
        "own training pairs (to measure what memorised pairs do)",
    )
    p.add_argument(
        "--retrain",
        action="store_true",
        help="train the stand-in here into the cache instead of loading the shipped one",
    )
    p.add_argument(
        "--train-seeds",
        type=positive_number(int),
        default=1,
        help="K stand-ins trained with seeds SEED..SEED+K-1 (the first is the shipped one); "
        "tables show mean ± SE, wins count only beyond 2 SE (default 1)",
    )
    p.add_argument(
        "--markdown",
        type=Path,
        help="write the README's result tables of this run here (an existing file is kept)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=run)


@fill_doc
def run(args: argparse.Namespace) -> int:
    """Run the benchmark of ``args.dataset``, print its tables, write ``--json`` and ``--out``.

    %(cli_run)s
    """
    from laplace_vlm.evaluation.markdown import write_new
    from laplace_vlm.evaluation.tables import write_json
    from laplace_vlm.experiments.benchmark import run_benchmark
    from laplace_vlm.experiments.experiment import ExperimentConfig
    from laplace_vlm.experiments.figures import write_plots
    from laplace_vlm.experiments.seeds import markdown_report, run_over_seeds, write_seed_json

    if not args.alpha < 1:
        raise CliError(f"--alpha must lie in (0, 1), got {args.alpha}")
    if args.format != "rows" and args.json is None:
        raise CliError(f"--format {args.format} needs --json PATH (the file it writes)")
    if args.data_dir is not None and not args.data_dir.is_dir():
        raise CliError(f"--data-dir: no such folder {args.data_dir}")
    if args.markdown is not None and args.markdown.exists():
        raise CliError(f"--markdown: {args.markdown} exists; remove it or choose another path")
    if args.retrain:
        print("--retrain: training the stand-in here into the cache (not the shipped weights)")
    start = time.perf_counter()
    try:
        config = ExperimentConfig(
            args.dataset,
            args.seed,
            args.cache_dir,
            args.data_dir,
            progress_bar=not args.no_progress,
            curvature_pairs=args.curvature_pairs,
            retrain=args.retrain,
        )
        results = run_over_seeds(config, args.train_seeds, run_benchmark, alpha=args.alpha)
    except FileNotFoundError as err:  # Fashion-MNIST's files are missing
        raise CliError(str(err).replace("data_dir:", "--data-dir:", 1)) from None
    result = results[0]
    if args.markdown is not None:
        print(f"markdown tables: {write_new(args.markdown, markdown_report(results))}")
    if len(results) > 1:
        print(markdown_report(results))
        print(f"(the tables below are those of training seed {args.seed} alone)")
    print(summary(result))
    for line in result.settings["skipped"]:
        print(f"skipped {line}")
    if args.out is not None:
        paths = write_plots(result, args.out)
        print(f"figures: {len(paths)} PNG files in {args.out.resolve()}")
    if args.json is not None and args.format == "clip_benchmark":
        from laplace_vlm.evaluation.clip_benchmark import write_clip_benchmark

        model = f"laplace-vlm stand-in CLIP ({args.dataset})"
        print(f"CLIP_benchmark results: {write_clip_benchmark(args.json, result.rows, model)}")
    elif args.json is not None and len(results) > 1:
        print(f"rows of every seed: {write_seed_json(args.json, results)}")
    elif args.json is not None:
        print(f"rows: {write_json(args.json, result.settings, result.rows)}")
    print(f"done in {time.perf_counter() - start:.0f} s")
    return 0


def summary(result) -> str:
    """The text tables of a ``BenchmarkResult``: calibration, then each task's headline metrics.

    Parameters
    ----------
    result : BenchmarkResult
        from :func:`laplace_vlm.experiments.benchmark.run_benchmark`.

    Returns
    -------
    str
        the tables, separated by blank lines, ending with the pseudo-counts and temperature.
    """
    from laplace_vlm.evaluation.regime import format_regime
    from laplace_vlm.evaluation.tables import pivot_table, select

    rows, tables = result.rows, [format_regime(result.settings["regime"])]
    tables.append(pivot_table(select(rows, task="calibration"), ("acc", "ece15", "nlpd")))
    for task, metrics, score in (
        ("selective", ("aurc",), "msp"),
        ("failure", ("auroc", "fpr95"), "msp"),
        *(
            ("conformal", ("coverage", "set_size", "empty_rate"), score)
            for score in ("lac", "lac_target50", "aps", "aps_target50")
        ),
    ):
        tables.append(pivot_table(select(rows, task=task), metrics, score=score))
    ood = select(rows, task="ood")
    for score in dict.fromkeys(r["score"] for r in ood):
        tables.append(pivot_table(ood, ("auroc", "fpr95"), score=score))
    settings = result.settings
    edge = settings["pseudo_count_at_grid_edge"]
    chosen = ", ".join(
        f"{m} n={n:g}" + (" (grid edge)" if edge.get(m) else "")
        for m, n in settings["pseudo_counts"].items()
    )
    tables.append(
        f"pseudo-counts: {chosen}\ntemperature scaling: T = {settings['temperature']:.3f}"
    )
    return "\n\n".join(tables)
