"""ProbCosine (full and diagonal) against the dense posterior's moments, with and
without head biases (laplace's separate bias blocks), chunked or not,
on the preallocated fast path and on the differentiable one."""

from __future__ import annotations

import pytest
import torch
from test_dual_encoder_laplace import loader, make_problem
from test_properties import reference_moments

from laplace_vlm import DualEncoderLaplace

pytestmark = pytest.mark.usefixtures("float64")

TOL = dict(rtol=1e-9, atol=1e-11)
# the joint form (the default) is the bias-free head on [a, 1]: test_joint_bias checks it
BIAS = {"no bias": dict(bias=False), "bias blocks": dict(bias=True)}


def fitted(case: str, contrastive: str):
    kw, a_i, a_t = make_problem(**BIAS[case], seed=4, contrastive=contrastive)
    la = DualEncoderLaplace(**kw, prior_precision=0.8, temperature=0.5)
    la.fit(loader(a_i, a_t))
    return la, {"image": a_i[:7], "text": a_t[:5]}


def reference(la, x, diagonal: bool):
    """Mean and variance `(N, C)` from the dense posterior (``test_properties``' reference)."""
    mean, cov = reference_moments(la, x, "probcosine_diag" if diagonal else "probcosine")
    return mean, cov.diagonal(dim1=1, dim2=2)


@pytest.mark.parametrize("case", list(BIAS))
@pytest.mark.parametrize("contrastive", ["clip", "siglip"])
@pytest.mark.parametrize("pred_type", ["probcosine", "probcosine_diag"])
def test_probcosine_equals_dense_covariances(case, contrastive, pred_type):
    la, x = fitted(case, contrastive)
    want = reference(la, x, diagonal=pred_type == "probcosine_diag")
    for chunk_size in (None, 3):  # one chunk, and chunks that do not divide N = 7
        with torch.no_grad():  # the preallocated in-place path
            got = la.predictive_moments(x, pred_type=pred_type, chunk_size=chunk_size)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, **TOL)
    with torch.enable_grad():  # the differentiable path gives the same and a gradient
        a = x["image"].clone().requires_grad_(True)
        mean, var = la.predictive_moments({**x, "image": a}, pred_type=pred_type, chunk_size=3)
        if mean.requires_grad:
            (mean.sum() + var.sum()).backward()
            assert a.grad is not None and a.grad.abs().sum() > 0
    torch.testing.assert_close(mean.detach(), want[0], **TOL)
    torch.testing.assert_close(var.detach(), want[1], **TOL)


@pytest.mark.parametrize("pred_type", ["probcosine", "probcosine_diag", "glm"])
def test_class_operands_in_class_chunks_equal_one_call(monkeypatch, pred_type):
    from laplace_vlm.predictive import chunks

    la, x = fitted("bias blocks", "siglip")
    with torch.no_grad():
        want = la.predictive_moments(x, pred_type=pred_type)
    monkeypatch.setattr(chunks, "CLASS_CHUNK", 2)  # C = 5 classes: chunks of 2, 2 and 1
    with torch.no_grad():  # preallocated operands
        got = la.predictive_moments(x, pred_type=pred_type, chunk_size=3)
    with torch.enable_grad():  # concatenated operands
        a = x["text"].clone().requires_grad_(True)
        graded = la.predictive_moments({**x, "text": a}, pred_type=pred_type, chunk_size=3)
    for g, h, w in zip(got, graded, want):
        torch.testing.assert_close(g, w, **TOL)
        torch.testing.assert_close(h.detach(), w, **TOL)
