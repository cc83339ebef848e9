"""Selective prediction: risk-coverage curves, AURC, E-AURC and failure detection.

A selective classifier answers only the inputs whose confidence reaches a threshold (Geifman &
El-Yaniv 2017). At threshold ``t`` the *coverage* is the fraction of inputs answered and the
*risk* the error rate among them.

Ties
----
Inputs with equal confidence are accepted or rejected together, so the curve has one point per
distinct confidence value, never a point that splits a tie (which would depend on the order of
the inputs). The AURC is the area under that step curve: each coverage step ``(c_{j-1}, c_j]``
is charged the risk at ``c_j``. Without ties this is exactly the discrete AURC of Geifman et al.
2019, ``mean_{k=1..N} risk(k most confident)``; with ties each ``k`` inside a tied block gets the
risk of the whole block. The result never depends on the order of the inputs.

Failure detection
-----------------
:func:`failure_auroc` and :func:`failure_fpr95` treat *correct* predictions as the positive class
and a higher confidence as evidence of being correct; the FPR95 is the fraction of misclassified
inputs still accepted when 95% of the correct ones are.
"""

from __future__ import annotations

import torch

from laplace_vlm.docstrings import fill_doc
from laplace_vlm.evaluation.detection import detection_auroc, fpr_at_tpr


def _check_correct(correct: torch.Tensor, name: str = "correct") -> torch.Tensor:
    if not isinstance(correct, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(correct).__name__}.")
    if correct.ndim != 1 or correct.numel() == 0:
        raise ValueError(
            f"{name} must be a non-empty 1-D tensor, got shape {tuple(correct.shape)}."
        )
    if correct.dtype != torch.bool:
        if correct.is_complex() or not ((correct == 0) | (correct == 1)).all():
            raise ValueError(f"{name} must be boolean or hold only 0/1 values.")
        correct = correct != 0
    return correct.detach()


def _check_pair(
    confidence: torch.Tensor, correct: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    correct = _check_correct(correct)
    if not isinstance(confidence, torch.Tensor):
        raise ValueError(f"confidence must be a torch.Tensor, got {type(confidence).__name__}.")
    if confidence.shape != correct.shape:
        raise ValueError(
            f"confidence must have the shape of correct, (N,) = ({len(correct)},); "
            f"got {tuple(confidence.shape)}."
        )
    if confidence.dtype == torch.bool or confidence.is_complex():
        raise ValueError(f"confidence must be real-valued, got dtype {confidence.dtype}.")
    confidence = confidence.detach().double()
    if not torch.isfinite(confidence).all():
        raise ValueError("confidence must be finite, got NaN or infinite values.")
    return confidence, correct.to(confidence.device)


_fill_doc = fill_doc.extend(
    failure_parameters="""
        Parameters
        ----------
        %(confidence)s
        correct : torch.Tensor
            `(N,)` bool (or 0/1), with at least one correct and one misclassified prediction.
        """,
)


@fill_doc
def risk_coverage_curve(
    confidence: torch.Tensor, correct: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Selective risk against coverage, one point per distinct confidence threshold.

    %(selective_parameters)s

    Returns
    -------
    coverage : torch.Tensor
        `(T,)` float64, increasing, ending at 1; ``T`` is the number of distinct confidences.
        Point ``j`` answers the inputs with ``confidence >= t_j``, the ``j``-th largest value.
    risk : torch.Tensor
        `(T,)` float64 error rate among the answered inputs.
    """
    confidence, correct = _check_pair(confidence, correct)
    order = torch.argsort(confidence, descending=True, stable=True)
    conf_sorted = confidence[order]
    errors = (~correct[order]).double().cumsum(0)
    # The last position of each tied block is where its threshold's point sits.
    last = torch.ones_like(conf_sorted, dtype=torch.bool)
    last[:-1] = conf_sorted[1:] != conf_sorted[:-1]
    count = torch.arange(1, len(conf_sorted) + 1, dtype=torch.float64, device=confidence.device)
    return count[last] / len(conf_sorted), errors[last] / count[last]


@fill_doc
def aurc(confidence: torch.Tensor, correct: torch.Tensor) -> float:
    """Area under the risk-coverage curve (lower is better).

    ``sum_j (c_j - c_{j-1}) r_j`` over the points of :func:`risk_coverage_curve` with
    ``c_0 = 0``; without ties, ``mean_{k=1..N}`` of the error rate of the ``k`` most confident.

    %(selective_parameters)s

    Returns
    -------
    float
        AURC in ``[0, 1]``.
    """
    coverage, risk = risk_coverage_curve(confidence, correct)
    steps = torch.diff(coverage, prepend=coverage.new_zeros(1))
    return float((steps * risk).sum())


@fill_doc
def optimal_aurc(correct: torch.Tensor) -> float:
    """AURC of the oracle ranking that puts every correct prediction first.

    With ``N`` inputs of which ``n`` are correct the oracle's risk at ``k`` answers is
    ``max(0, k - n) / k``, so the area is ``(1/N) sum_{k=n+1..N} (k - n) / k`` (the exact discrete
    form of Geifman et al. 2019's ``r + (1 - r) log(1 - r)``).

    Parameters
    ----------
    %(correct)s

    Returns
    -------
    float
        The smallest AURC any confidence can reach on these predictions.
    """
    correct = _check_correct(correct)
    n_total, n_correct = len(correct), int(correct.sum())
    k = torch.arange(n_correct + 1, n_total + 1, dtype=torch.float64)
    return float(((k - n_correct) / k).sum() / n_total)


@fill_doc
def excess_aurc(confidence: torch.Tensor, correct: torch.Tensor) -> float:
    """E-AURC: :func:`aurc` minus :func:`optimal_aurc` (Geifman et al. 2019), ``>= 0``.

    %(selective_parameters)s

    Returns
    -------
    float
        Excess AURC; 0 for a confidence that ranks every correct prediction above every error.
    """
    return aurc(confidence, correct) - optimal_aurc(correct)


def _split(
    confidence: torch.Tensor, correct: torch.Tensor, caller: str
) -> tuple[torch.Tensor, torch.Tensor]:
    confidence, correct = _check_pair(confidence, correct)
    n_correct = int(correct.sum())
    if n_correct in (0, len(correct)):
        raise ValueError(
            f"{caller} needs both correct and misclassified predictions in correct; got "
            f"{n_correct} correct of {len(correct)}."
        )
    return confidence[correct], confidence[~correct]


@_fill_doc
def failure_auroc(confidence: torch.Tensor, correct: torch.Tensor) -> float:
    """AUROC of telling correct from misclassified predictions by confidence.

    Correct predictions are the positives. Swapping the roles (errors positive, negated
    confidence) gives the same number.

    %(failure_parameters)s

    Returns
    -------
    float
        AUROC in ``[0, 1]``; 0.5 is chance.
    """
    return detection_auroc(*_split(confidence, correct, "failure_auroc"))


@_fill_doc
def failure_fpr95(confidence: torch.Tensor, correct: torch.Tensor) -> float:
    """Fraction of misclassified predictions accepted when 95% of the correct ones are.

    Correct predictions are the positives (FPR at 95% TPR, as in Corbiere et al. 2019).

    %(failure_parameters)s

    Returns
    -------
    float
        FPR in ``[0, 1]``; lower is better.
    """
    return fpr_at_tpr(*_split(confidence, correct, "failure_fpr95"), tpr=0.95)
