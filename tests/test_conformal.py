"""Split conformal sets against brute force, the finite-sample guarantee and bad inputs."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from laplace_vlm.evaluation.conformal import (
    SplitConformal,
    conformal_quantile,
    coverage,
    mean_set_size,
)


def brute_quantile(scores: list[float], alpha: str) -> float:
    """Smallest calibration score that at least ceil((n+1)(1-alpha)) scores do not exceed."""
    n = len(scores)
    k = math.ceil((n + 1) * (1 - Fraction(alpha)))  # exact decimal arithmetic
    candidates = [s for s in scores if sum(t <= s for t in scores) >= k]
    return min(candidates) if candidates else math.inf


def brute_scores(row: list[float], method: str, u: float = 1.0, k_reg=0, lam=0.0) -> list[float]:
    """APS/RAPS scores of every class by a running sum over the classes by decreasing p."""
    order = sorted(range(len(row)), key=lambda c: (-row[c], c))
    scores, above = [0.0] * len(row), 0.0
    for rank, c in enumerate(order, start=1):
        score = above + row[c] if u == 1.0 else above + u * row[c]
        if method == "raps":
            score += lam * max(0, rank - k_reg)
        scores[c] = score
        above += row[c]
    return scores


def _probs(seed: int, n: int, c: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.full(c, 0.5), size=n)
    y = (rng.random((n, 1)) > p.cumsum(1)).sum(1).clip(max=c - 1)
    return torch.tensor(p), torch.tensor(y)


@pytest.mark.parametrize("alpha", ["0.1", "0.05", "0.3", "0.5", "0.2", "0.7"])
@pytest.mark.parametrize("n", [1, 4, 9, 10, 19, 37, 100])
def test_quantile_matches_brute_force(n, alpha):
    scores = torch.rand(n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    want = brute_quantile(scores.tolist(), alpha)
    assert conformal_quantile(scores, float(alpha)) == want
    k = math.ceil((n + 1) * (1 - Fraction(alpha)))
    if k <= n:  # numpy's inverse-CDF quantile at k/n is the same order statistic
        assert want == np.quantile(scores.numpy(), k / n, method="inverted_cdf")


def test_quantile_edge_cases():
    # n = 9, alpha = 0.7: k = 3 although (9 + 1) * (1 - 0.7) is 3.0000000000000004 in binary
    scores = torch.arange(1.0, 10.0, dtype=torch.float64)
    assert conformal_quantile(scores, 0.7) == 3.0
    assert conformal_quantile(scores, 0.1) == 9.0
    # n = 8 < 1/alpha - 1: no finite threshold, every set is every class
    probs, labels = _probs(0, 8)
    model = SplitConformal("lac", alpha=0.1).fit(probs, labels)
    assert model.q_hat == math.inf
    assert model.predict(_probs(1, 5)[0]).all()


@pytest.mark.parametrize("alpha", [0.1, 0.2, 0.05])
def test_lac_matches_brute_force(alpha):
    probs, labels = _probs(2, 60)
    model = SplitConformal("lac", alpha=alpha).fit(probs, labels)
    cal_scores = [1 - probs[i, labels[i]].item() for i in range(60)]
    assert model.q_hat == brute_quantile(cal_scores, str(alpha))
    test = _probs(3, 40)[0]
    sets = model.predict(test)
    want = [[p >= 1 - model.q_hat for p in row] for row in test.tolist()]
    assert sets.tolist() == want


@pytest.mark.parametrize("method", ["aps", "raps"])
def test_nonrandomized_sets_match_cumulative_sum_loop(method):
    kw = dict(k_reg=2, lam=0.05) if method == "raps" else {}
    probs, labels = _probs(4, 80)
    model = SplitConformal(method, alpha=0.1, randomized=False, **kw).fit(probs, labels)
    cal_scores = [
        brute_scores(row, method, **kw)[y] for row, y in zip(probs.tolist(), labels.tolist())
    ]
    assert model.q_hat == pytest.approx(brute_quantile(cal_scores, "0.1"), abs=1e-15)
    test = _probs(5, 50)[0]
    want = [[s <= model.q_hat for s in brute_scores(row, method, **kw)] for row in test.tolist()]
    assert model.predict(test).tolist() == want


@pytest.mark.parametrize("method", ["aps", "raps"])
def test_randomized_scores_and_sets(method):
    kw = dict(k_reg=1, lam=0.2) if method == "raps" else {}
    probs = _probs(6, 30)[0]
    u = torch.rand(30, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    model = SplitConformal(method, **kw)
    got = model.scores(probs, u)
    want = [brute_scores(row, method, ui, **kw) for row, ui in zip(probs.tolist(), u.tolist())]
    assert torch.allclose(got, torch.tensor(want, dtype=torch.float64), rtol=0, atol=1e-14)

    # predict draws u as torch.rand(N, generator=..., dtype=float64) from the given generator
    cal_probs, cal_labels = _probs(7, 50)
    fitted = SplitConformal(method, generator=torch.Generator().manual_seed(1), **kw)
    fitted.fit(cal_probs, cal_labels)
    fitted.generator.manual_seed(5)
    sets = fitted.predict(probs)
    u = torch.rand(30, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    assert torch.equal(sets, fitted.scores(probs, u) <= fitted.q_hat)


def test_aps_ties_are_ranked_by_class_index():
    probs = torch.tensor([[0.3, 0.4, 0.3]], dtype=torch.float64)
    scores = SplitConformal("aps", randomized=False).scores(probs)
    assert scores[0].tolist() == pytest.approx([0.7, 0.4, 1.0])


@pytest.mark.parametrize("method", ["lac", "aps", "raps"])
def test_calibration_points_on_the_threshold_are_covered(method):
    probs, labels = _probs(8, 45)
    model = SplitConformal(method, alpha=0.2, randomized=False).fit(probs, labels)
    k = math.ceil(46 * (1 - Fraction("0.2")))
    # the k calibration scores <= q_hat (including the one equal to it) are in their sets
    assert coverage(model.predict(probs), labels) >= k / 45


def test_coverage_guarantee_and_lac_smallest_sets():
    """Average over 200 exchangeable calibration/test splits of calibrated Dirichlet data."""
    rng = np.random.default_rng(0)
    splits, n, m, c, alpha = 200, 100, 500, 10, 0.1
    p = rng.dirichlet(np.full(c, 0.3), size=(splits, n + m))
    y = (rng.random((splits, n + m, 1)) > p.cumsum(-1)).sum(-1).clip(max=c - 1)
    p, y = torch.tensor(p), torch.tensor(y)
    gen = torch.Generator().manual_seed(0)
    methods = {
        "lac": dict(),
        "aps": dict(randomized=True, generator=gen),
        "raps": dict(randomized=True, generator=gen, k_reg=1, lam=0.1),
    }
    k = math.ceil((n + 1) * (1 - Fraction("0.1")))
    sizes = {}
    for name, kw in methods.items():
        cov, size = [], []
        for s in range(splits):
            sets = SplitConformal(name, alpha, **kw).fit(p[s, :n], y[s, :n]).predict(p[s, n:])
            cov.append(coverage(sets, y[s, n:]))
            size.append(mean_set_size(sets))
        cov = np.array(cov)
        se = cov.std(ddof=1) / math.sqrt(splits)
        assert 1 - alpha - 4 * se <= cov.mean() <= 1 - alpha + 1 / (n + 1) + 4 * se, name
        # with untied scores the expected coverage is exactly k / (n + 1)
        assert abs(cov.mean() - k / (n + 1)) <= 4 * se, name
        sizes[name] = np.array(size)
    for name in ("aps", "raps"):
        diff = sizes[name] - sizes["lac"]  # paired: same splits
        assert diff.mean() > 4 * diff.std(ddof=1) / math.sqrt(splits), name


def test_coverage_and_set_size_by_hand():
    sets = torch.tensor([[True, False, True], [False, False, False], [True, True, True]])
    labels = torch.tensor([2, 0, 1])
    assert coverage(sets, labels) == pytest.approx(2 / 3)
    assert mean_set_size(sets) == pytest.approx(5 / 3)


def test_bad_inputs():
    probs, labels = _probs(0, 20)
    for alpha in (0.0, 1.0, -0.1, 1.5, True, "0.1"):
        with pytest.raises(ValueError, match="alpha must be a number in \\(0, 1\\)"):
            SplitConformal("lac", alpha=alpha)
    with pytest.raises(ValueError, match="method must be one of"):
        SplitConformal("thr")
    with pytest.raises(ValueError, match="randomized=True applies only"):
        SplitConformal("lac", randomized=True)
    with pytest.raises(ValueError, match="k_reg and lam apply only to method='raps'"):
        SplitConformal("aps", lam=0.1)
    with pytest.raises(ValueError, match="k_reg must be an integer >= 0"):
        SplitConformal("raps", k_reg=-1)
    with pytest.raises(ValueError, match="lam must be a finite number >= 0"):
        SplitConformal("raps", lam=-0.5)
    with pytest.raises(ValueError, match="generator is used only by randomized"):
        SplitConformal("aps", randomized=False, generator=torch.Generator())
    with pytest.raises(ValueError, match="not fitted"):
        SplitConformal("aps").predict(probs)
    model = SplitConformal("lac")
    with pytest.raises(ValueError, match="cal_probs must have shape \\(N, d\\)"):
        model.fit(probs[0], labels)
    with pytest.raises(ValueError, match="cal_labels must be 1-D of length 20"):
        model.fit(probs, labels[:-1])
    with pytest.raises(ValueError, match="cal_labels must hold integer class indices"):
        model.fit(probs, labels.double())
    with pytest.raises(ValueError, match="cal_labels must lie in \\[0, 6\\)"):
        model.fit(probs, labels + 6)
    with pytest.raises(ValueError, match="cal_probs must hold class probabilities"):
        model.fit(torch.log(probs), labels)  # log-probabilities, not probabilities
    with pytest.raises(ValueError, match="cal_probs is empty"):
        model.fit(probs[:0], labels[:0])
    model.fit(probs, labels)
    with pytest.raises(ValueError, match="probs must have the 6 classes"):
        model.predict(probs[:, :5])
    with pytest.raises(ValueError, match="probs contains NaN or inf"):
        model.predict(torch.full((2, 6), float("nan")))
    with pytest.raises(ValueError, match="u is used only by randomized"):
        model.scores(probs, torch.rand(20))
    with pytest.raises(ValueError, match="u must be a \\(20,\\) tensor"):
        SplitConformal("aps").scores(probs, torch.rand(3))
    with pytest.raises(ValueError, match="sets must be a 2-D \\(N, C\\) bool"):
        coverage(torch.ones(2, 3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="labels must be 1-D of length 2"):
        coverage(torch.ones(2, 3, dtype=torch.bool), torch.tensor([0]))
    with pytest.raises(ValueError, match="sets must hold at least one"):
        mean_set_size(torch.ones(0, 3, dtype=torch.bool))
