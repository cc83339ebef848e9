"""Classification metrics of predictive probabilities, thin over torchmetrics.

Conventions follow the paper's zero-shot evaluation: ECE is the top-label L1 calibration error
with equal-width bins (torchmetrics ``MulticlassCalibrationError(norm="l1")``; 20 bins as in the
paper by default, the bin count is part of a metric's name: ``ece15``, ``ece20``), NLPD the
mean negative log predictive probability of the true class. Failure prediction (AUROC of
telling errors apart) lives in :mod:`laplace_vlm.evaluation.selective`.
"""

from __future__ import annotations

import torch
from torchmetrics.classification import MulticlassCalibrationError

from laplace_vlm.docstrings import fill_doc

ECE_BINS = 20
_EPS = torch.finfo(torch.float64).tiny


def _check(probs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if probs.ndim != 2:
        raise ValueError(f"probs must be (N, C), got shape {tuple(probs.shape)}.")
    if labels.shape != probs.shape[:1]:
        raise ValueError(f"labels must be (N,) = ({len(probs)},), got shape {tuple(labels.shape)}.")
    if len(labels) and (labels.min() < 0 or labels.max() >= probs.shape[1]):
        raise ValueError(f"labels must lie in [0, {probs.shape[1]}).")
    return probs.detach(), labels.detach().long()


@fill_doc
def accuracy(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of inputs whose most probable class is the label.

    Parameters
    ----------
    probs : torch.Tensor
        `(N, C)` predictive probabilities (logits give the same answer).
    %(labels)s

    Returns
    -------
    float
        in ``[0, 1]``.
    """
    probs, labels = _check(probs, labels)
    return (probs.argmax(-1) == labels).double().mean().item()


@fill_doc
def nlpd(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean negative log predictive probability of the true class, ``-mean_i log p_i[y_i]``.

    %(classification_parameters)s

    Returns
    -------
    float
        nats per input, ``>= 0``; lower is better.
    """
    probs, labels = _check(probs, labels)
    p_true = probs.double().gather(1, labels[:, None]).squeeze(1)
    return -p_true.clamp_min(_EPS).log().mean().item()


@fill_doc
def ece(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = ECE_BINS) -> float:
    """Expected calibration error of the top label, L1 norm, ``n_bins`` equal-width bins.

    %(classification_parameters)s
    n_bins : int
        20 as in the paper; torchmetrics' default is 15.

    Returns
    -------
    float
        in ``[0, 1]``; lower is better.
    """
    probs, labels = _check(probs, labels)
    metric = MulticlassCalibrationError(num_classes=probs.shape[1], n_bins=n_bins, norm="l1")
    return metric(probs.float(), labels).item()


@fill_doc
def brier(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Multiclass Brier score ``mean_i sum_c (p_ic - [y_i = c])^2`` (in ``[0, 2]``).

    %(classification_parameters)s

    Returns
    -------
    float
        in ``[0, 2]``; lower is better.
    """
    probs, labels = _check(probs, labels)
    onehot = torch.nn.functional.one_hot(labels, probs.shape[1]).double()
    return (probs.double() - onehot).square().sum(-1).mean().item()


@fill_doc
def classification_metrics(probs: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """The calibration metrics of one set of predictions, named as in the benchmark's rows.

    %(classification_parameters)s

    Returns
    -------
    metrics : dict
        ``{"acc", "nlpd", "ece15", "ece20", "brier"}`` as Python floats; ``ece15`` has
        torchmetrics' default 15 bins, ``ece20`` the paper's 20.
    """
    return {
        "acc": accuracy(probs, labels),
        "nlpd": nlpd(probs, labels),
        "ece15": ece(probs, labels, n_bins=15),
        "ece20": ece(probs, labels, n_bins=20),
        "brier": brier(probs, labels),
    }
