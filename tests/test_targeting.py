"""Targeting distances and neighbour collection against brute force."""

from __future__ import annotations

import math

import pytest
import torch

from laplace_vlm.active import targeting


def _gaussians(n, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n, d, generator=g, dtype=torch.float64),
        0.3 * torch.rand(n, d, generator=g, dtype=torch.float64),
    )


def test_distances_match_brute_force():
    mu_a, var_a = _gaussians(4, seed=1)
    mu_b, var_b = _gaussians(6, seed=2)
    w2 = targeting.wasserstein2_sq(mu_a, var_a, mu_b, var_b)
    cos = targeting.expected_cosine(mu_a, var_a, mu_b, var_b)
    for i in range(4):
        for j in range(6):
            expect_w2 = sum(
                (float(mu_a[i, k] - mu_b[i * 0 + j, k])) ** 2
                + (math.sqrt(var_a[i, k]) - math.sqrt(var_b[j, k])) ** 2
                for k in range(5)
            )
            assert w2[i, j].item() == pytest.approx(expect_w2, rel=1e-10, abs=1e-12)
            na = sum(float(mu_a[i, k]) ** 2 + float(var_a[i, k]) for k in range(5))
            nb = sum(float(mu_b[j, k]) ** 2 + float(var_b[j, k]) for k in range(5))
            dot = sum(float(mu_a[i, k] * mu_b[j, k]) for k in range(5))
            assert cos[i, j].item() == pytest.approx(dot / math.sqrt(na * nb), rel=1e-10)
    # a Gaussian is at distance 0 from itself; variance alone separates equal means
    assert targeting.wasserstein2_sq(mu_a, var_a, mu_a, var_a).diagonal().abs().max() < 1e-12
    assert targeting.wasserstein2_sq(mu_a, var_a, mu_a, 4 * var_a).diagonal().min() > 0


def _nn_brute_force(dist, k, excluded=()):
    """dist: (N_t, N_pool), lower is nearer."""
    n_t, n_pool = dist.shape
    ranked = [sorted(range(n_pool), key=lambda j: (float(dist[t, j]), j)) for t in range(n_t)]
    taken, out = set(excluded), []
    want = min(k * n_t, n_pool - len(taken))
    for r in range(n_pool):
        for t in range(n_t):
            j = ranked[t][r]
            if j not in taken and len(out) < want:
                taken.add(j)
                out.append(j)
    return out


@pytest.mark.parametrize("metric", ["wasserstein", "cosine"])
@pytest.mark.parametrize("k", [1, 3])
def test_nearest_neighbours_against_brute_force(metric, k):
    pool = _gaussians(30, seed=3)
    targets = _gaussians(6, seed=4)
    got = targeting.nearest_neighbours(targets, pool, k=k, metric=metric)
    if metric == "wasserstein":
        dist = targeting.wasserstein2_sq(*targets, *pool)
    else:
        dist = -targeting.expected_cosine(*targets, *pool)
    assert got.tolist() == _nn_brute_force(dist, k)
    assert got.unique().numel() == got.numel() == k * 6


def test_nearest_neighbours_overlapping_targets_and_exclusion():
    pool = _gaussians(10, seed=5)
    # identical targets share their nearest neighbour: uniqueness forces rank-2 picks
    targets = (pool[0][:1].repeat(3, 1), pool[1][:1].repeat(3, 1))
    got = targeting.nearest_neighbours(targets, pool, k=1)
    assert got[0].item() == 0 and got.unique().numel() == 3
    excl = torch.zeros(10, dtype=torch.bool)
    excl[:8] = True
    got = targeting.nearest_neighbours(targets, pool, k=2, exclude=excl)
    assert sorted(got.tolist()) == [8, 9]  # capped at the eligible pool
    with pytest.raises(ValueError, match="metric"):
        targeting.nearest_neighbours(targets, pool, metric="l1")
    with pytest.raises(ValueError, match="k"):
        targeting.nearest_neighbours(targets, pool, k=0)


@pytest.mark.parametrize("k", [1, 2])
def test_reference_knn_support_against_brute_force(k):
    """The reference protocol: the first ceil(L/k) targets in order, then their unique kNN."""
    from laplace_vlm.active.config import ActiveLearningConfig
    from laplace_vlm.active.reference import knn_support

    pool, tests = _gaussians(25, seed=6), _gaussians(9, seed=7)
    order = torch.tensor([4, 0, 8, 2, 6, 1, 3, 5, 7])
    config = ActiveLearningConfig(k=k, targeting="wasserstein")
    for n_labels in (1, 4, 7):
        got = knn_support(order, n_labels, tests, pool, config)
        chosen = order[: math.ceil(n_labels / k)]
        dist = targeting.wasserstein2_sq(tests[0][chosen], tests[1][chosen], *pool)
        assert got.tolist() == _nn_brute_force(dist, k)[:n_labels]
        assert got.unique().numel() == n_labels


def test_first_ranks_equal_the_stable_full_sort_with_ties_and_non_finite_rows():
    """Partial ranking (topk, then a stable sort of the few) against torch's full stable sort."""
    g = torch.Generator().manual_seed(8)
    # integer distances: many ties, also across the edge of the first ranks
    dist = torch.randint(0, 6, (40, 50), generator=g).double()
    dist[3, :] = 2.0  # one row all tied
    dist[5, 7], dist[6, 2], dist[6, 9] = math.nan, math.inf, -math.inf
    full = torch.sort(dist, dim=-1, stable=True).indices
    for ranks in (1, 3, 8, 49, 50, 80):
        got = targeting._first_ranks(dist, ranks)
        assert torch.equal(got, full[:, :ranks]), ranks
    # the distances of the targeting code, few ties: the public ranking, all widths
    pool, targets = _gaussians(60, seed=9), _gaussians(7, seed=10)
    whole = targeting.neighbour_ranking(targets, pool)
    assert torch.equal(targeting.neighbour_ranking(targets, pool, ranks=5), whole[:, :5])
    assert torch.equal(targeting.neighbour_ranking(targets, pool, ranks=99), whole)
    with pytest.raises(ValueError, match="ranks must be a positive int or None, got 0"):
        targeting.neighbour_ranking(targets, pool, ranks=0)


def test_nearest_neighbours_beyond_the_first_ranks():
    """Twenty copies of one target need 20 ranks: past the first batch of 4 computed."""
    pool = _gaussians(30, seed=11)
    targets = (pool[0][:1].repeat(20, 1), pool[1][:1].repeat(20, 1))
    got = targeting.nearest_neighbours(targets, pool, k=1)
    dist = targeting.wasserstein2_sq(*targets, *pool)
    assert got.tolist() == _nn_brute_force(dist, 1) and len(got) == 20
