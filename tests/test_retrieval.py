"""Retrieval rankings and recall@k against brute force on a tiny random problem."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_properties import reference_moments

from laplace_vlm import DualEncoderLaplace
from laplace_vlm.tasks.retrieval import Ranking, rank, rank_scores, recall_at_k


@pytest.fixture(scope="module")
def la_and_data():
    gen = torch.Generator().manual_seed(0)
    W_img = torch.randn(8, 12, generator=gen, dtype=torch.float64)
    W_txt = torch.randn(8, 10, generator=gen, dtype=torch.float64)
    la = DualEncoderLaplace(None, image_projection=W_img, text_projection=W_txt, logit_scale=2.0)
    pairs = [
        (
            torch.randn(6, 12, generator=gen, dtype=torch.float64),
            torch.randn(6, 10, generator=gen, dtype=torch.float64),
        )
        for _ in range(5)
    ]
    la.fit(pairs)
    images = torch.randn(7, 12, generator=gen, dtype=torch.float64)
    texts = torch.randn(9, 10, generator=gen, dtype=torch.float64)
    return la, W_img, W_txt, images, texts


def brute_force_order(scores: list[float]) -> list[int]:
    return sorted(range(len(scores)), key=lambda g: (-scores[g], g))


def _probcosine_mean(la, images, texts):
    """ProbCosine's mean, written out from the embedding moments (not ``predictive_moments``):
    ``s z.t / sqrt((|z|^2 + tr Cov z)(|t|^2 + tr Cov t))``."""
    m = la.embedding_moments({"image": images, "text": texts})
    (z, vz), (t, vt) = m["image"], m["text"]
    norm2 = (z.square().sum(-1) + vz.sum(-1))[:, None] * (t.square().sum(-1) + vt.sum(-1))
    return la.heads.scale * (z @ t.T) / norm2.sqrt()


def test_rankings_match_brute_force_in_both_directions(la_and_data):
    la, _, _, images, texts = la_and_data
    mean = _probcosine_mean(la, images, texts)
    var = la.predictive_moments({"image": images, "text": texts}, pred_type="probcosine")[1]
    i2t = rank(la, images, texts, "image_to_text")
    t2i = rank(la, images, texts, "text_to_image")
    assert i2t.indices.shape == (7, 9) and t2i.indices.shape == (9, 7)
    for q in range(7):
        assert i2t.indices[q].tolist() == brute_force_order(mean[q].tolist())
    for q in range(9):
        assert t2i.indices[q].tolist() == brute_force_order(mean[:, q].tolist())
    torch.testing.assert_close(t2i.var, var.T)
    idx, top_mean, top_var = i2t.top(3)
    torch.testing.assert_close(top_mean, mean.gather(1, idx), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(top_var, var.gather(1, idx))
    assert torch.all(top_mean[:, :-1] >= top_mean[:, 1:])


def test_collapsed_posterior_ranks_by_map_cosine(la_and_data):
    la, W_img, W_txt, images, texts = la_and_data
    la.prior_precision = 1e12
    try:
        ranking = rank(la, images, texts)
    finally:
        la.prior_precision = 1.0
    cos = F.normalize(images @ W_img.T, dim=-1) @ F.normalize(texts @ W_txt.T, dim=-1).T
    for q in range(7):
        assert ranking.indices[q].tolist() == brute_force_order(cos[q].tolist())
    torch.testing.assert_close(
        ranking.mean, torch.exp(torch.tensor(2.0)).double() * cos, rtol=1e-6, atol=1e-8
    )
    assert ranking.var.max() < 1e-8


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("pred_type", ["probcosine", "probcosine_diag", "glm"])
def test_ranking_scores_are_the_dense_posterior_moments(la_and_data, pred_type):
    """Mean and variance of every (image, text) score against the dense-posterior reference,
    and the order against a brute-force sort of that reference mean."""
    la, _, _, images, texts = la_and_data
    mean, cov = reference_moments(la, {"image": images, "text": texts}, pred_type)
    var = cov.diagonal(dim1=1, dim2=2)
    ranking = rank(la, images, texts, pred_type=pred_type)
    torch.testing.assert_close(ranking.mean, mean, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(ranking.var, var, rtol=1e-8, atol=1e-10)
    assert var.min() > 1e-3 * var.max()  # a posterior with spread, not the MAP
    for q in range(len(images)):
        assert ranking.indices[q].tolist() == brute_force_order(mean[q].tolist())
    t2i = rank(la, images, texts, "text_to_image", pred_type=pred_type)
    torch.testing.assert_close(t2i.var, var.T, rtol=1e-8, atol=1e-10)


def brute_force_recall(indices: torch.Tensor, relevant: list[set[int]], k: int) -> float:
    hits = [any(g in relevant[q] for g in indices[q, :k].tolist()) for q in range(len(indices))]
    return sum(hits) / len(hits)


def test_recall_at_k_against_brute_force():
    gen = torch.Generator().manual_seed(1)
    mean = torch.randn(20, 15, generator=gen)
    ranking = rank_scores(mean, torch.rand(20, 15, generator=gen))
    single = torch.randint(0, 15, (20,), generator=gen)
    multi = [sorted(set(torch.randint(0, 15, (3,), generator=gen).tolist())) for _ in range(20)]
    matrix = torch.zeros(20, 15, dtype=torch.bool)
    for q, items in enumerate(multi):
        matrix[q, items] = True
    ks = (1, 3, 5, 15, 50)
    for targets, relevant in (
        (single, [{int(t)} for t in single]),
        (multi, [set(m) for m in multi]),
        (matrix, [set(m) for m in multi]),
    ):
        recall = recall_at_k(ranking, targets, ks)
        assert recall == pytest.approx(
            {k: brute_force_recall(ranking.indices, relevant, k) for k in ks}
        )
    assert recall_at_k(ranking.indices, single, (15,)) == {15: 1.0}


def test_bad_input_raises():
    ranking = Ranking(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="targets"):
        recall_at_k(ranking, [[0], [5]])
    with pytest.raises(ValueError, match="targets"):
        recall_at_k(ranking, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="mean and var"):
        rank_scores(torch.zeros(2, 3), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="direction"):
        rank(None, torch.zeros(1, 1), torch.zeros(1, 1), direction="sideways")
