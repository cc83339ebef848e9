"""Model mode: DualEncoderLaplace on open_clip models, images and tokens in, same as feature mode."""

from __future__ import annotations

import laplace
import torch
from conftest import tiny_clip
from torch.utils.data import DataLoader, TensorDataset

from laplace_vlm import DualEncoderLaplace
from laplace_vlm.adapters import get_adapter


def pairs(tokenizer, n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 32, 32, generator=g)
    words = ["cat", "dog", "car", "tree", "boat", "bird"]
    tokens = tokenizer([f"a photo of a {words[i % 6]} number {i}" for i in range(n)])
    return images, tokens


def test_model_mode_equals_feature_mode_on_the_same_pairs(tokenizer):
    model = tiny_clip()
    images, tokens = pairs(tokenizer)
    la = laplace.Laplace(model, "classification", "dual_encoder", "kron", contrastive="clip",
                         prior_precision=2.0)  # fmt: skip
    la.fit(DataLoader(TensorDataset(images, tokens), batch_size=6))

    adapter = get_adapter(model)
    feats_i, feats_t = adapter.encode_image(images), adapter.encode_text(tokens)
    ref = DualEncoderLaplace(
        image_projection=model.visual.proj.detach().T,
        text_projection=model.text_projection.detach().T,
        logit_scale=model.logit_scale.detach(),
        prior_precision=2.0,
    )
    acts = TensorDataset(feats_i.activations, feats_t.activations)
    ref.fit(DataLoader(acts, batch_size=6))
    for got, want in zip(la.H_facs.kfacs, ref.H_facs.kfacs):
        for g_, w_ in zip(got, want):
            torch.testing.assert_close(g_, w_, rtol=1e-4, atol=1e-6)

    x = {"image": images[:4], "text": tokens[:5]}
    x_feat = {"image": feats_i.activations[:4], "text": feats_t.activations[:5]}
    for a, b in zip(la.predictive_moments(x), ref.predictive_moments(x_feat)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # the MAP logits are the model's own zero-shot logits
    with torch.no_grad():
        zi = model.encode_image(images[:4], normalize=True)
        zt = model.encode_text(tokens[:5], normalize=True)
        logits = model.logit_scale.exp() * zi @ zt.T
    torch.testing.assert_close(la.heads(x_feat), logits, rtol=1e-4, atol=1e-5)
    # the user's model is untouched by fitting and predicting
    torch.testing.assert_close(model.visual.proj.detach().T, la.heads.image_projection.weight)


def test_classes_from_tokens_make_a_classifier(tokenizer):
    """``set_classes(tokens)`` then ``la(images)``: the MAP is open_clip's own zero-shot
    classifier, the posterior predictive that of feature mode on the adapter's activations."""
    model = tiny_clip()
    images, tokens = pairs(tokenizer)
    la = DualEncoderLaplace(model)
    la.fit([(images, tokens)])
    la.set_classes(tokens[:3])
    with torch.no_grad():
        zi = model.encode_image(images[:5], normalize=True)
        zt = model.encode_text(tokens[:3], normalize=True)
        expected = torch.softmax(model.logit_scale.exp() * zi @ zt.T, -1)
    torch.testing.assert_close(la(images[:5], pred_type="map"), expected, rtol=1e-4, atol=1e-6)
    adapter = get_adapter(model)
    ref = DualEncoderLaplace(
        image_projection=model.visual.proj.detach().T,
        text_projection=model.text_projection.detach().T,
        logit_scale=model.logit_scale.detach(),
    )
    ref.fit([(adapter.encode_image(images).activations, adapter.encode_text(tokens).activations)])
    x_feat = {"image": adapter.encode_image(images[:5]).activations,
              "text": adapter.encode_text(tokens[:3]).activations}  # fmt: skip
    probs = la(images[:5], pred_type="probcosine")
    torch.testing.assert_close(probs, ref(x_feat, pred_type="probcosine"), rtol=1e-4, atol=1e-6)
    assert (probs - expected).abs().max() > 1e-4  # the posterior moves the prediction
