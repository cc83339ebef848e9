"""Zero-shot classification with uncertainty on a tiny random open_clip model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_clip

from laplace_vlm import DualEncoderLaplace
from laplace_vlm.adapters import get_adapter
from laplace_vlm.tasks.zeroshot import ZeroShotClassifier, class_text_activations, format_prompts

CLASSNAMES = ("cat", "dog", "car", "tree")
TEMPLATES = ("a photo of a {}.", "a {c} in the wild.", lambda c: f"my {c}!")


@pytest.fixture(scope="module")
def setup():
    """A tiny CLIP in float64, its posterior fitted on random pairs, and test images."""
    import open_clip

    model = tiny_clip().double()
    tokenizer = open_clip.get_tokenizer("ViT-B-32", context_length=16)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(40, 3, 32, 32, generator=gen, dtype=torch.float64)
    captions = [f"a photo of a {CLASSNAMES[i % 4]} number {i}" for i in range(40)]
    tokens = tokenizer(captions)
    la = DualEncoderLaplace(model, contrastive="clip", temperature=0.1)
    la.fit([(images[i : i + 8], tokens[i : i + 8]) for i in range(0, 40, 8)])
    test_images = torch.randn(6, 3, 32, 32, generator=gen, dtype=torch.float64)
    acts = get_adapter(model).encode_image(test_images).activations
    clf = ZeroShotClassifier.from_prompts(la, get_adapter(model), tokenizer, CLASSNAMES, TEMPLATES)
    return model, tokenizer, la, clf, test_images, acts


def test_format_prompts_takes_open_clip_templates():
    prompts = format_prompts(["cat", "dog"], TEMPLATES)
    assert prompts == [
        "a photo of a cat.",
        "a cat in the wild.",
        "my cat!",
        "a photo of a dog.",
        "a dog in the wild.",
        "my dog!",
    ]
    with pytest.raises(ValueError, match="template"):
        format_prompts(["cat"], ["no placeholder"])
    with pytest.raises(ValueError, match="classnames"):
        format_prompts([], TEMPLATES)
    with pytest.raises(ValueError, match="templates"):
        format_prompts(["cat"], [])


def test_template_ensemble_is_exact_in_the_linear_head(setup):
    model, tokenizer, la, clf, _, _ = setup
    prompts = format_prompts(CLASSNAMES, TEMPLATES)
    with torch.no_grad():
        embeddings = model.encode_text(tokenizer(prompts)).reshape(4, len(TEMPLATES), -1)
    # head(mean of activations) == mean of the prompts' own embeddings
    torch.testing.assert_close(la.model.embed_text(clf.class_activations), embeddings.mean(1))
    acts, residual = class_text_activations(
        get_adapter(model), tokenizer, CLASSNAMES, TEMPLATES, batch_size=5
    )
    torch.testing.assert_close(acts, clf.class_activations)
    assert residual is None


def test_map_prediction_is_the_deterministic_clip(setup):
    model, _, _, clf, images, acts = setup
    pred = clf.predict(acts, pred_type="map")
    with torch.no_grad():
        u = model.encode_image(images, normalize=True)
        t = F.normalize(la_text_embeddings(clf), dim=-1)
        expected = torch.softmax(model.logit_scale.exp() * u @ t.T, -1)
    torch.testing.assert_close(pred.probs, expected)
    assert torch.all(pred.logit_var == 0) and torch.all(pred.mutual_information == 0)
    p = expected.numpy()
    np.testing.assert_allclose(pred.entropy.numpy(), -(p * np.log(p)).sum(1), rtol=1e-10)
    assert torch.equal(pred.predictions, expected.argmax(1))


def la_text_embeddings(clf):
    return clf.la.model.embed_text(clf.class_activations)


def test_mutual_information_is_bald_of_the_logit_samples(setup):
    _, _, la, clf, _, acts = setup
    pred = clf.predict(
        acts, pred_type="probcosine", n_samples=500, generator=torch.Generator().manual_seed(3)
    )
    mean, var = la.predictive_moments({"image": acts, "text": clf.class_activations})
    torch.testing.assert_close(pred.logit_mean, mean)
    # independent numpy BALD on the same Gaussian draws
    eps = torch.randn(
        (500, *mean.shape), generator=torch.Generator().manual_seed(3), dtype=mean.dtype
    )
    p = torch.softmax(mean + var.sqrt() * eps, -1).numpy()
    h = lambda q: -(q * np.log(q)).sum(-1)  # noqa: E731
    np.testing.assert_allclose(
        pred.mutual_information.numpy(), h(p.mean(0)) - h(p).mean(0), rtol=1e-8
    )
    # probit: softmax of the scaled means
    kappa = 1 / np.sqrt(1 + np.pi / 8 * var.numpy())
    np.testing.assert_allclose(
        pred.probs.numpy(), torch.softmax(mean * torch.tensor(kappa), -1).numpy()
    )
    assert torch.all(pred.mutual_information > 0)


def test_uncertainty_shrinks_with_more_pseudo_data(setup):
    _, _, la, clf, _, acts = setup
    map_probs = clf.predict(acts, pred_type="map").probs
    mi = {}
    for n in (1.0, 1e3, 1e9):
        la.temperature = 1 / n
        mi[n] = clf.predict(acts, pred_type="glm").mutual_information
    la.temperature = 0.1
    assert torch.all(mi[1.0] > mi[1e3]) and torch.all(mi[1e3] > mi[1e9])
    # 40 pairs leave activation directions without curvature: only the prior collapses those
    la.prior_precision = 1e12
    collapsed = clf.predict(acts, pred_type="glm")
    la.prior_precision = 1.0
    torch.testing.assert_close(collapsed.probs, map_probs, atol=1e-8, rtol=0)
    assert torch.all(collapsed.mutual_information < 1e-8)


def test_mc_link_uses_joint_weight_samples(setup):
    _, _, la, clf, _, acts = setup
    pred = clf.predict(
        acts,
        pred_type="glm",
        link_approx="mc",
        n_samples=50,
        generator=torch.Generator().manual_seed(1),
    )
    x = {"image": acts, "text": clf.class_activations}
    samples = la.functional_samples(x, "glm", 50, generator=torch.Generator().manual_seed(1))
    p = torch.softmax(samples, -1)
    torch.testing.assert_close(pred.probs, p.mean(0))
    entropy = lambda q: -(q * q.log()).sum(-1)  # noqa: E731
    torch.testing.assert_close(pred.mutual_information, entropy(p.mean(0)) - entropy(p).mean(0))
    assert torch.all(pred.mutual_information <= pred.entropy + 1e-12)


def test_bad_input_names_the_argument(setup):
    _, _, la, clf, _, acts = setup
    with pytest.raises(ValueError, match="class_activations"):
        ZeroShotClassifier(la, clf.class_activations[0])
    with pytest.raises(ValueError, match="classnames"):
        ZeroShotClassifier(la, clf.class_activations, classnames=["a"])
    with pytest.raises(ValueError, match="pred_type"):
        clf.predict(acts, pred_type="bayes")


def test_exact_monte_carlo_prediction_is_the_joint_samples():
    """``pred_type='nn'``: probabilities, moments and mutual information of the same draws."""
    from laplace_vlm.predictive.uncertainty import bald_from_samples

    g = torch.Generator().manual_seed(0)
    W_img, W_txt = torch.randn(6, 10, generator=g), torch.randn(6, 8, generator=g)
    la = DualEncoderLaplace(None, image_projection=W_img, text_projection=W_txt, logit_scale=2.0)
    la.fit([(torch.randn(12, 10, generator=g), torch.randn(12, 8, generator=g))])
    clf = ZeroShotClassifier(la, torch.randn(4, 8, generator=g))
    acts = torch.randn(5, 10, generator=g)
    pred = clf.predict(acts, pred_type="nn", link_approx="mc", n_samples=300,
                       generator=torch.Generator().manual_seed(3))  # fmt: skip
    f = la.functional_samples(
        clf.inputs(acts), "nn", 300, generator=torch.Generator().manual_seed(3)
    )
    torch.testing.assert_close(pred.probs, torch.softmax(f, -1).mean(0))
    torch.testing.assert_close(pred.probs, la(clf.inputs(acts), "nn", link_approx="mc",
                                              n_samples=300,
                                              generator=torch.Generator().manual_seed(3)))  # fmt: skip
    torch.testing.assert_close(pred.logit_var, f.var(0))
    torch.testing.assert_close(pred.mutual_information, bald_from_samples(f))
    with pytest.raises(ValueError, match="link_approx='mc'"):
        clf.predict(acts, pred_type="nn")
