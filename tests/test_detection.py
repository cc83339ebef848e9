"""Detection metrics and OOD scores against brute force, sklearn and hand computation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score, roc_curve

from laplace_vlm.evaluation.detection import (
    HIGHER_IS_IN,
    detection_auroc,
    expected_logit_variance,
    fpr_at_tpr,
    mcm,
    msp,
    ood_metrics,
)


def brute_auroc(pos: list[float], neg: list[float]) -> float:
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def brute_fpr_at_tpr(pos: list[float], neg: list[float], level: float) -> float:
    best = math.inf
    for t in sorted(set(pos) | set(neg)) + [math.inf]:
        tpr = sum(p >= t for p in pos) / len(pos)
        fpr = sum(n >= t for n in neg) / len(neg)
        if tpr >= level:
            best = min(best, fpr)
    return best


def sklearn_fpr_at_tpr(pos: np.ndarray, neg: np.ndarray, level: float) -> float:
    y = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    fpr, tpr, _ = roc_curve(y, np.r_[pos, neg], drop_intermediate=False)
    return float(fpr[tpr >= level].min())


def _cases():
    rng = np.random.default_rng(0)
    # continuous, partially separated
    yield rng.normal(1.0, 1.0, 37), rng.normal(0.0, 1.0, 23)
    # P = 20 so that TPR 19/20 sits exactly on 0.95
    yield rng.normal(0.5, 1.0, 20), rng.normal(0.0, 1.0, 31)
    # heavy ties within and across groups
    yield rng.integers(0, 4, 40).astype(float), rng.integers(0, 3, 25).astype(float)
    # large magnitudes: a sigmoid inside torchmetrics would saturate these into ties
    yield 50 + rng.normal(0.0, 5.0, 30), 45 + rng.normal(0.0, 5.0, 30)
    # all scores equal
    yield np.zeros(5), np.zeros(7)


@pytest.mark.parametrize("case", range(5))
def test_auroc_and_fpr_match_brute_force_and_sklearn(case):
    pos, neg = list(_cases())[case]
    tp, tn = torch.tensor(pos), torch.tensor(neg)
    auroc = detection_auroc(tp, tn)
    assert auroc == pytest.approx(brute_auroc(list(pos), list(neg)), abs=1e-6)
    assert auroc == pytest.approx(
        roc_auc_score(np.r_[np.ones(len(pos)), np.zeros(len(neg))], np.r_[pos, neg]), abs=1e-6
    )
    for level in (0.95, 0.5, 1.0, 0.01):
        got = fpr_at_tpr(tp, tn, level)
        assert got == brute_fpr_at_tpr(list(pos), list(neg), level)
        assert got == pytest.approx(sklearn_fpr_at_tpr(pos, neg, level), abs=1e-12)


def test_hand_computed_small_case():
    pos, neg = torch.tensor([3.0, 2.0, 2.0, 0.0]), torch.tensor([2.0, 1.0])
    # pairs: 3>2,3>1, 2=2 (x2, half each), 2>1 (x2), 0<2, 0<1 -> (2 + 1 + 2) / 8
    assert detection_auroc(pos, neg) == pytest.approx(5 / 8)
    # TPR >= 0.75 needs threshold 2, which also accepts the negative scored 2
    assert fpr_at_tpr(pos, neg, 0.75) == 0.5
    assert fpr_at_tpr(pos, neg, 0.25) == 0.0
    assert fpr_at_tpr(pos, neg, 1.0) == 1.0


def test_ood_metrics_direction():
    rng = torch.Generator().manual_seed(1)
    score_in, score_out = torch.randn(50, generator=rng) + 1, torch.randn(40, generator=rng)
    up = ood_metrics(score_in, score_out)
    assert up == {
        "auroc": detection_auroc(score_in, score_out),
        "fpr95": fpr_at_tpr(score_in, score_out, 0.95),
    }
    # an uncertainty (higher = OOD) gives the same metrics once flagged
    assert ood_metrics(-score_in, -score_out, higher_is_in=False) == up
    flipped = ood_metrics(score_in, score_out, higher_is_in=False)
    assert flipped["auroc"] == pytest.approx(1 - up["auroc"], abs=1e-6)


def test_msp_and_logit_variance_by_hand():
    probs = torch.tensor([[0.2, 0.5, 0.3], [0.9, 0.05, 0.05]], dtype=torch.float64)
    assert msp(probs).tolist() == [0.5, 0.9]
    var = torch.tensor([[1.0, 2.0, 6.0], [0.0, 0.0, 0.3]])
    assert expected_logit_variance(var).tolist() == pytest.approx([3.0, 0.1])
    assert HIGHER_IS_IN == {"msp": True, "mcm": True, "expected_logit_variance": False}


def test_mcm_by_hand():
    cos = torch.tensor([[0.30, 0.10, 0.25], [0.20, 0.22, -0.10]])
    for temperature in (1.0, 0.01):
        expected = []
        for row in cos.tolist():
            e = [math.exp(c / temperature) for c in row]
            expected.append(max(e) / sum(e))
        assert mcm(cos, temperature).tolist() == pytest.approx(expected, rel=1e-12)
    # T = 1 is the MCM paper's default and the function's
    assert torch.equal(mcm(cos), mcm(cos, 1.0))


def _distinct_order(x: torch.Tensor) -> torch.Tensor:
    assert len(torch.unique(x)) == len(x)
    return torch.argsort(x)


def test_mcm_temperature_limits():
    """Small T ranks by the top-2 margin, large T by max - mean; neither is the max cosine."""
    g = torch.Generator().manual_seed(3)
    n, c = 40, 6
    base = 0.1 + 0.2 * torch.rand(n, generator=g, dtype=torch.float64)
    margin = 0.05 + 0.3 * torch.rand(n, generator=g, dtype=torch.float64)
    # runner-up at base, the best at base + margin, the rest at least 0.5 below the runner-up
    cos = base[:, None] - 0.5 - 0.2 * torch.rand(n, c, generator=g, dtype=torch.float64)
    cos[:, 0], cos[:, 1] = base + margin, base
    top2 = cos.topk(2, dim=1).values
    order_margin = _distinct_order(top2[:, 0] - top2[:, 1])
    order_max = _distinct_order(cos.amax(1))
    assert not torch.equal(order_margin, order_max)
    assert torch.equal(_distinct_order(mcm(cos, 0.02)), order_margin)

    dense = 0.3 * torch.rand(n, c, generator=g, dtype=torch.float64)
    order_centred = _distinct_order(dense.amax(1) - dense.mean(1))
    assert not torch.equal(order_centred, _distinct_order(dense.amax(1)))
    assert torch.equal(_distinct_order(mcm(dense, 1e4)), order_centred)


def test_bad_inputs():
    ok = torch.tensor([0.1, 0.2])
    with pytest.raises(ValueError, match="score_pos must be 1-D"):
        detection_auroc(ok[None], ok)
    with pytest.raises(ValueError, match="score_neg must hold at least one"):
        detection_auroc(ok, torch.tensor([]))
    with pytest.raises(ValueError, match="score_pos must be finite"):
        fpr_at_tpr(torch.tensor([float("nan"), 1.0]), ok)
    with pytest.raises(ValueError, match="score_neg must be real-valued"):
        fpr_at_tpr(ok, torch.tensor([True, False]))
    for level in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="tpr must be a number in"):
            fpr_at_tpr(ok, ok, level)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        mcm(torch.zeros(2, 3), 0.0)
    with pytest.raises(ValueError, match="cosine must have shape \\(N, d\\)"):
        mcm(torch.zeros(3))
    with pytest.raises(TypeError, match="probs must be a floating-point tensor"):
        msp(torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="var must be non-negative"):
        expected_logit_variance(torch.tensor([[1.0, -0.1]]))
    with pytest.raises(ValueError, match="score_out must be finite"):
        ood_metrics(ok, torch.tensor([math.inf]))
    with pytest.raises(ValueError, match="higher_is_in must be a bool"):
        ood_metrics(ok, ok, higher_is_in="yes")
