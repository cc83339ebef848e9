"""Classification metrics of predictive probabilities.

Conventions follow the paper's zero-shot evaluation: ECE is the top-label L1 calibration error
with equal-width bins (20 bins as in the paper by default, the bin count is part of a metric's
name: ``ece15``, ``ece20``), NLPD the mean negative log predictive probability of the true
class. The ECE and the reliability diagram (:mod:`laplace_vlm.evaluation.plots`) read the same
bins, :func:`reliability_bins` (the binning of torchmetrics' ``MulticlassCalibrationError``,
against which it is tested). Every metric checks that ``probs`` are probabilities; pass
``from_logits=True`` to score logits through their softmax. Failure prediction (AUROC of
telling errors apart) lives in :mod:`laplace_vlm.evaluation.selective`.
"""

from __future__ import annotations

import torch

from laplace_vlm.docstrings import fill_doc
from laplace_vlm.validation import (
    check_bool,
    check_int,
    check_labels,
    check_matrix,
    check_probabilities,
)

ECE_BINS = 20
_EPS = torch.finfo(torch.float64).tiny

_fill_doc = fill_doc.extend(
    metric_parameters="""
        Parameters
        ----------
        probs : torch.Tensor
            `(N, C)` predictive probabilities (rows summing to 1), ``N >= 1``; logits with
            ``from_logits=True``.
        labels : torch.Tensor
            `(N,)` integer class indices in ``[0, C)``.
        """,
    from_logits="""
        from_logits : bool, default=False
            ``probs`` are logits: score ``softmax(probs)``.
        """,
    metric_raises="""
        Raises
        ------
        TypeError
            for a non-tensor, non-float ``probs`` or non-integer ``labels``.
        ValueError
            for empty or non-finite ``probs``, rows that are not distributions (without
            ``from_logits``), or labels of another shape or out of range.
        """,
)


def _prepare(probs: object, labels: object, from_logits: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 probabilities `(N, C)` and long labels `(N,)`, checked."""
    if check_bool("from_logits", from_logits):
        probs = torch.softmax(check_matrix("probs (logits)", probs).detach().double(), -1)
    else:
        probs = check_probabilities("probs", probs).detach().double()
    labels = check_labels("labels", labels, len(probs), probs.shape[1])
    return probs, labels.detach().long().to(probs.device)


@_fill_doc
def accuracy(probs: torch.Tensor, labels: torch.Tensor, from_logits: bool = False) -> float:
    """Fraction of inputs whose most probable class is the label.

    %(metric_parameters)s
    %(from_logits)s

    Returns
    -------
    float
        in ``[0, 1]``.

    %(metric_raises)s
    """
    probs, labels = _prepare(probs, labels, from_logits)
    return (probs.argmax(-1) == labels).double().mean().item()


@_fill_doc
def nlpd(probs: torch.Tensor, labels: torch.Tensor, from_logits: bool = False) -> float:
    """Mean negative log predictive probability of the true class, ``-mean_i log p_i[y_i]``.

    %(metric_parameters)s
    %(from_logits)s

    Returns
    -------
    float
        nats per input, ``>= 0``; lower is better.

    %(metric_raises)s
    """
    probs, labels = _prepare(probs, labels, from_logits)
    p_true = probs.gather(1, labels[:, None]).squeeze(1)
    return -p_true.clamp_min(_EPS).log().mean().item()


@_fill_doc
def reliability_bins(
    probs: torch.Tensor, labels: torch.Tensor, n_bins: int = ECE_BINS, from_logits: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-label confidence and accuracy per equal-width bin: what the ECE and its plot read.

    Bin ``b`` holds confidences in ``(b/n, (b+1)/n]`` (bin 0 also 0), as torchmetrics bins.

    %(metric_parameters)s
    n_bins : int, default=20
        number of equal-width bins on ``[0, 1]``.
    %(from_logits)s

    Returns
    -------
    confidence, accuracy, count : torch.Tensor
        `(n_bins,)` float64 each: mean confidence, accuracy and number of inputs per bin;
        empty bins have confidence and accuracy 0.

    %(metric_raises)s
    """
    probs, labels = _prepare(probs, labels, from_logits)
    n_bins = check_int("n_bins", n_bins)
    confidence, prediction = probs.max(-1)
    correct = (prediction == labels).double()
    index = (torch.ceil(confidence * n_bins).long() - 1).clamp(0, n_bins - 1)
    zeros = torch.zeros(n_bins, dtype=torch.float64, device=probs.device)
    count = zeros.index_add(0, index, torch.ones_like(correct))
    conf_sum = zeros.index_add(0, index, confidence)
    acc_sum = zeros.index_add(0, index, correct)
    safe = count.clamp_min(1)
    return conf_sum / safe, acc_sum / safe, count


@_fill_doc
def ece(
    probs: torch.Tensor, labels: torch.Tensor, n_bins: int = ECE_BINS, from_logits: bool = False
) -> float:
    """Expected calibration error of the top label, L1 norm, ``n_bins`` equal-width bins.

    ``sum_b (n_b / N) |acc_b - conf_b|`` over the bins of :func:`reliability_bins`.

    %(metric_parameters)s
    n_bins : int, default=20
        20 as in the paper; torchmetrics' default is 15.
    %(from_logits)s

    Returns
    -------
    float
        in ``[0, 1]``; lower is better.

    %(metric_raises)s
    """
    confidence, acc, count = reliability_bins(probs, labels, n_bins, from_logits)
    return float((count / count.sum() * (acc - confidence).abs()).sum())


@_fill_doc
def brier(probs: torch.Tensor, labels: torch.Tensor, from_logits: bool = False) -> float:
    """Multiclass Brier score ``mean_i sum_c (p_ic - [y_i = c])^2`` (in ``[0, 2]``).

    %(metric_parameters)s
    %(from_logits)s

    Returns
    -------
    float
        in ``[0, 2]``; lower is better.

    %(metric_raises)s
    """
    probs, labels = _prepare(probs, labels, from_logits)
    onehot = torch.nn.functional.one_hot(labels, probs.shape[1]).double()
    return (probs - onehot).square().sum(-1).mean().item()


@_fill_doc
def classification_metrics(
    probs: torch.Tensor, labels: torch.Tensor, from_logits: bool = False
) -> dict[str, float]:
    """The calibration metrics of one set of predictions, named as in the benchmark's rows.

    %(metric_parameters)s
    %(from_logits)s

    Returns
    -------
    metrics : dict
        ``{"acc", "nlpd", "ece15", "ece20", "brier"}`` as Python floats; ``ece15`` has
        torchmetrics' default 15 bins, ``ece20`` the paper's 20.

    %(metric_raises)s
    """
    probs, labels = _prepare(probs, labels, from_logits)  # checked once, then probabilities
    return {
        "acc": accuracy(probs, labels),
        "nlpd": nlpd(probs, labels),
        "ece15": ece(probs, labels, n_bins=15),
        "ece20": ece(probs, labels, n_bins=20),
        "brier": brier(probs, labels),
    }
