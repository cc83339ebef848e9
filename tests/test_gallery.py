"""Large-gallery retrieval in chunks against the unchunked `(Q, G)` grid of predictive_moments."""

from __future__ import annotations

import pytest
import torch
from test_dual_encoder_laplace import D_IMG, D_TXT, loader, make_problem
from test_memory import torch_peak_bytes

from laplace_vlm import DualEncoderLaplace
from laplace_vlm.tasks.gallery import gallery_index, top_k

pytestmark = pytest.mark.usefixtures("float64")

TOL = dict(rtol=1e-10, atol=1e-12)
G, Q, K, CHUNK = 53, 4, 6, 8  # chunks that do not divide G


def fitted(bias: bool, contrastive: str):
    kw, a_i, a_t = make_problem(bias, seed=2, contrastive=contrastive)
    la = DualEncoderLaplace(**kw, prior_precision=0.5)
    la.fit(loader(a_i, a_t))
    return la


def unchunked(la, queries, gallery, direction, pred_type, k):
    """Top-k of the full grid: one predictive_moments call, one sort per query."""
    if direction == "text_to_image":
        mean, var = la.predictive_moments({"image": gallery, "text": queries}, pred_type=pred_type)
        mean, var = mean.T, var.T
    else:
        mean, var = la.predictive_moments({"image": queries, "text": gallery}, pred_type=pred_type)
    idx = torch.sort(mean, dim=1, descending=True, stable=True).indices[:, :k]
    return idx, mean.gather(1, idx), var.gather(1, idx)


@pytest.mark.parametrize("bias, contrastive", [(False, "clip"), (True, "siglip")])
@pytest.mark.parametrize("direction", ["text_to_image", "image_to_text"])
@pytest.mark.parametrize("pred_type", ["probcosine", "probcosine_diag", "map"])
def test_chunked_top_k_equals_the_unchunked_grid(bias, contrastive, direction, pred_type):
    la = fitted(bias, contrastive)
    g = torch.Generator().manual_seed(7)
    images, texts = torch.randn(G, D_IMG, generator=g), torch.randn(G, D_TXT, generator=g)
    gallery, queries = (images, texts[:Q]) if direction == "text_to_image" else (texts, images[:Q])
    want = unchunked(la, queries, gallery, direction, pred_type, K)
    index = gallery_index(la, gallery, direction, pred_type, chunk_size=CHUNK)
    for idx in (None, index):
        hits = top_k(la, queries, gallery, K, direction, pred_type, index=idx, chunk_size=CHUNK)
        assert torch.equal(hits.indices, want[0])
        torch.testing.assert_close(hits.mean, want[1], **TOL)
        torch.testing.assert_close(hits.var, want[2], **TOL)
    everything = top_k(la, queries, gallery, G + 5, direction, pred_type, chunk_size=CHUNK)
    assert torch.equal(everything.indices.sort(1).values, torch.arange(G).expand(Q, G))


def test_working_memory_is_bounded_by_the_chunk():
    la = fitted(True, "clip")
    g = torch.Generator().manual_seed(8)
    queries = torch.randn(16, D_TXT, generator=g)

    def peak(n):
        gallery = torch.randn(n, D_IMG, generator=g)
        return torch_peak_bytes(lambda: top_k(la, queries, gallery, 5, chunk_size=256))[0]

    small, large = peak(2_000), peak(40_000)
    # 20x the gallery: the same chunk working set (allow 2x for allocator noise); the full
    # (Q, G) grid alone would be 16 x 40,000 x 8 bytes x 2 (mean and variance) = 10 MiB
    assert large < 2 * small, (small, large)
    assert large < 16 * 40_000 * 8, large


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(k=0), ValueError, "k"),
        (dict(chunk_size=0), ValueError, "chunk_size"),
        (dict(pred_type="glm"), ValueError, "pred_type"),
        (dict(direction="sideways"), ValueError, "direction"),
        (dict(gallery=[[0.0] * D_IMG]), TypeError, "gallery"),
        (dict(index=torch.zeros(3, 4)), ValueError, "index"),
    ],
)
def test_bad_arguments_are_named(kwargs, error, match):
    la = fitted(False, "clip")
    args = {"queries": torch.randn(2, D_TXT), "gallery": torch.randn(10, D_IMG), **kwargs}
    with pytest.raises(error, match=match):
        top_k(la, **args)
