"""The closed form's chunked, tiled and shared-logit paths: exact against the per-head form.

``pair_factors`` (both heads and the loss of a class batch from shared logits) must equal
``head_factors`` per head plus ``pair_loss``; row chunks and the CPU tiles of the
elementwise passes must leave every result unchanged; float32 must stay at the accuracy
of a float32 GGN; memory must be bounded by ``chunk_size``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from brute_force import per_sample_ggn
from test_memory import torch_peak_bytes

from laplace_vlm import DualEncoderLaplace, curvature
from laplace_vlm.curvature import closed_form
from laplace_vlm.curvature.likelihoods import pair_loss
from laplace_vlm.heads import similarity_logits

DTYPE = torch.float64
D_IMG, D_TXT, D = 6, 5, 4


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-300)).item()


def _pair_problem(contrastive, M, bias=False, residual=False, seed=0, dtype=DTYPE):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    p = dict(W_i=r(D, D_IMG), W_t=r(D, D_TXT), a_i=r(M, D_IMG), a_t=r(M, D_TXT),
             b_i=r(D) if bias else None, b_t=r(D) if bias else None,
             r_i=r(M, D) if residual else None,
             scale=torch.tensor(3.0, dtype=dtype),
             logit_bias=torch.tensor(-1.5, dtype=dtype) if contrastive == "siglip" else None,
             contrastive=contrastive)  # fmt: skip
    z, t = _embeddings(p)
    return p, z, t


def _embeddings(p):
    z = p["a_i"] @ p["W_i"].T + (0.0 if p["b_i"] is None else p["b_i"])
    if p["r_i"] is not None:
        z = z + p["r_i"]
    return z, p["a_t"] @ p["W_t"].T + (0.0 if p["b_t"] is None else p["b_t"])


def _per_head(p, chunk_size):
    z, t = _embeddings(p)
    u, v = F.normalize(z, dim=-1), F.normalize(t, dim=-1)
    common = (p["scale"], p["logit_bias"], p["contrastive"])
    B_i, A_i = closed_form.head_factors(p["W_i"], p["b_i"], p["a_i"], p["r_i"], v, *common,
                                        chunk_size=chunk_size)  # fmt: skip
    B_t, A_t = closed_form.head_factors(p["W_t"], p["b_t"], p["a_t"], None, u, *common,
                                        chunk_size=chunk_size)  # fmt: skip
    logits = lambda x, y: similarity_logits(x, y, p["scale"], p["logit_bias"])  # noqa: E731
    loss = pair_loss(u, v, torch.arange(len(u)), logits, p["contrastive"], chunk_size)
    return B_i, A_i, B_t, A_t, loss


@pytest.mark.parametrize("residual", [False, True], ids=["no_res", "res"])
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("contrastive", ["clip", "siglip"])
@pytest.mark.parametrize("chunk_size", [None, 1, 3, 7, 8, 50])
def test_pair_factors_equal_head_factors_and_pair_loss(contrastive, bias, residual, chunk_size):
    p, z, t = _pair_problem(contrastive, M=8, bias=bias, residual=residual)
    got = closed_form.pair_factors(z, p["a_i"], t, p["a_t"], p["scale"], p["logit_bias"],
                                   contrastive, chunk_size=chunk_size)  # fmt: skip
    for g_, w_ in zip(got, _per_head(p, chunk_size), strict=True):
        assert g_.shape == w_.shape and g_.dtype == DTYPE
        assert _rel(g_, w_) < 1e-12
    # and against the dense per-sample GGN by autodiff
    u, v = F.normalize(z, dim=-1), F.normalize(t, dim=-1)
    lb = p["logit_bias"]
    assert _rel(got[0], per_sample_ggn(z, v, p["scale"], lb, contrastive)) < 1e-10
    assert _rel(got[2], per_sample_ggn(t, u, p["scale"], lb, contrastive)) < 1e-10
    assert torch.equal(got[0], got[0].T) and torch.equal(got[2], got[2].T)


@pytest.mark.parametrize("contrastive", ["clip", "siglip"])
@pytest.mark.parametrize("chunk_size", [None, 4])
def test_cache_tiles_change_nothing(monkeypatch, contrastive, chunk_size):
    # tiny problems fit one tile; force tiles of 1, 2 and 3 rows (and a ragged last tile)
    p, z, t = _pair_problem(contrastive, M=11, bias=True, residual=True, seed=3)
    args = (z, p["a_i"], t, p["a_t"], p["scale"], p["logit_bias"], contrastive, chunk_size)
    ref = closed_form.pair_factors(*args)
    v = F.normalize(t, dim=-1)
    ref_head = closed_form.output_factor(z, v, p["scale"], p["logit_bias"], contrastive, chunk_size)
    for rows in (1, 2, 3):
        monkeypatch.setattr(closed_form, "_TILE", rows * len(z))
        for g_, w_ in zip(closed_form.pair_factors(*args), ref, strict=True):
            assert _rel(g_, w_) < 1e-13
        head = closed_form.output_factor(z, v, p["scale"], p["logit_bias"], contrastive, chunk_size)
        assert _rel(head, ref_head) < 1e-13


@pytest.mark.parametrize("contrastive", ["clip", "siglip"])
def test_more_rows_than_classes_and_single_rows(contrastive):
    g = torch.Generator().manual_seed(4)
    z = torch.randn(13, D, generator=g, dtype=DTYPE)
    T = F.normalize(torch.randn(5, D, generator=g, dtype=DTYPE), dim=-1)
    s, lb = torch.tensor(2.0, dtype=DTYPE), torch.tensor(-0.5, dtype=DTYPE)
    lb = lb if contrastive == "siglip" else None
    ref = per_sample_ggn(z, T, s, lb, contrastive)
    for chunk in (None, 1, 4, 13):
        assert _rel(closed_form.output_factor(z, T, s, lb, contrastive, chunk), ref) < 1e-10


@pytest.mark.parametrize("chunk_size", [None, 96])
@pytest.mark.parametrize("contrastive", ["clip", "siglip"])
def test_float32_keeps_float32_accuracy(contrastive, chunk_size):
    # CLIP-sized logits (s = 100) and SigLIP's bias of -10: no cancellation beyond rounding
    g = torch.Generator().manual_seed(5)
    M, d = 600, 64
    a_i, a_t = torch.randn(M, d, generator=g), torch.randn(M, d, generator=g)
    W_i, W_t = torch.randn(d, d, generator=g) / 8, torch.randn(d, d, generator=g) / 8
    z, t = a_i @ W_i.T, a_t @ W_t.T
    if contrastive == "clip":
        s, lb = torch.tensor(100.0), None
    else:
        s, lb = torch.tensor(10.0), torch.tensor(-10.0)
    got = closed_form.pair_factors(z, a_i, t, a_t, s, lb, contrastive, chunk_size)
    ref = closed_form.pair_factors(z.double(), a_i.double(), t.double(), a_t.double(),
                                   s.double(), None if lb is None else lb.double(),
                                   contrastive, chunk_size)  # fmt: skip
    for g_, w_ in zip(got, ref, strict=True):
        assert g_.dtype == torch.float32
        assert _rel(g_, w_) < 5e-6


def test_siglip_extreme_logits_stay_finite_and_accurate():
    # |l| up to ~120: sigmoid(l) sigmoid(-l) underflows gracefully on both tails
    g = torch.Generator().manual_seed(6)
    z = torch.randn(64, 16, generator=g)
    t = z + 0.05 * torch.randn(64, 16, generator=g)  # matched pairs nearly parallel
    for lb in (-20.0, 20.0):
        s, b = torch.tensor(100.0), torch.tensor(lb)
        got = closed_form.pair_factors(z, z, t, t, s, b, "siglip", 16)
        ref = closed_form.pair_factors(z.double(), z.double(), t.double(), t.double(),
                                       s.double(), b.double(), "siglip", 16)  # fmt: skip
        for g_, w_ in zip(got, ref, strict=True):
            assert torch.isfinite(g_).all()
            assert _rel(g_, w_) < 1e-4


@pytest.mark.parametrize("chunk_size", [None, 3])
@pytest.mark.parametrize("contrastive", ["clip", "siglip"])
def test_fit_through_pair_factors_equals_the_per_head_fit(monkeypatch, contrastive, chunk_size):
    """The default fit (both heads and the loss from shared logits, ``pair_factors``) against
    the generic path: ``head_factors`` per head, the other tower at its MAP, and ``pair_loss``,
    taken by a backend without ``pair_factors``."""

    def per_head(*args, **kwargs):  # a plain function: no ``pair_factors``, so the generic path
        return closed_form.head_factors(*args, **kwargs)

    monkeypatch.setitem(curvature._BACKENDS, "per_head", per_head)
    g = torch.Generator().manual_seed(7)
    kw = dict(image_projection=torch.nn.Linear(D_IMG, D).double(),
              text_projection=torch.nn.Linear(D_TXT, D).double(), logit_scale=0.7,
              contrastive=contrastive, chunk_size=chunk_size)  # fmt: skip
    if contrastive == "siglip":
        kw["logit_bias"] = -0.5
    batches = [{"image": torch.randn(8, D_IMG, generator=g, dtype=DTYPE),
                "text": torch.randn(8, D_TXT, generator=g, dtype=DTYPE),
                "image_residual": torch.randn(8, D, generator=g, dtype=DTYPE)}
               for _ in range(3)]  # fmt: skip
    ref = DualEncoderLaplace(**kw, curvature="per_head")
    ref.fit(batches)
    la = DualEncoderLaplace(**kw)
    la.fit(batches)
    for got, want in zip(la.H_facs.kfacs, ref.H_facs.kfacs, strict=True):
        for g_, w_ in zip(got, want, strict=True):
            torch.testing.assert_close(g_, w_, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(la.loss, ref.loss, rtol=1e-12, atol=0.0)


@pytest.mark.parametrize("contrastive", ["clip", "siglip"])
def test_working_memory_is_bounded_by_chunk_size(contrastive):
    g = torch.Generator().manual_seed(8)
    M, d, chunk = 2048, 16, 64
    z, t = torch.randn(M, d, generator=g), torch.randn(M, d, generator=g)
    s, lb = torch.tensor(10.0), (torch.tensor(-5.0) if contrastive == "siglip" else None)
    block = chunk * M * 4  # one (chunk, K) float32 buffer
    peak, _ = torch_peak_bytes(
        lambda: closed_form.pair_factors(z, z, t, t, s, lb, contrastive, chunk)
    )
    rows = 24 * M * d * 4  # (M, D) row tensors: normalised towers, scaled copies, accumulators
    assert peak < 2 * block + rows, (peak, block)
    full, _ = torch_peak_bytes(
        lambda: closed_form.pair_factors(z, z, t, t, s, lb, contrastive, None)
    )
    assert full > 8 * peak  # unchunked: (M, M) buffers
