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


def test_embedding_variance_against_an_independent_eigen_computation(reference):
    la = DualEncoderLaplace.from_bayesvlm(REFERENCE, **vit_b_32_heads(), pseudo_count=10.0)
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


def test_predictive_is_finite_and_sensible_at_vit_b_32_size():
    la = DualEncoderLaplace.from_bayesvlm(REFERENCE, **vit_b_32_heads(), pseudo_count=10.0)
    x = {"image": torch.randn(8, 768), "text": torch.randn(20, 512)}
    for method in ("glm", "probcosine", "probcosine_diag"):
        mean, var = la.predictive_moments(x, pred_type=method)
        assert torch.isfinite(mean).all() and (var > 0).all()
    probs = la(x, pred_type="probcosine")
    torch.testing.assert_close(probs.sum(-1), torch.ones(8))


def test_factors_for_another_model_are_refused():
    heads = vit_b_32_heads()
    heads["image_projection"] = torch.randn(512, 1024)
    with pytest.raises(ValueError, match="another model"):
        DualEncoderLaplace.from_bayesvlm(REFERENCE, **heads)
