"""Zero-shot classification with uncertainty on a tiny random open_clip model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from brute_force import dense_glm_moments
from conftest import tiny_clip
from test_dual_encoder_laplace import loader, make_problem
from test_properties import MC_ATOL, MC_SAMPLES, _gaussian_draws, weight_logit_samples

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


def _bald(logits: torch.Tensor) -> torch.Tensor:
    """numpy BALD ``H[E p] - E H[p]`` of `(S, N, C)` logit samples."""
    p = torch.softmax(logits, -1).numpy()
    h = lambda q: -(q * np.log(q)).sum(-1)  # noqa: E731
    return torch.from_numpy(h(p.mean(0)) - h(p).mean(0))


@pytest.fixture
def small():
    """A feature-mode posterior small enough for the dense (P, P) references, float64."""
    kw, a_i, a_t = make_problem(bias=True, seed=4, contrastive="clip")
    la = DualEncoderLaplace(**kw, prior_precision=0.5, temperature=2.0)
    la.fit(loader(a_i, a_t))
    return la, ZeroShotClassifier(la, a_t[:5]), a_i[:6]


@pytest.mark.usefixtures("float64")
def test_mc_glm_prediction_matches_dense_monte_carlo(small):
    """``glm`` + ``mc``: probabilities and mutual information of Gaussian draws of the dense
    linearised moments (autodiff Jacobians, dense covariance), with other random draws."""
    la, clf, acts = small
    S = MC_SAMPLES
    pred = clf.predict(acts, pred_type="glm", link_approx="mc", n_samples=S,
                       generator=torch.Generator().manual_seed(1))  # fmt: skip
    mean, cov = dense_glm_moments(la, clf.inputs(acts))
    f = mean + _gaussian_draws(cov, S, torch.Generator().manual_seed(2))
    torch.testing.assert_close(pred.logit_mean, mean, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(pred.logit_var, cov.diagonal(dim1=1, dim2=2), rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(pred.probs, torch.softmax(f, -1).mean(0), rtol=0, atol=MC_ATOL)
    torch.testing.assert_close(pred.mutual_information, _bald(f), rtol=0.15, atol=5e-3)
    assert (pred.mutual_information > 1e-3).all()  # the check is not trivially about zeros


@pytest.mark.usefixtures("float64")
def test_exact_monte_carlo_prediction_matches_dense_weight_samples(small):
    """``pred_type='nn'``: probabilities, logit moments and mutual information against
    weights drawn here from the dense posterior and pushed through the normalised cosine."""
    la, clf, acts = small
    S = MC_SAMPLES
    pred = clf.predict(acts, pred_type="nn", link_approx="mc", n_samples=S,
                       generator=torch.Generator().manual_seed(3))  # fmt: skip
    f = weight_logit_samples(la, clf.inputs(acts), S, torch.Generator().manual_seed(4))
    torch.testing.assert_close(pred.probs, torch.softmax(f, -1).mean(0), rtol=0, atol=MC_ATOL)
    scale = f.std(0).max().item()  # MC error of the mean ~ std / sqrt(S)
    torch.testing.assert_close(pred.logit_mean, f.mean(0), rtol=0, atol=10 * scale / S**0.5)
    torch.testing.assert_close(pred.logit_var, f.var(0), rtol=0.15, atol=1e-3)
    torch.testing.assert_close(pred.mutual_information, _bald(f), rtol=0.15, atol=5e-3)
    # la(x) with the same seed is the same estimator as the classifier's
    same = la(clf.inputs(acts), "nn", link_approx="mc", n_samples=S,
              generator=torch.Generator().manual_seed(3))  # fmt: skip
    torch.testing.assert_close(pred.probs, same)


def test_bad_input_names_the_argument(setup):
    _, _, la, clf, _, acts = setup
    with pytest.raises(ValueError, match="class_activations"):
        ZeroShotClassifier(la, clf.class_activations[0])
    with pytest.raises(ValueError, match="classnames"):
        ZeroShotClassifier(la, clf.class_activations, classnames=["a"])
    with pytest.raises(ValueError, match="pred_type"):
        clf.predict(acts, pred_type="bayes")
