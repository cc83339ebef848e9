"""Figures of the evaluation, saved as PNG.

Drawn on ``matplotlib.figure.Figure`` objects, never through ``pyplot``: no backend switch, no
global figure state, nothing shown in the user's session. Every function writes exactly the
file it is given (parent folders are created) and returns its path.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence, Sized
from pathlib import Path

import torch
from matplotlib.figure import Figure

from laplace_vlm.docstrings import fill_doc
from laplace_vlm.evaluation.metrics import ECE_BINS, ece, reliability_bins
from laplace_vlm.evaluation.tables import Row, select

_fill_doc = fill_doc.extend(
    png="""
        path : str or os.PathLike
            the PNG to write (parent folders are created).
        """,
    figure_title="""
        title : str, optional
            the figure's title.
        """,
    png_returns="""
        Returns
        -------
        Path
            ``path`` as a ``pathlib.Path``, the PNG written.
        """,
)


@_fill_doc
def reliability_diagram(
    probs_by_method: Mapping[str, torch.Tensor],
    labels: torch.Tensor,
    path: str | os.PathLike,
    n_bins: int = ECE_BINS,
    title: str | None = None,
) -> Path:
    """One reliability diagram per method, side by side.

    Parameters
    ----------
    probs_by_method : mapping of str to torch.Tensor
        method name -> `(N, C)` predictive probabilities on the same inputs.
    %(labels)s
    %(png)s
    n_bins : int
        bins of the diagram and of the ECE in each panel's title.
    %(figure_title)s

    %(png_returns)s
    """
    fig, axes = _row_of_panels(probs_by_method, "probs_by_method", (3.0, 3.4))
    centers = (torch.arange(n_bins, dtype=torch.float64) + 0.5) / n_bins
    for ax, (method, probs) in zip(axes, probs_by_method.items()):
        # the ECE's own bins (metrics.reliability_bins): the bars are what the title's ECE sums
        _, acc, count = reliability_bins(probs, labels, n_bins)
        filled = count > 0
        ax.bar(
            centers[filled].numpy(),
            acc[filled].numpy(),
            width=1.0 / n_bins,
            edgecolor="k",
            linewidth=0.4,
        )
        ax.plot([0, 1], [0, 1], "--", color="grey", linewidth=1)
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", aspect="equal")
        ax.set_title(f"{method}\nECE{n_bins} {ece(probs, labels, n_bins):.3f}", fontsize=8)
    axes[0].set_ylabel("accuracy")
    return _save(fig, path, title)


@_fill_doc
def severity_plot(
    rows: Iterable[Row],
    metric: str,
    path: str | os.PathLike,
    task: str = "calibration",
    score: str | None = None,
    methods: Sequence[str] | None = None,
) -> Path:
    """``metric`` against shift severity, one panel per shift, one line per method.

    The ``"clean"`` rows (severity 0) start every shift's line.

    Parameters
    ----------
    rows : iterable of dict
        benchmark rows (see :mod:`laplace_vlm.evaluation.tables`) of one data set.
    metric : str
        e.g. ``"ece15"``, ``"nlpd"``, ``"aurc"``.
    %(png)s
    task : str
        whose rows.
    score : str, optional
        the score of the rows (None for tasks without one).
    methods : sequence of str, optional
        the methods to draw, in legend order; all methods of the rows if None.

    %(png_returns)s
    """
    rows = select(rows, task=task, metric=metric, score=score)
    shifts = list(dict.fromkeys(r["condition"] for r in rows if r["condition"] != "clean"))
    if not shifts:
        raise ValueError(f"rows hold no shifted {task} rows of metric {metric!r}.")
    methods = list(methods or dict.fromkeys(r["method"] for r in rows))
    fig, axes = _row_of_panels(shifts, "shifts", (3.2, 3.0))
    for ax, shift in zip(axes, shifts):
        for method in methods:
            points = sorted(
                (r["severity"], r["value"])
                for r in rows
                if r["method"] == method
                and r["condition"] in ("clean", shift)
                and r["value"] is not None
            )
            if points:
                ax.plot(*zip(*points), marker="o", markersize=3, label=method)
        ax.set(title=shift, xlabel="severity", ylabel=metric)
    axes[-1].legend(fontsize=6)
    return _save(fig, path)


@_fill_doc
def risk_coverage_plot(
    curves: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    path: str | os.PathLike,
    title: str | None = None,
) -> Path:
    """Selective risk against coverage, one line per method or score.

    Parameters
    ----------
    curves : mapping of str to (coverage, risk)
        label -> the two `(T,)` tensors of ``selective.risk_coverage_curve``.
    %(png)s
    %(figure_title)s

    %(png_returns)s
    """
    if not curves:
        raise ValueError("curves must hold at least one curve.")
    fig = Figure(figsize=(4.6, 3.4))
    ax = fig.subplots()
    for label, (cov, risk) in curves.items():
        ax.step(cov.numpy(), risk.numpy(), where="post", label=label, linewidth=1)
    ax.set(xlabel="coverage", ylabel="risk (error rate)", xlim=(0, 1), ylim=(0, None))
    ax.legend(fontsize=6)
    return _save(fig, path, title)


@_fill_doc
def score_histograms(
    scores: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    path: str | os.PathLike,
    labels: tuple[str, str] = ("in-distribution", "OOD"),
    title: str | None = None,
) -> Path:
    """Histograms of a score on two groups (e.g. ID vs OOD), one panel per score.

    Parameters
    ----------
    scores : mapping of str to (torch.Tensor, torch.Tensor)
        panel title -> `(N_a,)` and `(N_b,)` scores of the two groups.
    %(png)s
    labels : tuple of str
        names of the two groups, for the legend.
    %(figure_title)s

    %(png_returns)s
    """
    fig, axes = _row_of_panels(scores, "scores", (3.0, 2.8))
    for ax, (name, groups) in zip(axes, scores.items()):
        lo = min(float(g.min()) for g in groups)
        hi = max(float(g.max()) for g in groups)
        bins = torch.linspace(lo, hi if hi > lo else lo + 1e-9, 31).numpy()
        for group, label in zip(groups, labels):
            ax.hist(group.double().numpy(), bins=bins, alpha=0.55, density=True, label=label)
        ax.set_title(name, fontsize=8)
    axes[0].legend(fontsize=6)
    return _save(fig, path, title)


@_fill_doc
def pseudo_count_plot(
    sweep: Mapping[str, Mapping[str, Mapping[float, Mapping[str, float]]]],
    metrics: tuple[str, ...],
    path: str | os.PathLike,
    chosen: Mapping[str, float] | None = None,
    title: str | None = None,
) -> Path:
    """Metrics against the pseudo-count ``n`` (log axis), one panel per (metric, method).

    Parameters
    ----------
    sweep : mapping
        ``{method: {condition: {n: {metric: value}}}}``; one line per condition.
    metrics : tuple of str
        the rows of panels, e.g. ``("ece15", "nlpd")``.
    %(png)s
    chosen : mapping of str to float, optional
        method -> the pseudo-count chosen on validation, marked by a vertical line.
    %(figure_title)s

    %(png_returns)s
    """
    if not sweep:
        raise ValueError("sweep must hold at least one method.")
    fig = Figure(figsize=(3.2 * len(sweep), 2.6 * len(metrics)))
    axes = fig.subplots(len(metrics), len(sweep), squeeze=False)
    for col, (method, by_condition) in enumerate(sweep.items()):
        for row, metric in enumerate(metrics):
            ax = axes[row, col]
            for condition, by_n in by_condition.items():
                ns = sorted(by_n)
                ax.plot(
                    ns,
                    [by_n[n][metric] for n in ns],
                    marker="o",
                    markersize=2,
                    linewidth=1,
                    label=condition,
                )
            if chosen and method in chosen:
                ax.axvline(chosen[method], color="k", linestyle=":", linewidth=1)
            ax.set(xscale="log", xlabel="pseudo-count n", ylabel=metric)
            ax.set_title(method, fontsize=8)
    axes[0, -1].legend(fontsize=6)
    return _save(fig, path, title)


def _row_of_panels(
    panels: Sized, name: str, panel_size: tuple[float, float]
) -> tuple[Figure, list]:
    """A figure of one panel per entry of ``panels`` (the argument ``name``), side by side.

    Each panel is ``panel_size`` inches (width, height); an empty ``panels`` is a ``ValueError``.
    """
    if not panels:
        raise ValueError(f"{name} must hold at least one entry: one panel each.")
    n = len(panels)
    fig = Figure(figsize=(panel_size[0] * n, panel_size[1]))
    return fig, list(fig.subplots(1, n, squeeze=False)[0])


def _save(fig: Figure, path: str | os.PathLike, title: str | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)  # no bbox_inches="tight": it lays the figure out a second time
    return path
