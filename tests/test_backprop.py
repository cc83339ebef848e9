"""laplace's ``enable_backprop``: predictions differentiable in the inputs, else no graph."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_clip
from test_dual_encoder_laplace import loader, make_problem

from laplace_vlm import DualEncoderLaplace

pytestmark = pytest.mark.usefixtures("float64")


def fitted(enable_backprop: bool, bias: bool = True, contrastive: str = "siglip"):
    kw, a_i, a_t = make_problem(bias, seed=4, contrastive=contrastive)
    la = DualEncoderLaplace(**kw, prior_precision=0.5, enable_backprop=enable_backprop)
    la.fit(loader(a_i, a_t))
    return la, a_i[:3], a_t[:4]


@pytest.mark.parametrize("pred_type", ["probcosine", "probcosine_diag", "glm"])
def test_moments_and_probabilities_pass_gradcheck(pred_type):
    la, a_i, a_t = fitted(True)
    a_i, a_t = a_i.clone().requires_grad_(), a_t.clone().requires_grad_()

    def moments(img, txt):
        return la.predictive_moments({"image": img, "text": txt}, pred_type=pred_type)

    assert torch.autograd.gradcheck(moments, (a_i, a_t))
    probs = lambda img, txt: la({"image": img, "text": txt}, pred_type=pred_type)  # noqa: E731
    assert torch.autograd.gradcheck(probs, (a_i, a_t))
    emb = lambda img, txt: la.embedding_moments({"image": img, "text": txt})["image"]  # noqa: E731
    assert torch.autograd.gradcheck(emb, (a_i, a_t))


def test_without_enable_backprop_no_graph_is_built():
    la, a_i, a_t = fitted(False)
    x = {"image": a_i.clone().requires_grad_(), "text": a_t.clone().requires_grad_()}
    for pred_type in ("probcosine", "glm", "map"):
        assert not la(x, pred_type=pred_type).requires_grad
    for value in (*la.predictive_moments(x), *la.embedding_moments(x)["image"]):
        assert not value.requires_grad


def test_model_mode_gradients_reach_the_encoders():
    """Test-time adaptation or prompt tuning: the gradient flows through the image tower."""
    model = tiny_clip(seed=0)
    la = DualEncoderLaplace(model, enable_backprop=True)
    g = torch.Generator().manual_seed(0)
    d_img, d_txt = la.heads.image_projection.in_features, la.heads.text_projection.in_features
    la.fit([(torch.randn(16, d_img, generator=g), torch.randn(16, d_txt, generator=g))])
    images = torch.randn(2, 3, 32, 32, generator=g)
    tokens = torch.randint(1, 400, (3, 16), generator=g)
    model.zero_grad()
    mean, var = la.predictive_moments({"image": images, "text": tokens})
    (mean.sum() + var.sum()).backward()
    first = next(model.visual.parameters())
    assert first.grad is not None and first.grad.abs().sum() > 0
    # the encoder gradient equals the one through the activations (chain rule, checked)
    model.zero_grad()
    feats = la.adapter.encode_image(images, grad=True).activations
    t = la.adapter.encode_text(tokens).activations
    m2, v2 = la.predictive_moments({"image": feats, "text": t})
    (m2.sum() + v2.sum()).backward()
    grad_via_acts = first.grad.clone()
    model.zero_grad()
    mean, var = la.predictive_moments({"image": images, "text": tokens})
    (mean.sum() + var.sum()).backward()
    torch.testing.assert_close(first.grad, grad_via_acts)
