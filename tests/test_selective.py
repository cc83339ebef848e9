"""Risk-coverage, AURC, E-AURC and failure detection against brute force and hand computation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from laplace_vlm.evaluation.selective import (
    aurc,
    excess_aurc,
    failure_auroc,
    failure_fpr95,
    optimal_aurc,
    risk_coverage_curve,
)


def brute_curve(conf: list[float], correct: list[bool]) -> tuple[list[float], list[float]]:
    """One point per distinct threshold t: answer every input with confidence >= t."""
    coverage, risk = [], []
    for t in sorted(set(conf), reverse=True):
        answered = [ok for c, ok in zip(conf, correct) if c >= t]
        coverage.append(len(answered) / len(conf))
        risk.append(sum(not ok for ok in answered) / len(answered))
    return coverage, risk


def brute_aurc(conf: list[float], correct: list[bool]) -> float:
    """Step area: coverage gained at each threshold times the risk there."""
    coverage, risk = brute_curve(conf, correct)
    area, previous = 0.0, 0.0
    for c, r in zip(coverage, risk):
        area += (c - previous) * r
        previous = c
    return area


def brute_topk_aurc(ranked_correct: list[bool]) -> float:
    """Mean over k of the error rate of the first k in a strict ranking."""
    risks = []
    for k in range(1, len(ranked_correct) + 1):
        risks.append(sum(not ok for ok in ranked_correct[:k]) / k)
    return sum(risks) / len(risks)


def _data(seed: int, n: int, ties: bool) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    conf = rng.integers(0, 6, n) / 5 if ties else rng.random(n)
    # errors more likely at low confidence, so the ranking is informative but imperfect
    correct = rng.random(n) < 0.3 + 0.6 * conf
    return torch.tensor(conf), torch.tensor(correct)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_curve_and_aurc_match_brute_force(seed, ties):
    conf, correct = _data(seed, 57, ties)
    coverage, risk = risk_coverage_curve(conf, correct)
    want_cov, want_risk = brute_curve(conf.tolist(), correct.tolist())
    assert coverage.tolist() == pytest.approx(want_cov, abs=1e-12)
    assert risk.tolist() == pytest.approx(want_risk, abs=1e-12)
    assert aurc(conf, correct) == pytest.approx(brute_aurc(conf.tolist(), correct.tolist()))
    if not ties:
        order = torch.argsort(conf, descending=True)
        assert aurc(conf, correct) == pytest.approx(brute_topk_aurc(correct[order].tolist()))


def test_ties_do_not_depend_on_input_order():
    conf, correct = _data(7, 80, ties=True)
    perm = torch.randperm(80, generator=torch.Generator().manual_seed(0))
    assert aurc(conf[perm], correct[perm]) == pytest.approx(aurc(conf, correct), abs=1e-15)
    for a, b in zip(
        risk_coverage_curve(conf[perm], correct[perm]), risk_coverage_curve(conf, correct)
    ):
        assert torch.allclose(a, b, rtol=0, atol=1e-15)


def test_hand_computed_cases():
    conf = torch.tensor([0.9, 0.8, 0.7, 0.6])
    correct = torch.tensor([True, False, True, False])
    # risks at k = 1..4: 0, 1/2, 1/3, 2/4
    assert aurc(conf, correct) == pytest.approx((0 + 1 / 2 + 1 / 3 + 1 / 2) / 4)
    # oracle: two correct first, then 1/3 and 2/4
    assert optimal_aurc(correct) == pytest.approx((1 / 3 + 1 / 2) / 4)
    assert excess_aurc(conf, correct) == pytest.approx((1 / 2) / 4)

    # ties: {0.9, 0.9} gives coverage 1/2 at risk 1/2, then full coverage at risk 1/4
    conf = torch.tensor([0.9, 0.5, 0.9, 0.5])
    correct = torch.tensor([1, 1, 0, 1])
    coverage, risk = risk_coverage_curve(conf, correct)
    assert coverage.tolist() == [0.5, 1.0] and risk.tolist() == [0.5, 0.25]
    assert aurc(conf, correct) == pytest.approx(0.5 * 0.5 + 0.5 * 0.25)


@pytest.mark.parametrize("seed", range(5))
def test_optimal_aurc_matches_sorting_by_correctness(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 60))
    correct = rng.random(n) < rng.random()
    ranked = sorted(correct.tolist(), reverse=True)  # all correct first
    assert optimal_aurc(torch.tensor(correct)) == pytest.approx(brute_topk_aurc(ranked), abs=1e-12)


def test_optimal_aurc_extremes_and_continuous_limit():
    assert optimal_aurc(torch.ones(10, dtype=torch.bool)) == 0.0
    assert optimal_aurc(torch.zeros(10, dtype=torch.bool)) == 1.0
    # Geifman et al. 2019: r + (1 - r) log(1 - r) as N grows
    n, r = 100_000, 0.3
    correct = torch.arange(n) >= int(r * n)
    assert optimal_aurc(correct) == pytest.approx(r + (1 - r) * math.log(1 - r), rel=1e-3)


@pytest.mark.parametrize("seed", range(3))
def test_perfect_ranking_reaches_the_optimum(seed):
    conf, correct = _data(seed, 64, ties=False)
    # every correct prediction above every error; distinct values within each group
    perfect = correct.double() + 0.5 * conf
    assert aurc(perfect, correct) == pytest.approx(optimal_aurc(correct), abs=1e-12)
    assert excess_aurc(perfect, correct) == pytest.approx(0.0, abs=1e-12)
    assert excess_aurc(conf, correct) > 0.01
    # the worst ranking (errors first) is worse than the informative one
    assert aurc(-perfect, correct) > aurc(conf, correct)


@pytest.mark.parametrize("ties", [False, True])
def test_failure_detection_matches_brute_force(ties):
    conf, correct = _data(11, 70, ties)
    assert failure_auroc(conf, correct) == pytest.approx(
        roc_auc_score(correct.numpy(), conf.numpy()), abs=1e-6
    )
    pos, neg = conf[correct].tolist(), conf[~correct].tolist()
    best = 1.0
    for t in sorted(set(conf.tolist())):
        if sum(c >= t for c in pos) / len(pos) >= 0.95:
            best = min(best, sum(c >= t for c in neg) / len(neg))
    assert failure_fpr95(conf, correct) == best


def test_bad_inputs():
    conf, correct = torch.tensor([0.2, 0.7, 0.4]), torch.tensor([True, False, True])
    with pytest.raises(ValueError, match="confidence must have the shape of correct"):
        aurc(conf[:2], correct)
    with pytest.raises(ValueError, match="correct must be boolean or hold only 0/1"):
        aurc(conf, torch.tensor([0, 2, 1]))
    with pytest.raises(ValueError, match="correct must be a non-empty 1-D"):
        optimal_aurc(torch.tensor([], dtype=torch.bool))
    with pytest.raises(ValueError, match="correct must be a non-empty 1-D"):
        risk_coverage_curve(conf[None], correct[None])
    with pytest.raises(ValueError, match="confidence must be finite"):
        excess_aurc(torch.tensor([0.1, float("nan"), 0.3]), correct)
    with pytest.raises(ValueError, match="confidence must be real-valued"):
        aurc(correct, correct)
    with pytest.raises(ValueError, match="failure_auroc needs both correct and misclassified"):
        failure_auroc(conf, torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="failure_fpr95 needs both correct and misclassified"):
        failure_fpr95(conf, torch.zeros(3, dtype=torch.bool))
