"""Mixed precision: the towers under torch.autocast, the curvature in float32 all the same."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_clip

from laplace_vlm import DualEncoderLaplace

N_BATCHES, BATCH = 2, 8


def _batches(tokenizer, device):
    g = torch.Generator().manual_seed(0)
    words = ["cat", "dog", "car", "tree", "boat", "bird", "house", "road"]
    tokens = tokenizer([f"a photo of a {w}" for w in words])
    return [(torch.randn(BATCH, 3, 32, 32, generator=g).to(device), tokens.to(device))
            for _ in range(N_BATCHES)]  # fmt: skip


def _factors(model, batches, autocast):
    la = DualEncoderLaplace(model, contrastive="clip")
    la.adapter.autocast = autocast
    la.fit(batches)
    return [F for block in la.H_facs.kfacs for F in block]


def _relative_errors(device, dtype, tokenizer):
    model = tiny_clip().to(device)
    batches = _batches(tokenizer, device)
    exact = _factors(model, batches, None)
    mixed = _factors(model, batches, dtype)
    assert all(F.dtype == torch.float32 for F in mixed)  # the curvature never in half precision
    return [((m - e).norm() / e.norm()).item() for m, e in zip(mixed, exact, strict=True)]


def test_bf16_autocast_towers_give_fp32_factors_within_bf16_rounding(tokenizer):
    errors = _relative_errors("cpu", torch.bfloat16, tokenizer)
    # bfloat16 keeps 8 significant bits (2^-8 = 0.4%); two transformer layers and the
    # projection compound it to about 1%: far below 5%, and not zero (autocast did run)
    assert max(errors) < 0.05, errors
    assert min(errors) > 1e-5, errors


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype, tol", [(torch.float16, 0.01), (torch.bfloat16, 0.05)])
def test_cuda_autocast_towers_give_fp32_factors(tokenizer, dtype, tol):
    errors = _relative_errors("cuda", dtype, tokenizer)
    assert max(errors) < tol and min(errors) > 0, errors
