"""Bounded memory at scale, half-precision inputs and devices.

Peak memory is measured from the torch CPU allocator itself: ``torch.profiler`` with
``profile_memory=True`` records every allocation and free (``[memory]`` events with signed
byte counts); their running sum in time order is the memory held by tensors created in the
block, and its maximum is the peak. Unlike RSS this ignores the allocator's caching and the
interpreter, and unlike ``tracemalloc`` it sees tensor storage.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from laplace_vlm import DualEncoderLaplace

D, D_IMG, D_TXT, C = 64, 48, 32, 100
SMALL, LARGE, CHUNK = 2_000, 20_000, 256


def torch_peak_bytes(fn):
    """Peak bytes of tensor storage allocated (and not yet freed) while ``fn()`` runs."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # kineto's "no CUDA" notes
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            out = fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    held = peak = 0
    for e in events:
        held += e.nbytes()
        peak = max(peak, held)
    return peak, out


def test_the_peak_measure_sees_intermediates():
    x = torch.randn(256, 256)  # 256 KiB per float32 copy

    def two_temporaries():
        y = x @ x
        z = y * 2  # y and z alive together: 512 KiB
        del y
        return (z + 1).sum()

    peak, _ = torch_peak_bytes(two_temporaries)
    assert 2 * 256 * 1024 <= peak < 3 * 256 * 1024


@pytest.fixture(scope="module")
def fitted():
    g = torch.Generator().manual_seed(0)
    la = DualEncoderLaplace(image_projection=torch.randn(D, D_IMG, generator=g),
                            text_projection=torch.randn(D, D_TXT, generator=g),
                            logit_scale=2.0, prior_precision=3.0)  # fmt: skip
    la.fit([(torch.randn(64, D_IMG, generator=g), torch.randn(64, D_TXT, generator=g))
            for _ in range(4)])  # fmt: skip
    return la, torch.randn(C, D_TXT, generator=g)


def _working_memory(la, text, n, method, chunk_size):
    """Peak bytes of a prediction beyond its own `(N, C)` mean and variance."""
    a = torch.randn(n, D_IMG, generator=torch.Generator().manual_seed(1))
    x = {"image": a, "text": text}
    peak, (mean, var) = torch_peak_bytes(
        lambda: la.predictive_moments(x, pred_type=method, chunk_size=chunk_size)
    )
    assert mean.shape == var.shape == (n, C)
    return peak - mean.nbytes - var.nbytes


@pytest.mark.parametrize("method", ["probcosine", "probcosine_diag", "glm"])
def test_unchunked_working_memory_grows_with_n(fitted, method):
    # positive control for the test below: the measure does see O(N C) intermediates
    la, text = fitted
    small = _working_memory(la, text, SMALL, method, None)
    large = _working_memory(la, text, LARGE, method, None)
    assert large > 5 * small, (small, large)


@pytest.mark.parametrize("method", ["probcosine", "probcosine_diag", "glm"])
def test_chunked_working_memory_is_independent_of_n(fitted, method):
    la, text = fitted
    small = _working_memory(la, text, SMALL, method, CHUNK)
    large = _working_memory(la, text, LARGE, method, CHUNK)
    # 10x the images; the chunk's working set is the same: allow 2x for allocator noise
    assert large < 2 * small, (small, large)


def test_streaming_fit_memory_is_independent_of_the_number_of_batches(fitted):
    la, _ = fitted
    la = DualEncoderLaplace(image_projection=la.heads.image_projection,
                            text_projection=la.heads.text_projection, logit_scale=2.0)  # fmt: skip

    def batches(n):
        g = torch.Generator().manual_seed(2)
        for _ in range(n):  # generated on the fly: nothing held but the current batch
            yield torch.randn(128, D_IMG, generator=g), torch.randn(128, D_TXT, generator=g)

    few, _ = torch_peak_bytes(lambda: la.fit(batches(5)))
    many, _ = torch_peak_bytes(lambda: la.fit(batches(50)))
    assert la.n_data == 50 * 128
    assert many < 1.5 * few, (few, many)


# ----------------------------------------------------------------- dtypes and devices
@pytest.mark.parametrize("head_dtype, act_dtype", [(torch.float16, torch.bfloat16),
                                                   (torch.bfloat16, torch.float16)])  # fmt: skip
def test_half_precision_heads_and_activations_give_fp32_curvature_and_predictive(
    head_dtype, act_dtype
):
    g = torch.Generator().manual_seed(3)
    W_i, W_t = torch.randn(8, 6, generator=g), torch.randn(8, 5, generator=g)
    a_i, a_t = torch.randn(32, 6, generator=g), torch.randn(32, 5, generator=g)
    # the reference sees the same (rounded) numbers, upcast by hand
    W_i, W_t = W_i.to(head_dtype), W_t.to(head_dtype)
    a_i, a_t = a_i.to(act_dtype), a_t.to(act_dtype)
    half = DualEncoderLaplace(image_projection=W_i, text_projection=W_t, logit_scale=1.0)
    ref = DualEncoderLaplace(
        image_projection=W_i.float(), text_projection=W_t.float(), logit_scale=1.0
    )
    batches = [(a_i[i : i + 8], a_t[i : i + 8]) for i in range(0, 32, 8)]
    half.fit(batches)
    ref.fit([(x.float(), y.float()) for x, y in batches])
    for got, want in zip(half.H_facs.kfacs, ref.H_facs.kfacs, strict=True):
        for F_got, F_want in zip(got, want, strict=True):
            assert F_got.dtype == torch.float32
            torch.testing.assert_close(F_got, F_want, rtol=1e-5, atol=1e-6)
    for method in ("probcosine", "probcosine_diag", "glm"):
        mean, var = half.predictive_moments({"image": a_i, "text": a_t[:7]}, pred_type=method)
        mean_ref, var_ref = ref.predictive_moments(
            {"image": a_i.float(), "text": a_t[:7].float()}, pred_type=method
        )
        assert mean.dtype == var.dtype == torch.float32
        assert torch.isfinite(var).all() and (var > 0).all()
        torch.testing.assert_close(mean, mean_ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(var, var_ref, rtol=1e-5, atol=1e-7)
    probs = half({"image": a_i, "text": a_t[:7]})
    assert probs.dtype == torch.float32


def _random_heads(g: torch.Generator) -> DualEncoderLaplace:
    """Random `(8, 6)` / `(8, 5)` heads, not fitted."""
    return DualEncoderLaplace(
        image_projection=torch.randn(8, 6, generator=g),
        text_projection=torch.randn(8, 5, generator=g),
        logit_scale=1.0,
    )


def test_meta_tensors_cannot_be_moved_and_say_so():
    g = torch.Generator().manual_seed(4)
    la = _random_heads(g)
    la.fit([(torch.randn(16, 6, generator=g), torch.randn(16, 5, generator=g))])
    text = torch.randn(3, 5, generator=g)
    with pytest.raises(ValueError, match="'meta' device"):
        la.predictive_moments({"image": torch.empty(4, 6, device="meta"), "text": text})
    with pytest.raises(ValueError, match="'meta' device"):
        la.fit([(torch.empty(4, 6, device="meta"), torch.randn(4, 5))])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_inputs_on_another_device_are_moved_to_the_heads():
    g = torch.Generator().manual_seed(5)
    la = _random_heads(g)
    a_i, a_t = torch.randn(16, 6, generator=g), torch.randn(16, 5, generator=g)
    la.fit([(a_i.cuda(), a_t.cuda())])
    ref = DualEncoderLaplace(
        image_projection=la.heads.image_projection,
        text_projection=la.heads.text_projection,
        logit_scale=1.0,
    )
    ref.fit([(a_i, a_t)])
    torch.testing.assert_close(la.H_facs.kfacs[0][0], ref.H_facs.kfacs[0][0])
    mean, var = la.predictive_moments({"image": a_i.cuda(), "text": a_t.cuda()})
    assert mean.device.type == "cpu"
    torch.testing.assert_close(var, ref.predictive_moments({"image": a_i, "text": a_t})[1])


@pytest.mark.parametrize("pred_type", ["glm", "probcosine"])
def test_monte_carlo_link_memory_is_independent_of_n(fitted, pred_type):
    la, text = fitted
    la.chunk_size = CHUNK

    def working_memory(n):
        a = torch.randn(n, D_IMG, generator=torch.Generator().manual_seed(1))
        x = {"image": a, "text": text[:50]}
        peak, probs = torch_peak_bytes(
            lambda: la(x, pred_type=pred_type, link_approx="mc", n_samples=16)
        )
        return peak - probs.nbytes

    try:
        small, large = working_memory(1_000), working_memory(10_000)
    finally:
        la.chunk_size = None
    assert large < 2 * small, (small, large)
