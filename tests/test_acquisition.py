"""Acquisition functions against brute force and independent Monte Carlo estimators."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from laplace_vlm.active import acquisition as acq
from laplace_vlm.active import batch_rules as rules
from laplace_vlm.predictive.links import sample_logits
from laplace_vlm.predictive.uncertainty import (
    bald,
    bald_from_samples,
    epig_from_samples,
    kl_terms,
    map_entropy,
    predictive_entropy,
)


def _moments(n=5, c=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    mean = 3.0 * torch.randn(n, c, generator=g, dtype=torch.float64)
    var = 4.0 * torch.rand(n, c, generator=g, dtype=torch.float64)
    return mean, var


def _entropy_loop(p):
    return -sum(float(q) * math.log(float(q)) for q in p if q > 0)


def test_map_and_predictive_entropy_match_formulas():
    mean, var = _moments()
    p_map = torch.softmax(mean, -1)
    expected = torch.tensor([_entropy_loop(row) for row in p_map], dtype=torch.float64)
    torch.testing.assert_close(map_entropy(mean), expected)
    kappa = 1.0 / torch.sqrt(1.0 + math.pi / 8.0 * var)
    p_probit = torch.softmax(kappa * mean, -1)
    expected = torch.tensor([_entropy_loop(row) for row in p_probit], dtype=torch.float64)
    torch.testing.assert_close(predictive_entropy(mean, var), expected)
    # zero variance: every Bayesian score reduces to the MAP one, BALD to 0
    zero = torch.zeros_like(var)
    torch.testing.assert_close(predictive_entropy(mean, zero, "mc", 10), map_entropy(mean))
    torch.testing.assert_close(bald(mean, zero, 10), torch.zeros(5, dtype=torch.float64))


def test_predictive_entropy_mc_against_independent_quadrature():
    # C = 2 with one noisy logit: E[softmax] is a 1-D Gaussian integral; Gauss-Hermite is exact-ish.
    mean = torch.tensor([[0.7, -0.2], [2.0, 0.0]], dtype=torch.float64)
    var = torch.tensor([[1.5, 0.0], [3.0, 0.0]], dtype=torch.float64)
    x, w = np.polynomial.hermite_e.hermegauss(80)
    expected = []
    for m, v in zip(mean, var):
        d = m[0] + math.sqrt(v[0]) * torch.tensor(x) - m[1]
        p1 = float((torch.sigmoid(d) * torch.tensor(w)).sum() / w.sum())
        expected.append(_entropy_loop([p1, 1 - p1]))
    got = predictive_entropy(mean, var, link_approx="mc", n_samples=40000, generator=3)
    # MC error of the entropy of a 2-class mean at 40k samples is < 0.005 here
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), atol=0.01, rtol=0)


def test_bald_from_samples_is_total_minus_expected_entropy():
    g = torch.Generator().manual_seed(1)
    samples = 2.0 * torch.randn(7, 3, 4, generator=g, dtype=torch.float64)
    got = bald_from_samples(samples)
    for i in range(3):
        probs = [torch.softmax(samples[s, i], -1) for s in range(7)]
        mean_p = sum(probs) / 7
        total = _entropy_loop(mean_p)
        expected = sum(_entropy_loop(p) for p in probs) / 7
        assert got[i].item() == pytest.approx(total - expected, abs=1e-12)
        assert got[i] >= 0


def test_bald_from_moments_against_label_sampling_estimator():
    # I(y; f) = E_{f, y ~ p(.|f)} [log p(y|f) - log p(y)], estimated with other samples.
    mean, var = _moments(n=3, c=3, seed=2)
    got = bald(mean, var, n_samples=20000, generator=0)
    g = torch.Generator().manual_seed(123)
    f = mean + var.sqrt() * torch.randn(20000, 3, 3, generator=g, dtype=torch.float64)
    p = torch.softmax(f, -1)
    y = torch.multinomial(p.reshape(-1, 3), 1, generator=g).reshape(20000, 3)
    f2 = mean + var.sqrt() * torch.randn(20000, 3, 3, generator=g, dtype=torch.float64)
    p_marg = torch.softmax(f2, -1).mean(0)  # (3, C)
    log_lik = p.gather(-1, y[..., None]).squeeze(-1).log()
    log_marg = p_marg.gather(-1, y.T).T.log()
    naive = (log_lik - log_marg).mean(0)
    # each estimator's MC standard error is about 0.01 here
    torch.testing.assert_close(got, naive, atol=0.04, rtol=0)


def _epig_brute_force(pool_logits, targ_logits):
    """EPIG of an empirical (equally weighted) weight posterior by explicit loops."""
    s_, n, c = pool_logits.shape
    nt, ct = targ_logits.shape[1:]
    pp = torch.softmax(pool_logits, -1)
    pt = torch.softmax(targ_logits, -1)
    out = []
    for i in range(n):
        total = 0.0
        for t in range(nt):
            joint = [
                [sum(pp[s, i, a] * pt[s, t, b] for s in range(s_)) / s_ for b in range(ct)]
                for a in range(c)
            ]
            py = [sum(row) for row in joint]
            pys = [sum(joint[a][b] for a in range(c)) for b in range(ct)]
            h_joint = _entropy_loop([float(v) for row in joint for v in row])
            total += _entropy_loop(py) + _entropy_loop(pys) - h_joint
        out.append(total / nt)
    return torch.tensor(out, dtype=torch.float64)


def test_epig_equals_mutual_information_of_empirical_posterior():
    g = torch.Generator().manual_seed(4)
    pool = 2.0 * torch.randn(6, 3, 3, generator=g, dtype=torch.float64)
    targ = 2.0 * torch.randn(6, 2, 3, generator=g, dtype=torch.float64)
    got = epig_from_samples(pool, targ)
    torch.testing.assert_close(got, _epig_brute_force(pool, targ), atol=1e-10, rtol=0)
    # chunking must not change the result
    torch.testing.assert_close(epig_from_samples(pool, targ, max_elements=1), got)


def test_kl_terms_against_scipy_kl_div():
    # scipy's kl_div(x, y) = x log(x / y) - x + y, i.e. f(r) at y = 1; r = 0 gives 1
    from scipy.special import kl_div

    r = np.array([0.0, 1e-300, 1e-9, 0.3, 1.0 - 1e-6, 1.0, 1.0 + 1e-6, 1.5, 7.0, 1e4])
    got = kl_terms(torch.tensor(r - 1.0, dtype=torch.float64)).numpy()
    np.testing.assert_allclose(got, kl_div(r, 1.0), rtol=1e-9, atol=1e-15)
    # float32 near r = 1: relative accuracy of about eps / |r - 1|, where r log r - r + 1 in
    # float32 is 0 or noise (the true value at excess 1e-3 is 5e-7, float32's eps 1.2e-7)
    excess = np.array([-1e-2, -1e-3, 1e-3, 1e-2])
    got32 = kl_terms(torch.tensor(excess, dtype=torch.float32)).double().numpy()
    np.testing.assert_allclose(got32, kl_div(1.0 + excess, 1.0), rtol=1e-3)


def _tight_samples(s, n, c, seed):
    """float32 logit samples of a very tight posterior: per-input spreads 0.01 .. 0.05."""
    g = torch.Generator().manual_seed(seed)
    mean = 2.0 * torch.randn(1, n, c, generator=g, dtype=torch.float64)
    spread = torch.linspace(0.01, 0.05, n, dtype=torch.float64)[:, None]
    return (mean + spread * torch.randn(s, n, c, generator=g, dtype=torch.float64)).float()


def _log_ratio_form_float64(pool, targ):
    """EPIG ``sum J log(J / (p p*))`` and BALD ``E_s sum p_s log(p_s / p)`` in float64.

    Not as differences of entropies, whose float64 round-off (~1e-14) is not far enough below
    this posterior's smallest EPIG (~1e-10).
    """
    pp, pt = torch.softmax(pool.double(), -1), torch.softmax(targ.double(), -1)
    m, mt = pp.mean(0), pt.mean(0)
    joint = torch.einsum("snc,smd->nmcd", pp, pt) / len(pp)
    epig = (joint * (joint / (m[:, None, :, None] * mt[None, :, None, :])).log()).sum((-1, -2))
    bald = (pp * (pp / m).log()).sum(-1).mean(0)
    return epig.mean(1), bald


def test_bald_and_epig_of_a_tight_posterior_are_accurate_in_float32():
    # the Fashion-MNIST stand-in's regime: EPIG ~1e-7 nats against entropies ~1. As
    # differences of entropies in float32 these were round-off (on its round-0 candidates: 0.4
    # relative error, ranks Spearman 0.71 to float64); as sums of KL terms they are not
    from scipy.stats import spearmanr

    pool, targ = _tight_samples(400, 40, 5, seed=0), _tight_samples(400, 30, 5, seed=1)
    epig64, bald64 = _log_ratio_form_float64(pool, targ)
    assert epig64.max() < 1e-5  # the regime
    epig32 = epig_from_samples(pool, targ)
    assert epig32.dtype == torch.float32
    torch.testing.assert_close(epig32.double(), epig64, rtol=1e-3, atol=0)
    assert spearmanr(epig32.numpy(), epig64.numpy()).correlation > 0.999
    torch.testing.assert_close(bald_from_samples(pool).double(), bald64, rtol=1e-3, atol=0)


def test_epig_against_naive_sampling_estimator_on_linear_gaussian_model():
    """Logits f(x) = theta x with a Gaussian theta: pool/target predictions are correlated."""
    c, d = 3, 2
    g = torch.Generator().manual_seed(5)
    m = torch.randn(c, d, generator=g, dtype=torch.float64)
    x_pool = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7], [3.0, -1.0]], dtype=torch.float64)
    x_targ = torch.tensor([[1.0, 0.2], [2.0, 0.5]], dtype=torch.float64)

    def draw(n, gen):
        theta = m + 1.5 * torch.randn(n, c, d, generator=gen, dtype=torch.float64)
        return theta @ x_pool.T, theta @ x_targ.T  # (n, C, N)

    fp, ft = draw(20000, torch.Generator().manual_seed(0))
    got = epig_from_samples(fp.transpose(1, 2), ft.transpose(1, 2))

    # naive nested estimator: (theta, y, y*) from fresh samples, densities from a third set
    gen = torch.Generator().manual_seed(99)
    fp_o, ft_o = draw(3000, gen)
    fp_i, ft_i = draw(3000, gen)
    pp_o, pt_o = torch.softmax(fp_o, 1), torch.softmax(ft_o, 1)  # (S, C, N)
    pp_i, pt_i = torch.softmax(fp_i, 1), torch.softmax(ft_i, 1)
    naive = torch.zeros(4, dtype=torch.float64)
    for i in range(4):
        for t in range(2):
            y = torch.multinomial(pp_o[:, :, i], 1, generator=gen).squeeze(1)
            ys = torch.multinomial(pt_o[:, :, t], 1, generator=gen).squeeze(1)
            a = pp_i[:, :, i][:, y]  # (S_inner, S_outer) p(y_j | theta_s)
            b = pt_i[:, :, t][:, ys]
            log_ratio = (a * b).mean(0).log() - a.mean(0).log() - b.mean(0).log()
            naive[i] += log_ratio.mean() / 2
    # nested MC: std error ~0.01 at 3k outer samples, inner-sample bias ~1e-3
    torch.testing.assert_close(got, naive, atol=0.03, rtol=0)
    assert got.max() > 0.05  # the test must be able to fail: there is information to find


def test_epig_with_independent_samples_is_near_zero():
    mean, var = _moments(n=4, c=3, seed=6)
    pool = sample_logits(mean, var, 4000, generator=0)
    targ = sample_logits(mean[:2], var[:2], 4000, generator=1)
    assert epig_from_samples(pool, targ).max() < 0.01


def test_acquisition_scores_dispatch():
    mean, var = _moments()
    torch.testing.assert_close(acq.acquisition_scores("logit_variance", mean, var), var.mean(-1))
    torch.testing.assert_close(
        acq.acquisition_scores("map_entropy", mean, var, map_logits=mean + 1.0),
        map_entropy(mean),  # softmax is shift invariant: the MAP logits were used
    )
    torch.testing.assert_close(acq.acquisition_scores("entropy", mean, var),
                               predictive_entropy(mean, var))  # fmt: skip
    samples = sample_logits(mean, var, 30, generator=3)
    torch.testing.assert_close(acq.acquisition_scores("bald", samples=samples),
                               bald_from_samples(samples))  # fmt: skip
    r1 = acq.acquisition_scores("random", mean, var, generator=7)
    assert torch.equal(r1, acq.acquisition_scores("random", mean, var, generator=7))
    assert not torch.equal(r1, acq.acquisition_scores("random", mean, var, generator=8))
    for score, match in (("foo", "score"), ("epig", "samples"), ("bald", "samples")):
        with pytest.raises(ValueError, match=match):
            acq.acquisition_scores(score, mean, var)
    with pytest.raises(ValueError, match="target_samples"):
        acq.acquisition_scores("epig", samples=samples)


def test_strategy_names_parse_into_their_parts():
    parse = acq.Strategy.parse
    assert parse("bald") == acq.Strategy("bald", "bald")
    assert parse("epig_density_power") == acq.Strategy("epig_density_power", "epig", True, "power")
    assert parse("map_entropy_softrank").score == "map_entropy"
    assert parse("logit_variance_density").density and parse("random").targeted
    assert not parse("random_untargeted").targeted
    for bad in ("power", "bald_power_density", "epig_topk", ""):
        with pytest.raises(ValueError, match="strategy"):
            parse(bad)


def test_sampling_log_weights_are_the_formulas():
    s = torch.tensor([0.5, 2.0, 0.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(rules.sampling_log_weights(s, "power", 2.0),
                               torch.tensor([2 * math.log(0.5), 2 * math.log(2.0), -math.inf,
                                             0.0], dtype=torch.float64))  # fmt: skip
    torch.testing.assert_close(rules.sampling_log_weights(s, "softmax", 3.0), 3.0 * s)
    ranks = torch.tensor([3.0, 1.0, 4.0, 2.0], dtype=torch.float64)  # rank 1 = best score
    torch.testing.assert_close(rules.sampling_log_weights(s, "softrank", 1.0), -ranks.log())
    with pytest.raises(ValueError, match="non-negative"):
        rules.sampling_log_weights(-s, "power")
    with pytest.raises(ValueError, match="beta"):
        rules.sampling_log_weights(s, "power", 0.0)


def _plackett_luce(weights, order):
    """Probability of drawing ``order`` first, without replacement, p ~ weights."""
    left, prob = list(weights), 1.0
    for i in order:
        prob *= left[i] / sum(left)
        left[i] = 0.0
    return prob


def test_stochastic_selection_frequencies_match_the_sampling_probabilities():
    # the sampler is shared by the three rules, which differ only in sampling_log_weights
    selection = "power"
    scores = torch.tensor([0.1, 0.4, 0.9, 0.25], dtype=torch.float64)
    weights = rules.sampling_log_weights(scores, selection, 1.5).exp().tolist()
    g = torch.Generator().manual_seed(0)
    n = 8000
    counts: dict[tuple[int, int], int] = {}
    for _ in range(n):
        pair = tuple(rules.select_stochastic(scores, 2, selection, 1.5, generator=g).tolist())
        counts[pair] = counts.get(pair, 0) + 1
    for i in range(4):
        for j in range(4):
            if i != j:
                p = _plackett_luce(weights, (i, j))
                # binomial standard error; 4.5 SE keeps the 12 pairs from flaking
                assert abs(counts.get((i, j), 0) / n - p) < 4.5 * math.sqrt(p * (1 - p) / n)


def test_stochastic_selection_excludes_and_fills_with_zero_weights():
    scores = torch.tensor([0.0, 1.0, 0.0, 2.0, 3.0], dtype=torch.float64)
    got = rules.select_stochastic(scores, 4, "power", exclude=torch.tensor([4]), generator=1)
    assert set(got[:2].tolist()) == {1, 3} and set(got[2:].tolist()) == {0, 2}
    assert rules.select_stochastic(scores, 10, "power").numel() == 5
    big = rules.select_stochastic(scores, 3, "power", beta=1e6, generator=2)  # beta -> top-k
    assert big.tolist() == [4, 3, 1]


def test_information_density_against_a_hand_computation():
    g = torch.Generator().manual_seed(11)
    mu_c, var_c = torch.randn(4, 3, generator=g), torch.rand(4, 3, generator=g)
    mu_t, var_t = torch.randn(5, 3, generator=g), torch.rand(5, 3, generator=g)
    got = acq.information_density((mu_c, var_c), (mu_t, var_t))
    for i in range(4):
        sims = []
        for j in range(5):
            dot = float(mu_c[i] @ mu_t[j])
            na = float(mu_c[i].square().sum() + var_c[i].sum())
            nb = float(mu_t[j].square().sum() + var_t[j].sum())
            sims.append(max(dot / math.sqrt(na * nb), 0.0))
        assert got[i].item() == pytest.approx(sum(sims) / 5, rel=1e-5)
    assert (got >= 0).all() and got.min() < got.max()


def _balanced_brute_force(scores, classes, budget):
    by_class = {}
    for i in sorted(range(len(scores)), key=lambda i: -scores[i]):
        by_class.setdefault(int(classes[i]), []).append(i)
    out, r = [], 0
    while len(out) < budget and any(len(v) > r for v in by_class.values()):
        tier = [v[r] for v in by_class.values() if len(v) > r]
        out += sorted(tier, key=lambda i: -scores[i])
        r += 1
    return out[:budget]


def test_select_top_plain_balanced_and_exclude():
    g = torch.Generator().manual_seed(8)
    scores = torch.rand(40, generator=g, dtype=torch.float64)
    classes = torch.randint(0, 4, (40,), generator=g)
    top = rules.select_top(scores, 7)
    assert top.tolist() == torch.argsort(scores, descending=True)[:7].tolist()
    bal = rules.select_top(scores, 11, class_balanced=True, predicted_class=classes)
    assert bal.tolist() == _balanced_brute_force(scores.tolist(), classes.tolist(), 11)
    excl = rules.select_top(scores, 5, exclude=top[:3])
    assert excl.tolist() == torch.argsort(scores, descending=True)[3:8].tolist()
    assert rules.select_top(scores, 100).numel() == 40
    # ties: seeded, reproducible, and different seeds give different picks
    flat = torch.zeros(40)
    a, b = rules.select_top(flat, 5, generator=1), rules.select_top(flat, 5, generator=1)
    assert torch.equal(a, b) and not torch.equal(a, rules.select_top(flat, 5, generator=2))
    with pytest.raises(ValueError, match="predicted_class"):
        rules.select_top(scores, 3, class_balanced=True)


def _most_balanced_quotas(avail: list[int], counts: list[int], budget: int) -> set[tuple]:
    """Brute force: every quota vector q (q_c <= avail_c, sum q = b) whose histogram
    counts + q is the most balanced (its sorted-descending vector lexicographically least)."""
    import itertools

    budget = min(budget, sum(avail))
    feasible = [q for q in itertools.product(*(range(a + 1) for a in avail)) if sum(q) == budget]
    key = {q: sorted((c + x for c, x in zip(counts, q)), reverse=True) for q in feasible}
    best = min(key.values())
    return {q for q in feasible if key[q] == best}


@pytest.mark.parametrize("seed", range(6))
def test_balanced_order_meets_the_brute_force_quotas(seed):
    g = torch.Generator().manual_seed(seed)
    n, n_classes = 14, 3
    predicted = torch.randint(0, n_classes, (n,), generator=g)
    order = torch.randperm(n, generator=g)
    counts = torch.randint(0, 3, (n_classes,), generator=g)
    for budget in (1, 4, 9, 20):
        picked = rules.balanced_order(order, predicted, budget, counts)
        q = tuple(int((predicted[picked] == c).sum()) for c in range(n_classes))
        avail = [int((predicted == c).sum()) for c in range(n_classes)]
        assert q in _most_balanced_quotas(avail, counts.tolist(), budget)
        # within a class, the points come in the strategy's order
        for c in range(n_classes):
            mine = [i for i in picked.tolist() if predicted[i] == c]
            assert mine == [i for i in order.tolist() if predicted[i] == c][: len(mine)]
        assert len(set(picked.tolist())) == len(picked) == min(budget, n)


def test_balanced_strategies_parse_and_select_from_their_rule():
    s = acq.Strategy.parse("epig_density_balanced_power")
    assert (s.score, s.density, s.balanced, s.selection) == ("epig", True, True, "power")
    assert not acq.Strategy.parse("bald").balanced
    scores = torch.rand(30, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    classes = torch.arange(30) % 3
    top = acq.select(scores, 6, acq.Strategy.parse("bald_balanced"), predicted_class=classes)
    assert top.tolist() == rules.select_top(scores, 6, class_balanced=True,
                                          predicted_class=classes).tolist()  # fmt: skip
    # labelled counts shift the quotas: class 0 already has 4 labels, so it is skipped
    skewed = acq.select(scores, 4, acq.Strategy.parse("bald_balanced"), predicted_class=classes,
                        counts=torch.tensor([4, 0, 0]))  # fmt: skip
    assert sorted(classes[skewed].tolist()) == [1, 1, 2, 2]
    power = acq.Strategy.parse("bald_balanced_power")
    a = acq.select(scores, 6, power, predicted_class=classes, generator=3)
    order = rules.select_stochastic(scores, 30, "power", generator=3)
    assert a.tolist() == rules.balanced_order(order, classes, 6).tolist()
    with pytest.raises(ValueError, match="predicted_class"):
        acq.select(scores, 3, acq.Strategy.parse("bald_balanced"))
