"""Score-based detection metrics (AUROC, FPR at a TPR) and out-of-distribution scores.

Conventions
-----------
* The detection metrics take scores of a *positive* and a *negative* group and treat a higher
  score as evidence for the positive group. For OOD detection the in-distribution (ID) inputs are
  the positives, as in the OOD literature (OpenOOD, Yang et al. 2022: FPR at 95% TPR with ID as
  positive), so :func:`fpr_at_tpr` is the fraction of OOD inputs still accepted when 95% of the
  ID inputs are.
* Each OOD score is returned in its natural direction, stated in its docstring and in
  :data:`HIGHER_IS_IN`: :func:`msp` and :func:`mcm` are ID confidences (higher = more
  in-distribution), :func:`expected_logit_variance` is an uncertainty (higher = more OOD). Pass
  ``higher_is_in=HIGHER_IS_IN[name]`` to :func:`ood_metrics`.
* Ties in a score count half in the AUROC (the Mann-Whitney convention) and enter a ROC curve
  together (a threshold accepts all tied inputs or none).
"""

from __future__ import annotations

import torch
from sklearn.metrics import roc_auc_score, roc_curve

from laplace_vlm.docstrings import fill_doc
from laplace_vlm.validation import check_matrix

#: Direction of each OOD score in this module: True when a higher score means more in-distribution.
HIGHER_IS_IN = {"msp": True, "mcm": True, "expected_logit_variance": False}


def _check_scores(score: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(score, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(score).__name__}.")
    if score.ndim != 1:
        raise ValueError(
            f"{name} must be 1-D (one score per input), got shape {tuple(score.shape)}."
        )
    if score.numel() == 0:
        raise ValueError(f"{name} must hold at least one score, got an empty tensor.")
    if score.dtype == torch.bool or score.is_complex():
        raise ValueError(f"{name} must be real-valued, got dtype {score.dtype}.")
    score = score.detach().double()
    if not torch.isfinite(score).all():
        raise ValueError(f"{name} must be finite, got NaN or infinite values.")
    return score


def _binary_inputs(score_pos: torch.Tensor, score_neg: torch.Tensor) -> tuple:
    """float64 numpy scores and 0/1 targets for scikit-learn (positives first).

    scikit-learn ranks the raw scores, so ties and large magnitudes are kept exactly (no
    sigmoid squashing scores into ties, as torchmetrics does outside ``[0, 1]``).
    """
    pos = _check_scores(score_pos, "score_pos").cpu()
    neg = _check_scores(score_neg, "score_neg").cpu()
    target = torch.cat([torch.ones(len(pos)), torch.zeros(len(neg))]).long()
    return torch.cat([pos, neg]).numpy(), target.numpy()


_fill_doc = fill_doc.extend(
    score_pos="""
        score_pos : torch.Tensor
            `(P,)` scores of the positive inputs (higher = more likely positive), ``P >= 1``.
        """,
    score_neg="""
        score_neg : torch.Tensor
            `(M,)` scores of the negative inputs, ``M >= 1``.
        """,
)


@_fill_doc
def detection_auroc(score_pos: torch.Tensor, score_neg: torch.Tensor) -> float:
    """Area under the ROC curve of telling positives from negatives by a score.

    Equals ``P(s_pos > s_neg) + 0.5 P(s_pos = s_neg)`` over all positive-negative pairs.

    Parameters
    ----------
    %(score_pos)s
    %(score_neg)s

    Returns
    -------
    float
        AUROC in ``[0, 1]``; 0.5 is chance, 1 perfect separation.
    """
    scores, target = _binary_inputs(score_pos, score_neg)
    return float(roc_auc_score(target, scores))


@_fill_doc
def fpr_at_tpr(score_pos: torch.Tensor, score_neg: torch.Tensor, tpr: float = 0.95) -> float:
    """False-positive rate at the first threshold whose true-positive rate reaches ``tpr``.

    Thresholds accept inputs with ``score >= threshold``; among all thresholds with
    ``TPR >= tpr`` the smallest FPR is returned (no interpolation between ROC points).

    Parameters
    ----------
    %(score_pos)s
    %(score_neg)s
    tpr : float
        Target true-positive rate in ``(0, 1]``; 0.95 gives the usual FPR95.

    Returns
    -------
    float
        FPR in ``[0, 1]``; lower is better.
    """
    if isinstance(tpr, bool) or not isinstance(tpr, (int, float)) or not 0.0 < tpr <= 1.0:
        raise ValueError(f"tpr must be a number in (0, 1], got {tpr!r}.")
    scores, target = _binary_inputs(score_pos, score_neg)
    # every threshold (no intermediate point dropped); float64 rates tps / P, so e.g. 19/20
    # reaches 0.95 exactly as in float64 arithmetic
    fpr_curve, tpr_curve, _ = roc_curve(target, scores, drop_intermediate=False)
    return float(fpr_curve[tpr_curve >= tpr].min())


def msp(probs: torch.Tensor) -> torch.Tensor:
    """Maximum softmax probability (Hendrycks & Gimpel 2017), an ID confidence.

    Parameters
    ----------
    probs : torch.Tensor
        `(N, C)` predictive class probabilities.

    Returns
    -------
    torch.Tensor
        `(N,)` float64, ``max_c probs[:, c]``; higher = more in-distribution.
    """
    return check_matrix("probs", probs).detach().double().amax(dim=1)


def mcm(cosine: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Maximum Concept Matching score (Ming et al. 2022), an ID confidence.

    ``max_c softmax(cosine / temperature)_c``: the zero-shot CLIP OOD baseline. Note the limits:
    as ``temperature -> 0`` it ranks inputs by the margin between the two largest cosines, and as
    ``temperature -> inf`` by ``max_c cosine - mean_c cosine``; neither is the raw max cosine.

    Parameters
    ----------
    cosine : torch.Tensor
        `(N, C)` cosine similarities between image and class-prompt embeddings (not scaled by
        CLIP's logit scale).
    temperature : float
        Softmax temperature, ``> 0``; 1 as in the MCM paper.

    Returns
    -------
    torch.Tensor
        `(N,)` float64 in ``[1/C, 1]``; higher = more in-distribution.
    """
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float))
        or not (0.0 < temperature < float("inf"))
    ):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}.")
    cosine = check_matrix("cosine", cosine).detach().double()
    return torch.softmax(cosine / temperature, dim=1).amax(dim=1)


def expected_logit_variance(var: torch.Tensor) -> torch.Tensor:
    """Mean over classes of the predictive logit variance, an uncertainty.

    Parameters
    ----------
    var : torch.Tensor
        `(N, C)` variances of the logits (e.g. the diagonal of the Laplace logit covariance).

    Returns
    -------
    torch.Tensor
        `(N,)` float64; higher = more out-of-distribution (use ``higher_is_in=False``).
    """
    var = check_matrix("var", var).detach().double()
    if (var < 0).any():
        raise ValueError("var must be non-negative (variances), got negative values.")
    return var.mean(dim=1)


def ood_metrics(
    score_in: torch.Tensor, score_out: torch.Tensor, higher_is_in: bool = True
) -> dict[str, float]:
    """AUROC and FPR at 95% TPR of separating ID from OOD inputs, ID as the positive class.

    Parameters
    ----------
    score_in : torch.Tensor
        `(N_in,)` scores of in-distribution inputs.
    score_out : torch.Tensor
        `(N_out,)` scores of out-of-distribution inputs.
    higher_is_in : bool
        True for an ID confidence (:func:`msp`, :func:`mcm`), False for an uncertainty
        (:func:`expected_logit_variance`, entropy), which is then negated.

    Returns
    -------
    dict[str, float]
        ``{"auroc": ..., "fpr95": ...}``; FPR95 is the fraction of OOD inputs accepted when 95%
        of the ID inputs are.
    """
    if not isinstance(higher_is_in, bool):
        raise ValueError(f"higher_is_in must be a bool, got {higher_is_in!r}.")
    sign = 1.0 if higher_is_in else -1.0
    pos = sign * _check_scores(score_in, "score_in")
    neg = sign * _check_scores(score_out, "score_out")
    return {"auroc": detection_auroc(pos, neg), "fpr95": fpr_at_tpr(pos, neg, 0.95)}
