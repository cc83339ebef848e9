"""The PNG figures of a benchmark or demo run, and the pseudo-count sweep they show.

:func:`write_plots` writes only the files :func:`plot_names` lists into the folder (creating
it): files already there under those names are replaced, every other file is left alone.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from itertools import product
from pathlib import Path

import torch

from laplace_vlm.docstrings import fill_doc
from laplace_vlm.evaluation.metrics import classification_metrics
from laplace_vlm.evaluation.plots import (
    pseudo_count_plot,
    reliability_diagram,
    risk_coverage_plot,
    score_histograms,
    severity_plot,
)
from laplace_vlm.evaluation.pseudo_count import PSEUDO_COUNTS, tune_prior_at
from laplace_vlm.evaluation.selective import risk_coverage_curve
from laplace_vlm.evaluation.tables import condition_label, select
from laplace_vlm.experiments.benchmark import BenchmarkResult
from laplace_vlm.experiments.methods import (
    LAPLACE_PREDICTIVES,
    PAPER_METHOD,
    laplace_method,
    predictive_kwargs,
)
from laplace_vlm.experiments.recipe import torch_threads

# (task, metric, score) of the metric-vs-severity figures
SEVERITY_FIGURES: tuple[tuple[str, str, str | None], ...] = (
    ("calibration", "acc", None),
    ("calibration", "ece20", None),
    ("calibration", "nlpd", None),
    ("selective", "aurc", "msp"),
    ("failure", "auroc", "msp"),
    ("conformal", "coverage", "lac"),
    ("conformal", "set_size", "lac"),
)
# the OOD histograms: the MAP baselines and the paper's method's scores
OOD_PANELS: tuple[tuple[str, str], ...] = (
    ("map", "msp"),
    ("map", "mcm"),
    (PAPER_METHOD, "msp"),
    (PAPER_METHOD, "mcm"),
    (PAPER_METHOD, "mutual_information"),
    (PAPER_METHOD, "expected_logit_variance"),
)
SWEEP_METRICS: tuple[str, ...] = ("ece20", "nlpd")

# the input of every figure
_fill_doc = fill_doc.extend(
    finished_run="""
        result : BenchmarkResult
            a finished run.
        """
)


@_fill_doc
def figure_methods(result: BenchmarkResult) -> list[str]:
    """The methods drawn: MAP, temperature, the paper's method, each predictive at its chosen n.

    Parameters
    ----------
    %(finished_run)s

    Returns
    -------
    list of str
        method names (the exact-prior comparison is left to the tables).
    """
    methods = [
        "map",
        "temperature",
        PAPER_METHOD,
        *(laplace_method(p) for p in LAPLACE_PREDICTIVES),
    ]
    return [m for m in methods if m in result.experiment.methods]


@_fill_doc
def plot_names(result: BenchmarkResult, sweep: bool = True) -> list[str]:
    """The file names :func:`write_plots` writes for ``result``.

    Parameters
    ----------
    %(finished_run)s
    sweep : bool
        whether the pseudo-count figure is included.

    Returns
    -------
    list of str
        the PNG names: reliability diagrams of the kept conditions, the risk-coverage curve,
        the severity figures with rows, the OOD histograms and, with ``sweep``, the sweep.
    """
    names = [f"reliability_{condition_label(*key).replace(' ', '_')}.png" for key in result.kept]
    names.append("risk_coverage_clean.png")
    for task, metric, score in SEVERITY_FIGURES:
        if select(result.rows, task=task, metric=metric, score=score):
            names.append(f"severity_{task}_{metric}.png")
    names += [f"ood_{ood_set}.png" for ood_set in result.ood_scores]
    return names + (["pseudo_count.png"] if sweep else [])


@_fill_doc
def write_plots(
    result: BenchmarkResult,
    out_dir: str | os.PathLike,
    pseudo_counts: Sequence[float] | None = PSEUDO_COUNTS,
) -> list[Path]:
    """Write the figures of ``result`` into ``out_dir``.

    Parameters
    ----------
    %(finished_run)s
    out_dir : path
        the folder (created if missing).
    pseudo_counts : sequence of float or None
        grid of the pseudo-count figure; None leaves that figure out.

    Returns
    -------
    list of Path
        the files written, in the order of :func:`plot_names`.
    """
    out, methods = Path(out_dir), figure_methods(result)
    names = iter(plot_names(result, pseudo_counts is not None))
    paths = []
    for key, (_, predictions) in result.kept.items():
        probs = {m: predictions[m].probs for m in methods}
        title = f"{result.experiment.dataset}, {condition_label(*key)}"
        paths.append(reliability_diagram(probs, result.labels, out / next(names), title=title))
    clean = result.kept[("clean", 0.0)][1]
    curves = {
        m: risk_coverage_curve(clean[m].probs.amax(-1), clean[m].probs.argmax(-1) == result.labels)
        for m in methods
    }
    paths.append(risk_coverage_plot(curves, out / next(names), title="clean test, MSP"))
    for task, metric, score in SEVERITY_FIGURES:
        if select(result.rows, task=task, metric=metric, score=score):
            paths.append(
                severity_plot(result.rows, metric, out / next(names), task, score, methods)
            )
    for ood_set, scores in result.ood_scores.items():
        panels = {
            f"{m} {score}": scores[m, score] for m, score in OOD_PANELS if (m, score) in scores
        }
        title = f"{result.experiment.dataset} vs {ood_set}"
        paths.append(score_histograms(panels, out / next(names), title=title))
    if pseudo_counts is not None:
        sweep = pseudo_count_sweep(result, pseudo_counts)
        chosen = {m: s.setting.pseudo_count for m, s in result.experiment.settings.items()}
        paths.append(
            pseudo_count_plot(
                sweep,
                SWEEP_METRICS,
                out / next(names),
                chosen,
                title="dotted: n chosen on clean validation NLPD",
            )
        )
    return paths


def pseudo_count_sweep(
    result: BenchmarkResult, pseudo_counts: Sequence[float] = PSEUDO_COUNTS
) -> dict[str, dict[str, dict[float, dict[str, float]]]]:
    """Calibration metrics of every Laplace predictive at every pseudo-count of a grid.

    Evaluated on the conditions of ``result.kept`` (clean test and each shift's strongest
    severity); the prior precision is re-tuned at each ``n``, as in the selection. This is
    the trade-off that the choice on clean validation NLPD resolves.

    Parameters
    ----------
    result : BenchmarkResult
        a finished run (its posterior is left at the last grid point).
    pseudo_counts : sequence of float
        the grid.

    Returns
    -------
    dict
        ``{method: {condition: {n: {metric: value}}}}``.
    """
    exp = result.experiment
    inputs = {condition_label(*k): exp.classifier.inputs(a) for k, (a, _) in result.kept.items()}
    predictives = predictive_kwargs(exp.seed, exp.mc_samples)
    sweep: dict = {method: {c: {} for c in inputs} for method in predictives}
    with torch_threads(1), torch.no_grad():
        for n in pseudo_counts:
            tune_prior_at(exp.la, n)
            for (method, kwargs), (condition, x) in product(predictives.items(), inputs.items()):
                metrics = classification_metrics(exp.la(x, **kwargs), result.labels)
                sweep[method][condition][float(n)] = metrics
    return sweep
