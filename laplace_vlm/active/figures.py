"""Figures of active-learning results: learning curves and the sweep's paired differences.

Figures are ``matplotlib.figure.Figure`` objects (no pyplot state, no backend switch): save
them with :func:`save_figure` or ``fig.savefig``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from matplotlib.figure import Figure

from laplace_vlm.active.report import Summary


def learning_curves_figure(summary: Summary, metric: str = "acc", title: str | None = None):
    """Mean ``metric`` (± std over seeds) vs labelled budget, one line per strategy.

    Parameters
    ----------
    summary : mapping
        :func:`summarize`'s output.
    metric : str
        ``"acc"`` or a key with ``_mean`` in the rows (``"ece"``, ``"nlpd"``, ...).
    title : str, optional
        the axes' title.

    Returns
    -------
    matplotlib.figure.Figure
        one axes with a line (and a ± std band where the rows have one) per strategy.
    """
    fig = Figure(figsize=(6.5, 4.2))
    ax = fig.add_subplot()
    for strategy, rows in summary.items():
        budgets = sorted(rows, key=int)
        xs, mean = [int(b) for b in budgets], [rows[b][f"{metric}_mean"] for b in budgets]
        line = ax.plot(xs, mean, marker="o", label=strategy)[0]
        if f"{metric}_std" in rows[budgets[0]]:
            std = [rows[b][f"{metric}_std"] for b in budgets]
            ax.fill_between(xs, [m - s for m, s in zip(mean, std)],
                            [m + s for m, s in zip(mean, std)], alpha=0.12,
                            color=line.get_color())  # fmt: skip
    ax.set(xlabel="labelled budget", ylabel=metric, title=title or f"{metric} on the target")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def differences_vs_zero_shot_figure(cells: Sequence[Mapping], baseline: str, budgets: Sequence[str],
                                    strategies: Sequence[str]):  # fmt: skip
    """Paired accuracy difference to ``baseline`` (± SE) against each cell's zero-shot accuracy.

    Parameters
    ----------
    cells : sequence of mapping
        sweep cells with ``zero_shot_acc``, ``dataset``, ``shift`` and
        ``differences[baseline][strategy][budget]``.
    baseline : str
        e.g. ``"random"`` or ``"map_entropy"``.
    budgets : sequence of str
        one panel per budget.
    strategies : sequence of str
        one series per strategy.

    Returns
    -------
    matplotlib.figure.Figure
        one panel per budget, at most three in a row; the legend in a spare panel if any.
    """
    ncols = min(3, len(budgets))
    nrows = math.ceil(len(budgets) / ncols)
    fig = Figure(figsize=(4.5 * ncols, 3.6 * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False, sharey=True).flatten()
    for ax in axes[len(budgets) :]:
        ax.set_visible(False)
    markers = {"digits": "o", "fashion-mnist": "s"}
    for ax, budget in zip(axes, budgets):
        named: set[str] = set()
        for j, strategy in enumerate(strategies):
            pts = sorted((c["zero_shot_acc"], c["differences"][baseline][strategy][budget],
                          c["dataset"]) for c in cells
                         if strategy in c["differences"].get(baseline, {}))  # fmt: skip
            for dataset in markers:
                sel = [(x, d) for x, d, ds in pts if ds == dataset]
                if sel:  # one legend entry per strategy, whichever data set comes first
                    label = None if strategy in named else strategy
                    named.add(strategy)
                    ax.errorbar([x + 0.003 * j for x, _ in sel], [d["mean"] for _, d in sel],
                                yerr=[d["se"] for _, d in sel], fmt=markers[dataset], ms=4,
                                color=f"C{j}", capsize=2, label=label)  # fmt: skip
        ax.axhline(0.0, color="k", lw=0.8)
        ax.axvspan(0.5, 0.8, color="0.9", zorder=0)
        ax.set(xlabel="zero-shot accuracy on the target", title=f"{budget} labels")
        ax.grid(alpha=0.3)
    for ax in axes[::ncols]:
        ax.set_ylabel(f"accuracy - {baseline} (paired ± SE)")
    handles, labels = axes[0].get_legend_handles_labels()
    spare = axes[len(budgets)] if len(budgets) < len(axes) else None
    if spare is not None:  # the legend in the empty panel, clear of the data
        spare.set_visible(True)
        spare.axis("off")
    (spare or axes[0]).legend(handles, labels, loc="center" if spare else "best", fontsize=7,
                              title="o digits, s fashion-mnist", title_fontsize=7)  # fmt: skip
    fig.tight_layout()
    return fig


def save_figure(fig, path: str | Path, dpi: int = 120) -> Path:
    """Write ``fig`` as PNG to ``path`` (creating the folder); returns the path.

    Parameters
    ----------
    fig : matplotlib.figure.Figure
        the figure.
    path : str or Path
        the PNG file.
    dpi : int
        resolution.

    Returns
    -------
    Path
        ``path``, written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path
