"""Classification metrics of predictive probabilities, thin over torchmetrics.

Conventions follow the paper's zero-shot evaluation: ECE is the top-label L1 calibration error
with 20 equal-width bins (torchmetrics ``MulticlassCalibrationError(n_bins=20, norm="l1")``),
NLPD the mean negative log predictive probability of the true class.
"""

from __future__ import annotations

import torch
from torchmetrics.classification import BinaryAUROC, MulticlassCalibrationError

from laplace_vlm.predictive.uncertainty import entropy

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


def accuracy(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of inputs whose most probable class is the label.

    Parameters
    ----------
    probs : torch.Tensor
        `(N, C)` predictive probabilities (logits give the same answer).
    labels : torch.Tensor
        `(N,)` class indices.
    """
    probs, labels = _check(probs, labels)
    return (probs.argmax(-1) == labels).double().mean().item()


def nlpd(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean negative log predictive probability of the true class, ``-mean_i log p_i[y_i]``.

    Parameters
    ----------
    probs : torch.Tensor
        `(N, C)` predictive probabilities.
    labels : torch.Tensor
        `(N,)` class indices.
    """
    probs, labels = _check(probs, labels)
    p_true = probs.double().gather(1, labels[:, None]).squeeze(1)
    return -p_true.clamp_min(_EPS).log().mean().item()


def ece(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = ECE_BINS) -> float:
    """Expected calibration error of the top label, L1 norm, ``n_bins`` equal-width bins.

    Parameters
    ----------
    probs : torch.Tensor
        `(N, C)` predictive probabilities.
    labels : torch.Tensor
        `(N,)` class indices.
    n_bins : int
        20 as in the paper.
    """
    probs, labels = _check(probs, labels)
    metric = MulticlassCalibrationError(num_classes=probs.shape[1], n_bins=n_bins, norm="l1")
    return metric(probs.float(), labels).item()


def brier(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Multiclass Brier score ``mean_i sum_c (p_ic - [y_i = c])^2`` (in ``[0, 2]``).

    Parameters
    ----------
    probs : torch.Tensor
        `(N, C)` predictive probabilities.
    labels : torch.Tensor
        `(N,)` class indices.
    """
    probs, labels = _check(probs, labels)
    onehot = torch.nn.functional.one_hot(labels, probs.shape[1]).double()
    return (probs.double() - onehot).square().sum(-1).mean().item()


def misclassification_auroc(
    probs: torch.Tensor, labels: torch.Tensor, uncertainty: torch.Tensor
) -> float:
    """AUROC of ``uncertainty`` as a detector of misclassified inputs (errors are positives).

    0.5 is chance, 1 means every error is more uncertain than every correct prediction. NaN when
    all predictions are right or all are wrong (the AUROC is undefined then).

    Parameters
    ----------
    probs : torch.Tensor
        `(N, C)` predictive probabilities (their argmax is the prediction).
    labels : torch.Tensor
        `(N,)` class indices.
    uncertainty : torch.Tensor
        `(N,)` score, larger = less certain (e.g. predictive entropy).
    """
    probs, labels = _check(probs, labels)
    if uncertainty.shape != labels.shape:
        raise ValueError(
            f"uncertainty must be (N,) = ({len(labels)},), got {tuple(uncertainty.shape)}."
        )
    errors = (probs.argmax(-1) != labels).long()
    if errors.min() == errors.max():
        return float("nan")
    return BinaryAUROC()(uncertainty.detach().double(), errors).item()


def classification_metrics(
    probs: torch.Tensor, labels: torch.Tensor, uncertainty: torch.Tensor | None = None
) -> dict[str, float]:
    """All metrics of one set of predictions.

    Parameters
    ----------
    probs : torch.Tensor
        `(N, C)` predictive probabilities.
    labels : torch.Tensor
        `(N,)` class indices.
    uncertainty : torch.Tensor, optional
        `(N,)` score for the misclassification AUROC; the predictive entropy if None.

    Returns
    -------
    metrics : dict
        ``{"acc", "nlpd", "ece", "brier", "auroc"}`` as Python floats.
    """
    if uncertainty is None:
        uncertainty = entropy(probs.double())
    return {
        "acc": accuracy(probs, labels),
        "nlpd": nlpd(probs, labels),
        "ece": ece(probs, labels),
        "brier": brier(probs, labels),
        "auroc": misclassification_auroc(probs, labels, uncertainty),
    }
