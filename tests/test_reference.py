"""The curvature released with the paper (CLIP ViT-B/32), read from ../shared/reference."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from laplace_vlm import DualEncoderLaplace
from laplace_vlm.io.bayesvlm import REFERENCE_N_DATA, read_bayesvlm_factors

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "bayesvlm-clip-vit-b-32"
pytestmark = pytest.mark.skipif(not REFERENCE.is_dir(), reason="../shared/reference not present")


def vit_b_32_heads(seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        image_projection=torch.randn(512, 768, generator=g) / 768**0.5,
        text_projection=torch.randn(512, 512, generator=g) / 512**0.5,
        logit_scale=torch.tensor(100.0).log(),
    )


@pytest.fixture(scope="module")
def reference():
    return read_bayesvlm_factors(REFERENCE)


def test_factors_keep_the_kronecker_product_and_the_released_prior(reference):
    la = DualEncoderLaplace.from_bayesvlm(REFERENCE, **vit_b_32_heads(), pseudo_count=10.0)
    prior = json.loads((REFERENCE / "prior_precision_analytic.json").read_text())
    torch.testing.assert_close(
        la.prior_precision.double(),
        torch.tensor([prior["lambda_img"], prior["lambda_txt"]]).double(),
    )
    assert la.temperature == pytest.approx(0.1) and la.n_data == REFERENCE_N_DATA
    for (F0, F1), m in zip(la.H_facs.kfacs, ("img", "txt")):
        A, B = reference[f"A_{m}"], reference[f"B_{m}"]
        # (F0 x F1)[i j, k l] = F0[i, k] F1[j, l] must equal B[i, k] A[j, l]
        idx = torch.randint(0, 512, (50,), generator=torch.Generator().manual_seed(0))
        got = F0.double()[idx, idx.flip(0)] * F1.double()[idx, idx]
        want = B[idx, idx.flip(0)] * A[idx, idx]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # statistics stated in reference/README.md
    assert reference["A_img"].trace().item() == pytest.approx(564_881.7, rel=1e-5)
    assert reference["B_txt"].trace().item() == pytest.approx(9_389.5, rel=1e-5)


def test_exact_prior_embedding_variance_against_an_independent_eigen_computation(reference):
    la = DualEncoderLaplace.from_bayesvlm(
        REFERENCE, **vit_b_32_heads(), pseudo_count=10.0, damping=False
    )
    a = torch.randn(3, 768, generator=torch.Generator().manual_seed(1)).double()
    # Cov[vec W] = (n B x A + lambda I)^-1 with n = pseudo-count: use the released factors directly
    lB, QB = torch.linalg.eigh(reference["B_img"])
    lA, QA = torch.linalg.eigh(reference["A_img"])
    lam = la.prior_precision[0].double()
    inv = 1.0 / (10.0 * torch.outer(lB.clamp(min=0), lA.clamp(min=0)) + lam)
    c = ((a @ QA) ** 2) @ inv.T
    expected = c @ (QB**2).T
    got = la.embedding_moments({"image": a.float(), "text": torch.randn(2, 512)})["image"][1]
    torch.testing.assert_close(got.double(), expected, rtol=2e-3, atol=1e-9)


def _psd(M):
    """``M`` symmetrised and projected on the PSD cone, as laplace's ``symeig`` does: the
    released ``B_img`` is asymmetric by 5e-5 and has one eigenvalue of -4.9e-4 (of 437);
    without the projection the variances differ from the raw files by up to 3e-5 relative."""
    lam, Q = torch.linalg.eigh((M + M.T) / 2)
    return (Q * lam.clamp(min=0)) @ Q.T


def _reference_diag_moments(a, A, B, n, lam):
    """The reference pipeline, densely: ``Cov[g] = (a^T A_post^-1 a) B_post^-1``, its diagonal,
    with ``A_post = sqrt(n) A + sqrt(lam) I`` and ``B_post = sqrt(n) B + sqrt(lam) I``."""
    A_inv = torch.linalg.inv(n**0.5 * _psd(A) + lam.sqrt() * torch.eye(len(A), dtype=A.dtype))
    B_inv = torch.linalg.inv(n**0.5 * _psd(B) + lam.sqrt() * torch.eye(len(B), dtype=B.dtype))
    return torch.einsum("ij,jk,ik->i", a, A_inv, a)[:, None] * B_inv.diagonal()[None]


def test_default_posterior_reproduces_the_reference_pipeline(reference):
    """``from_bayesvlm`` defaults to the reference's symmetric form: ``probcosine_diag`` is then
    the reference's ProbCosine on its own covariances, to 1e-6 relative (float64)."""
    heads = {k: v.double() for k, v in vit_b_32_heads().items()}
    la = DualEncoderLaplace.from_bayesvlm(REFERENCE, **heads, pseudo_count=10.0)
    assert la.posterior_form == "symmetric"
    g = torch.Generator().manual_seed(2)
    a_img = torch.randn(4, 768, generator=g, dtype=torch.float64)
    a_txt = torch.randn(6, 512, generator=g, dtype=torch.float64)
    lam_i, lam_t = la.prior_precision.double()
    var_z = _reference_diag_moments(a_img, reference["A_img"], reference["B_img"], 10.0, lam_i)
    var_t = _reference_diag_moments(a_txt, reference["A_txt"], reference["B_txt"], 10.0, lam_t)
    z, t = a_img @ heads["image_projection"].T, a_txt @ heads["text_projection"].T
    moments = la.embedding_moments({"image": a_img, "text": a_txt})
    torch.testing.assert_close(moments["image"][1], var_z, rtol=1e-6, atol=0)
    torch.testing.assert_close(moments["text"][1], var_t, rtol=1e-6, atol=0)
    # ProbCosine (research notes, 1.7), written out: E|g|^2 = |mu|^2 + sum var
    norm2 = (z.square().sum(-1) + var_z.sum(-1))[:, None] * (t.square().sum(-1) + var_t.sum(-1))
    numer = (z.square() + var_z) @ var_t.T + var_z @ t.square().T
    s = la.heads.scale
    mean, var = la.predictive_moments({"image": a_img, "text": a_txt}, "probcosine_diag")
    torch.testing.assert_close(mean, s * (z @ t.T) / norm2.sqrt(), rtol=1e-6, atol=0)
    torch.testing.assert_close(var, s**2 * numer / norm2, rtol=1e-6, atol=0)
    # the exact-prior form (fit's default) has larger variance on these factors
    exact = DualEncoderLaplace.from_bayesvlm(REFERENCE, **heads, pseudo_count=10.0, damping=False)
    tr_exact = exact.embedding_moments({"image": a_img, "text": a_txt})["image"][1].sum(-1)
    assert (tr_exact > 2 * var_z.sum(-1)).all(), (tr_exact, var_z.sum(-1))


def test_factors_for_another_model_are_refused():
    heads = vit_b_32_heads()
    heads["image_projection"] = torch.randn(512, 1024)
    with pytest.raises(ValueError, match="another model"):
        DualEncoderLaplace.from_bayesvlm(REFERENCE, **heads)
