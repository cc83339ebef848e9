"""Figures of the evaluation, drawn with matplotlib's Agg backend and saved as PNG."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import matplotlib

matplotlib.use("Agg")  # headless: never needs a display
import matplotlib.pyplot as plt
import torch

from laplace_vlm.evaluation.metrics import ECE_BINS, ece

# {"shift": {"severity": {"method": {"acc": ..., "ece": ...}}}}, severity keys are strings
Results = Mapping[str, Mapping[str, Mapping[str, Mapping[str, float]]]]


def reliability_bins(
    probs: torch.Tensor, labels: torch.Tensor, n_bins: int = ECE_BINS
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-label confidence and accuracy per equal-width bin, as the ECE sees them.

    Parameters
    ----------
    probs : torch.Tensor
        `(N, C)` predictive probabilities.
    labels : torch.Tensor
        `(N,)` class indices.
    n_bins : int

    Returns
    -------
    confidence, accuracy, count : torch.Tensor
        `(n_bins,)` each; empty bins have confidence and accuracy 0.
    """
    confidence, prediction = probs.detach().double().max(-1)
    correct = (prediction == labels).double()
    # bin b holds (b/n, (b+1)/n], as torchmetrics bins
    index = (torch.ceil(confidence * n_bins).long() - 1).clamp(0, n_bins - 1)
    count = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, index, torch.ones_like(correct))
    conf_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, index, confidence)
    acc_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, index, correct)
    safe = count.clamp_min(1)
    return conf_sum / safe, acc_sum / safe, count


def reliability_diagram(
    probs_by_method: Mapping[str, torch.Tensor],
    labels: torch.Tensor,
    path: str | os.PathLike,
    n_bins: int = ECE_BINS,
    title: str | None = None,
) -> Path:
    """One reliability diagram per method, side by side, saved as a PNG.

    Parameters
    ----------
    probs_by_method : mapping of str to torch.Tensor
        method name -> `(N, C)` predictive probabilities on the same inputs.
    labels : torch.Tensor
        `(N,)` class indices.
    path : path
        the PNG to write (parent folders are created).
    n_bins : int
    title : str, optional

    Returns
    -------
    path : Path
    """
    if not probs_by_method:
        raise ValueError("probs_by_method must name at least one method.")
    fig, axes = plt.subplots(
        1, len(probs_by_method), figsize=(3.2 * len(probs_by_method), 3.4), squeeze=False
    )
    centers = (torch.arange(n_bins, dtype=torch.float64) + 0.5) / n_bins
    for ax, (method, probs) in zip(axes[0], probs_by_method.items()):
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
        ax.set_title(f"{method}\nECE {ece(probs, labels, n_bins):.3f}", fontsize=9)
    axes[0, 0].set_ylabel("accuracy")
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def shift_plot(results: Results, metric: str, path: str | os.PathLike) -> Path:
    """``metric`` against shift severity, one panel per shift, one line per method.

    The ``"clean"`` entry (severity ``"0"``) starts every shift's line at severity 0.

    Parameters
    ----------
    results : mapping
        ``{"shift": {"severity": {"method": {metric: value}}}}`` with numeric severity strings.
    metric : str
        e.g. ``"ece"``, ``"nlpd"``, ``"acc"``.
    path : path
        the PNG to write.

    Returns
    -------
    path : Path
    """
    shifts = [s for s in results if s != "clean"]
    if not shifts:
        raise ValueError("results must hold at least one shift besides 'clean'.")
    fig, axes = plt.subplots(1, len(shifts), figsize=(3.6 * len(shifts), 3.2), squeeze=False)
    for ax, shift in zip(axes[0], shifts):
        by_severity = {**results.get("clean", {}), **results[shift]}
        severities = sorted(by_severity, key=float)
        methods = list(by_severity[severities[-1]])
        for method in methods:
            x = [float(s) for s in severities if method in by_severity[s]]
            y = [by_severity[s][method][metric] for s in severities if method in by_severity[s]]
            ax.plot(x, y, marker="o", markersize=3, label=method)
        ax.set(title=shift, xlabel="severity", ylabel=metric)
    axes[0, -1].legend(fontsize=7)
    return _save(fig, path)


def _save(fig: plt.Figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")  # equal-aspect panels can spill over
    plt.close(fig)
    return path
