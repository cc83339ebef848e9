"""The offline demo: zero-shot calibration of the digits CLIP, clean and under shift.

A small view of the benchmark (:mod:`laplace_vlm.experiments.benchmark`) on the embedded digits:
the tasks calibration, selective and failure prediction, the methods MAP, temperature scaling,
the paper's method (``bayesvlm``), the Laplace predictives at the pseudo-count chosen on
validation NLPD and the exact-prior form; the regime card says how far the stand-in is from
a real CLIP. Its JSON has the benchmark's schema.
"""

from __future__ import annotations

import os

from laplace_vlm.evaluation.pseudo_count import PSEUDO_COUNTS
from laplace_vlm.evaluation.regime import format_regime
from laplace_vlm.evaluation.tables import pivot_table, select, write_json
from laplace_vlm.experiments.benchmark import BenchmarkResult, run_benchmark
from laplace_vlm.experiments.experiment import ExperimentConfig
from laplace_vlm.experiments.figures import write_plots
from laplace_vlm.experiments.recipe import SEVERITIES

DEMO_TASKS: tuple[str, ...] = ("calibration", "selective", "failure")


def run_demo(
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    out_dir: str | os.PathLike | None = None,
    json_path: str | os.PathLike | None = None,
    progress_bar: bool = True,
    train_config: dict | None = None,
    severities: tuple[float, ...] = SEVERITIES,
    pseudo_counts: tuple[float, ...] = PSEUDO_COUNTS,
    retrain: bool = False,
) -> BenchmarkResult:
    """Run the demo (prints nothing but progress bars).

    Parameters
    ----------
    seed : int
        seed of the data split, the model's training, the captions, the class batches, the
        shifts and the Monte Carlo draws (a seed other than 0 trains and caches its own model).
    cache_dir : path, optional
        cache of the trained model (see ``recipe.load_clip``).
    out_dir : path, optional
        folder of the PNG figures (``laplace-vlm demo`` passes ``laplace-vlm-demo``); no
        figures if None. Only the files ``figures.plot_names`` lists are written there.
    json_path : path, optional
        where ``{"settings": ..., "rows": ...}`` goes as JSON.
    progress_bar : bool
        show the training progress.
    train_config : dict, optional
        overrides of the training set-up (tests use a tiny budget).
    severities : tuple of float
        shift severities to evaluate, in ``(0, 1]``.
    pseudo_counts : tuple of float
        the validation grid of the pseudo-count ``n``.
    retrain : bool
        train the digits stand-in here into the cache instead of loading the shipped one.

    Returns
    -------
    BenchmarkResult
        the digits benchmark's calibration, selective and failure rows and its settings.
    """
    config = ExperimentConfig(
        "digits",
        seed,
        cache_dir,
        progress_bar=progress_bar,
        train_config=train_config,
        pseudo_counts=pseudo_counts,
        retrain=retrain,
    )
    result = run_benchmark(config, tasks=DEMO_TASKS, severities=severities)
    if out_dir is not None:
        write_plots(result, out_dir, pseudo_counts)
    if json_path is not None:
        write_json(json_path, result.settings, result.rows)
    return result


def format_report(result: BenchmarkResult) -> str:
    """The demo's text: the regime card, accuracy, ECE (20 bins) / NLPD, failure AUROC (MSP).

    Parameters
    ----------
    result : BenchmarkResult
        a finished run.

    Returns
    -------
    str
        the regime card and the three pivot tables, separated by blank lines.
    """
    calibration = select(result.rows, task="calibration")
    failure = select(result.rows, task="failure", score="msp")
    return "\n\n".join(
        [
            format_regime(result.settings["regime"]),
            pivot_table(calibration, ("acc",)),
            pivot_table(calibration, ("ece20", "nlpd")),
            pivot_table(failure, ("auroc",), score="msp"),
        ]
    )
