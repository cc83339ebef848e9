"""Hostile and broken input: every case ends in a clear error (message matched), never in
``exit()``, a NaN result, or unpickling a file."""

from __future__ import annotations

import json
import os
import pickle
import re

import pytest
import torch
from conftest import tiny_clip
from safetensors import safe_open
from safetensors.torch import save_file
from test_dual_encoder_laplace import D_IMG, D_TXT, D, loader, make_problem
from torch.utils.data import DataLoader, TensorDataset

from laplace_vlm import DualEncoderLaplace
from laplace_vlm.active.acquisition import acquisition_scores
from laplace_vlm.evaluation.calibration import TemperatureScaling
from laplace_vlm.evaluation.detection import detection_auroc, fpr_at_tpr, mcm
from laplace_vlm.evaluation.metrics import accuracy, brier, classification_metrics, ece, nlpd
from laplace_vlm.evaluation.pseudo_count import select_pseudo_count, tune_prior_at
from laplace_vlm.evaluation.selective import aurc, failure_auroc
from laplace_vlm.posterior.marglik import maximize_marglik
from laplace_vlm.predictive.links import laplace_bridge, sample_logits
from laplace_vlm.predictive.uncertainty import (
    bald_from_samples,
    epig_from_samples,
    predictive_entropy,
)
from laplace_vlm.tasks.retrieval import rank, rank_scores, recall_at_k, relevance_matrix
from laplace_vlm.tasks.zeroshot import ZeroShotClassifier, class_text_activations

pytestmark = pytest.mark.usefixtures("float64")

NAN, INF = float("nan"), float("inf")


def fitted(
    contrastive: str = "clip", **kwargs
) -> tuple[DualEncoderLaplace, torch.Tensor, torch.Tensor]:
    kw, a_i, a_t = make_problem(bias=False, contrastive=contrastive)
    la = DualEncoderLaplace(**kw, **kwargs)
    la.fit(loader(a_i, a_t))
    return la, a_i, a_t


def raises_value_error(fn, match: str) -> None:
    """``fn()`` raises a ValueError matching ``match``; laplace's ``exit()`` fails the test."""
    try:
        with pytest.raises(ValueError, match=match):
            fn()
    except SystemExit:  # pragma: no cover - the failure this guards against
        pytest.fail("exit() was called (laplace's symeig on a non-finite matrix)")


# ----------------------------------------------------------------- fit batches
def _batch(**overrides):
    g = torch.Generator().manual_seed(7)
    batch = {
        "image": torch.randn(8, D_IMG, generator=g),
        "text": torch.randn(8, D_TXT, generator=g),
    }
    batch.update(overrides)
    return batch


def _cancelling_residual():
    """A residual that cancels the projection: z = W a + r = 0."""
    W = make_problem(bias=False)[0]["image_projection"].weight.detach()
    return _batch(image_residual=-_batch()["image"] @ W.T)


# batches are built inside the test, under the float64 fixture
@pytest.mark.parametrize(
    "make_batch, error, match",
    [
        (
            lambda: (torch.randn(8, D_IMG), torch.randn(8, D_TXT), torch.randn(8)),
            ValueError,
            "must be",
        ),  # fmt: skip
        (lambda: {"img": torch.randn(8, D_IMG)}, ValueError, "'image' and 'text'"),
        (lambda: "not a batch", ValueError, "a fit batch must be"),
        (lambda: _batch(image=torch.randn(D_IMG)), ValueError, "shape"),
        (lambda: _batch(image=torch.randn(8, D_IMG, 1)), ValueError, "feature mode"),
        (lambda: _batch(image=torch.randn(8, D_IMG + 1)), ValueError, r"\(N, 6\)"),
        (
            lambda: _batch(image=torch.ones(8, D_IMG, dtype=torch.int64)),
            TypeError,
            "floating-point",
        ),  # fmt: skip
        (lambda: _batch(image=[[0.0] * D_IMG] * 8), TypeError, "torch.Tensor"),
        (lambda: _batch(text=torch.randn(7, D_TXT)), ValueError, "matched pairs"),
        (
            lambda: _batch(image=torch.randn(0, D_IMG), text=torch.randn(0, D_TXT)),
            ValueError,
            "empty",
        ),  # fmt: skip
        (lambda: _batch(image=torch.full((8, D_IMG), NAN)), ValueError, "NaN or inf"),
        (lambda: _batch(text=torch.full((8, D_TXT), -INF)), ValueError, "NaN or inf"),
        (
            lambda: _batch(image_residual=torch.full((8, D), NAN)),
            ValueError,
            "residual contains NaN",
        ),  # fmt: skip
        (lambda: _batch(image_residual=torch.zeros(7, D)), ValueError, "residual must have 8"),
        (lambda: _batch(image=torch.zeros(8, D_IMG)), ValueError, "zero-norm"),
        (_cancelling_residual, ValueError, "zero-norm"),
        # |z|^2 overflows float64: reported as such, not as a zero norm or a NaN factor
        (lambda: _batch(image=torch.full((8, D_IMG), 1e160)), ValueError, "overflowing"),
    ],
)
def test_bad_fit_batches(make_batch, error, match):
    kw, _, _ = make_problem(bias=False)
    batch = make_batch()
    with pytest.raises(error, match=match):
        DualEncoderLaplace(**kw).fit([batch])


def _empty_generator():
    yield from ()


@pytest.mark.parametrize(
    "make_loader",
    [
        lambda: [],
        _empty_generator,
        lambda: DataLoader(
            TensorDataset(torch.randn(0, D_IMG), torch.randn(0, D_TXT)), batch_size=4
        ),
    ],
    ids=["list", "generator", "dataloader"],
)
def test_empty_loaders(make_loader):
    kw, _, _ = make_problem(bias=False)
    with pytest.raises(ValueError, match="no pairs"):
        DualEncoderLaplace(**kw).fit(make_loader())


# ----------------------------------------------------------------- heads and hyperparameters
@pytest.mark.parametrize(
    "override, match",
    [
        ({"logit_scale": NAN}, "logit_scale"),
        ({"logit_scale": INF}, "logit_scale"),
        ({"logit_scale": torch.ones(2)}, "scalar"),
        ({"logit_bias": -INF}, "logit_bias"),
        ({"text_projection": torch.randn(D + 1, D_TXT)}, "same embedding dim"),
        ({"image_projection": torch.randn(D, D_IMG, 2)}, r"\(D, d\)"),
        ({"contrastive": "infonce"}, "contrastive"),
        ({"chunk_size": 0}, "chunk_size"),
    ],
)
def test_bad_heads_and_arguments(override, match):
    kw, _, _ = make_problem(bias=False)
    with pytest.raises(ValueError, match=match):
        DualEncoderLaplace(**{**kw, **override})


def test_nan_projection_weights_are_refused_before_any_curvature():
    kw, a_i, a_t = make_problem(bias=False)
    bad = {**kw, "image_projection": torch.full((D, D_IMG), NAN)}

    def construct_and_fit():
        DualEncoderLaplace(**bad).fit(loader(a_i, a_t))

    raises_value_error(construct_and_fit, "NaN or inf")


@pytest.mark.parametrize(
    "hyper", [{"prior_precision": -1.0}, {"prior_precision": NAN}, {"temperature": 0.0}]
)
def test_non_positive_prior_or_temperature_is_refused(hyper):
    kw, a_i, a_t = make_problem(bias=False)

    def construct_fit_predict():
        la = DualEncoderLaplace(**kw, **hyper)
        la.fit(loader(a_i, a_t))
        la.predictive_moments({"image": a_i[:3], "text": a_t[:4]})

    raises_value_error(construct_fit_predict, "prior_precision|temperature")


# ----------------------------------------------------------------- degenerate curvature
@pytest.mark.parametrize("contrastive", ["clip", "siglip"])
@pytest.mark.parametrize("prior", [1.0, 1e-6])
def test_rank_deficient_curvature_gives_finite_positive_variances(contrastive, prior):
    # every pair identical: all logits of a row are equal, the GGN of each head is ~0
    kw, a_i, a_t = make_problem(bias=True, contrastive=contrastive)
    la = DualEncoderLaplace(**kw, prior_precision=prior)
    la.fit([(a_i[:1].repeat(8, 1), a_t[:1].repeat(8, 1)) for _ in range(3)])
    B = la.H_facs.kfacs[0][0]
    assert torch.linalg.matrix_rank(B, atol=1e-8) < D  # really rank-deficient
    x = {"image": a_i[:5], "text": a_t[:6]}
    for method in ("probcosine", "probcosine_diag", "glm"):
        mean, var = la.predictive_moments(x, pred_type=method)
        assert torch.isfinite(mean).all() and torch.isfinite(var).all(), method
        assert (var > 0).all(), method
    for pred_type in ("glm", "probcosine"):
        mean, var = la.predictive_moments(x, pred_type=pred_type)
        probit = torch.softmax(mean / torch.sqrt(1 + torch.pi / 8 * var), -1)
        torch.testing.assert_close(la(x, pred_type=pred_type), probit)


def test_non_finite_curvature_is_a_value_error_not_exit():
    # finite activations whose outer products overflow float32: A = sum a a^T = inf
    g = torch.Generator().manual_seed(0)
    W_i, W_t = 1e-10 * torch.randn(D, D_IMG, generator=g), torch.randn(D, D_TXT, generator=g)
    la = DualEncoderLaplace(image_projection=W_i.float(), text_projection=W_t.float(),
                            logit_scale=0.5)  # fmt: skip
    a_i = 1e20 * torch.randn(8, D_IMG, generator=g).float()
    a_t = torch.randn(8, D_TXT, generator=g).float()
    assert torch.isfinite(a_i).all() and not torch.isfinite(a_i.T @ a_i).all()
    raises_value_error(lambda: la.fit([(a_i, a_t)]), "curvature factor A_image contains NaN")


def test_overflowing_logit_scale_is_a_value_error_not_exit():
    # exp(1000) = inf: softmax weights and the curvature are NaN
    kw, a_i, a_t = make_problem(bias=False)
    la = DualEncoderLaplace(**{**kw, "logit_scale": 1000.0})
    raises_value_error(lambda: la.fit(loader(a_i, a_t)), "NaN or inf")


# ----------------------------------------------------------------- the public API, one table
class Ctx:
    """What the hostile calls need, built once in float64: a fitted posterior and friends."""

    def __init__(self) -> None:
        self.kw, a_i, a_t = make_problem(bias=False)
        self.la = DualEncoderLaplace(**self.kw)
        self.la.fit(loader(a_i, a_t))
        self.x = {"image": a_i[:3], "text": a_t[:4]}
        g = torch.Generator().manual_seed(0)
        self.logits = 3 * torch.randn(6, 4, generator=g)
        self.probs = torch.softmax(self.logits, -1)
        self.labels = torch.tensor([0, 1, 2, 3, 0, 1])
        self.mean, self.var = torch.randn(5, 3, generator=g), torch.rand(5, 3, generator=g)
        self.samples = torch.randn(8, 5, 3, generator=g)
        self.acts = a_i[:5]
        self.classes = a_t[:4]
        self.clf = ZeroShotClassifier(self.la, self.classes)
        self.ranking = rank_scores(torch.randn(4, 6, generator=g), torch.rand(4, 6, generator=g))
        self.targets = torch.tensor([0, 1, 2, 3])
        self.scores = torch.tensor([0.1, 0.4, 0.35, 0.8])
        self.correct = torch.tensor([True, False, True, True])


@pytest.fixture(scope="module")
def ctx():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield Ctx()
    finally:
        torch.set_default_dtype(previous)


def _with(t: torch.Tensor, index, value) -> torch.Tensor:
    t = t.clone()
    t[index] = value
    return t


def _set(obj, name, value):
    setattr(obj, name, value)


def _dual(c, **override):
    return DualEncoderLaplace(**{**c.kw, **override})


def _gridsearch(c, **kw):
    return c.la.optimize_prior_precision(method="gridsearch", **{"grid_size": 2, **kw})


V, T = ValueError, TypeError
# (id, call(ctx), exception type, message fragment); every public entry point with bad input
HOSTILE_CALLS = [
    # prediction: samplers, MC paths, chunk_size, options
    ("mc_zero_samples", lambda c: c.la(c.x, link_approx="mc", n_samples=0), V,
     "n_samples must be an integer >= 1, got 0"),
    ("mc_fractional_samples", lambda c: c.la(c.x, link_approx="mc", n_samples=1.5), T,
     "n_samples must be an integer, got float"),
    ("bool_samples", lambda c: c.la(c.x, link_approx="mc", n_samples=True), T, "the bool"),
    ("chunk_size_str", lambda c: c.la.predictive_moments(c.x, chunk_size="a"), T,
     "chunk_size must be an integer, got str"),
    ("chunk_size_zero", lambda c: c.la.predictive_moments(c.x, chunk_size=0), V,
     "chunk_size must be an integer >= 1"),
    ("moments_pred_type", lambda c: c.la.predictive_moments(c.x, pred_type="mc"), V,
     "pred_type must be one of"),
    ("class_cov_probcosine",
     lambda c: c.la.predictive_moments(c.x, "probcosine", class_covariance=True), V,
     "class_covariance=True needs pred_type='glm'"),
    ("class_cov_str", lambda c: c.la.predictive_moments(c.x, class_covariance="yes"), T,
     "class_covariance must be True or False"),
    ("nn_without_mc", lambda c: c.la(c.x, pred_type="nn"), V, "link_approx='mc'"),
    ("gp_pred_type", lambda c: c.la(c.x, pred_type="gp"), V, "FunctionalLaplace"),
    ("unknown_link_approx", lambda c: c.la(c.x, link_approx="laplace"), V,
     "link_approx must be one of"),
    ("unknown_link", lambda c: c.la(c.x, link="relu"), V, "link must be one of"),
    ("map_unknown_link_approx", lambda c: c.la(c.x, pred_type="map", link_approx="foo"), V,
     "link_approx must be one of"),
    ("joint", lambda c: c.la(c.x, joint=True), V, "joint=True is only defined for regression"),
    ("joint_str", lambda c: c.la(c.x, joint="no"), T, "joint must be True or False"),
    ("generator_int", lambda c: c.la(c.x, link_approx="mc", generator=0), T,
     "generator must be a torch.Generator"),
    ("diagonal_output_probit", lambda c: c.la(c.x, diagonal_output=True), V,
     "diagonal_output=True needs pred_type='glm' and link_approx='mc'"),
    ("model_kwargs", lambda c: c.la(c.x, foo=1), V, "unexpected arguments ['foo']"),
    ("bridge_sigmoid", lambda c: c.la(c.x, link_approx="bridge", link="sigmoid"), V,
     "softmax link"),
    ("samples_of_map", lambda c: c.la.functional_samples(c.x, "map"), V, "no samples"),
    ("samples_diag_nn", lambda c: c.la.functional_samples(c.x, "nn", diagonal_output=True), V,
     "diagonal_output=True needs pred_type='glm'"),
    ("samples_negative", lambda c: c.la.functional_samples(c.x, n_samples=-3), V,
     "n_samples must be an integer >= 1, got -3"),
    ("predictive_samples_link", lambda c: c.la.predictive_samples(c.x, link="tanh"), V,
     "link must be one of"),
    ("embedding_full_str", lambda c: c.la.embedding_moments(c.x, full="yes"), T,
     "full must be True or False"),
    # prediction inputs
    ("residual_rows", lambda c: c.la({**c.x, "image_residual": torch.randn(2, D)}), V,
     "residual must have 3 rows"),
    ("text_width", lambda c: c.la({**c.x, "text": c.x["text"][:, :2]}), V, r"\(N, 5\)"),
    ("zero_norm_text", lambda c: c.la({**c.x, "text": torch.zeros(4, D_TXT)}), V, "zero-norm"),
    ("nan_image", lambda c: c.la({**c.x, "image": c.x["image"] * NAN}), V, "contains NaN or inf"),
    ("no_image_key", lambda c: c.la({"text": c.x["text"]}), V, "keys 'image' and 'text'"),
    ("three_tuple", lambda c: c.la((c.x["image"], c.x["text"], c.x["text"])), V,
     "fit batch (image, text)"),
    ("list_rows", lambda c: c.la.predictive_moments([[0.0] * D_IMG] * 2), T,
     "x['image'] must be a torch.Tensor, got list"),
    # laplace's keywords and attributes
    ("dict_key_x_default", lambda c: _dual(c, dict_key_x="input_ids"), V,
     "dict_key_x='input_ids' is not supported"),
    ("backend_kwargs", lambda c: _dual(c, backend_kwargs={}), V, "backend_kwargs={} is not"),
    ("dict_key_y_int", lambda c: _dual(c, dict_key_y=3), T, "dict_key_y must be a str"),
    ("ctor_chunk_size", lambda c: _dual(c, chunk_size="a"), T, "chunk_size must be an integer"),
    ("ctor_joint_bias", lambda c: _dual(c, joint_bias="yes"), T,
     "joint_bias must be True or False"),
    ("ctor_enable_backprop", lambda c: _dual(c, enable_backprop="yes"), T,
     "enable_backprop must be True or False"),
    ("ctor_damping", lambda c: _dual(c, damping="full"), V, "damping must be False, True or"),
    ("ctor_regression", lambda c: DualEncoderLaplace(None, "regression", **c.kw), V,
     "likelihood='classification'"),
    ("ctor_prior_mean_nan", lambda c: _dual(c, prior_mean=NAN), V, "prior_mean contains NaN"),
    ("ctor_temperature_str", lambda c: _dual(c, temperature="a"), T,
     "temperature must be a real number or tensor, got str"),
    ("ctor_prior_str", lambda c: _dual(c, prior_precision="a"), T,
     "prior_precision must be a real number or tensor"),
    ("ctor_logit_bias_str", lambda c: _dual(c, logit_bias="x"), T,
     "logit_bias must be a real number or tensor"),
    ("ctor_sigma_noise", lambda c: _dual(c, sigma_noise=2.0), V,
     "Sigma noise != 1 only available for regression"),
    ("fit_override_str", lambda c: c.la.fit([], override="no"), T,
     "override must be True or False"),
    ("fit_checkpoint_every", lambda c: c.la.fit([], checkpoint_every=0), V,
     "checkpoint_every must be an integer >= 1"),
    ("save_overwrite_str", lambda c: c.la.save("unused.safetensors", overwrite="yes"), T,
     "overwrite must be True or False"),
    ("bayesvlm_pseudo_count", lambda c: DualEncoderLaplace.from_bayesvlm(".", pseudo_count=0),
     V, "pseudo_count must be positive"),
    ("zeroshot_batch_size",
     lambda c: class_text_activations(None, None, ["cat"], ["a {}"], batch_size=0), V,
     "batch_size must be an integer >= 1"),
    ("set_n_outputs", lambda c: _set(c.la, "n_outputs", 7), V,
     "n_outputs is the number of classes"),
    ("set_prior", lambda c: _set(c.la, "prior_precision", -1.0), V,
     "prior_precision must be positive"),
    ("set_temperature", lambda c: _set(c.la, "temperature", 0.0), V,
     "temperature must be positive"),
    ("tuning_method", lambda c: c.la.optimize_prior_precision(method="adam"), V,
     "method must be one of ('marglik', 'gridsearch')"),
    ("gridsearch_no_loader", lambda c: c.la.optimize_prior_precision(method="gridsearch"), V,
     "val_loader"),
    ("n_steps_float", lambda c: c.la.optimize_prior_precision(n_steps=2.5), T,
     "n_steps must be an integer"),
    ("prior_structure_diag", lambda c: c.la.optimize_prior_precision(prior_structure="diag"),
     V, "cannot be held by a Kronecker posterior"),
    ("gridsearch_loss", lambda c: _gridsearch(c, val_loader=[(c.x, c.labels[:3])], loss=3), T,
     "loss must be callable"),
    ("gridsearch_dict_without_labels",
     lambda c: _gridsearch(c, val_loader=[{"image": c.acts, "text": c.classes}]), V,
     "dict_key_y='labels'"),
    ("gridsearch_grid_size", lambda c: _gridsearch(c, val_loader=[(c.x, c.labels[:3])],
                                                   grid_size=0), V, "grid_size"),  # noqa: E131
    ("marglik_max_iter", lambda c: maximize_marglik(c.la, max_iter=0), V,
     "max_iter must be an integer >= 1"),
    ("marglik_budget", lambda c: maximize_marglik(c.la, budget="y"), T,
     "budget must be True or False"),
    ("pseudo_count_grid",
     lambda c: select_pseudo_count(c.la, c.x, c.labels[:3], {"pc": {}}, (0.0, 1.0)), V,
     "pseudo_counts must be positive numbers"),
    ("tune_prior_pseudo_count_text", lambda c: tune_prior_at(c.la, "ten"), T,
     "pseudo_count must be a real number"),
    ("tune_prior_pseudo_count_zero", lambda c: tune_prior_at(c.la, 0.0), V,
     "pseudo_count must be positive"),
    ("pseudo_count_no_predictives",
     lambda c: select_pseudo_count(c.la, c.x, c.labels[:3], {}, (1.0,)), V,
     "predictives must name at least one"),
    # metrics
    ("nlpd_logits", lambda c: nlpd(c.logits, c.labels), V, "probs must be probabilities"),
    ("ece_logits", lambda c: ece(c.logits, c.labels), V, "from_logits=True"),
    ("nlpd_nan", lambda c: nlpd(_with(c.probs, (0, 0), NAN), c.labels), V,
     "probs contains NaN or inf"),
    ("accuracy_empty", lambda c: accuracy(torch.ones(0, 3), torch.zeros(0, dtype=torch.long)),
     V, "probs is empty"),
    ("nlpd_float_labels", lambda c: nlpd(c.probs, c.labels + 0.7), T,
     "labels must be an integer tensor"),
    ("brier_label_range", lambda c: brier(c.probs, _with(c.labels, 0, 4)), V,
     "labels must lie in [0, 4)"),
    ("ece_bins", lambda c: ece(c.probs, c.labels, n_bins=0), V, "n_bins must be an integer >= 1"),
    ("metrics_from_logits_str",
     lambda c: classification_metrics(c.logits, c.labels, from_logits="yes"), T,
     "from_logits must be True or False"),
    ("nlpd_list", lambda c: nlpd(c.probs.tolist(), c.labels), T, "probs must be a torch.Tensor"),
    ("labels_shape", lambda c: accuracy(c.probs, c.labels[:5]), V, r"labels must have shape \(6,\)"),
    # temperature scaling
    ("ts_empty", lambda c: TemperatureScaling().fit(torch.ones(0, 3),
                                                    torch.zeros(0, dtype=torch.long)), V,
     "logits is empty"),  # noqa: E131
    ("ts_nan", lambda c: TemperatureScaling().fit(c.logits * NAN, c.labels), V,
     "logits contains NaN or inf"),
    ("ts_label_range", lambda c: TemperatureScaling().fit(c.logits, c.labels + 4), V,
     "labels must lie in [0, 4)"),
    ("ts_float_labels", lambda c: TemperatureScaling().fit(c.logits, c.labels.double()), T,
     "labels must be an integer tensor"),
    ("ts_max_iter", lambda c: TemperatureScaling(max_iter=0), V, "max_iter must be an integer"),
    ("ts_call_nan", lambda c: TemperatureScaling()(c.logits * NAN), V, "logits contains NaN"),
    # links, samplers, uncertainty
    ("sample_logits_zero", lambda c: sample_logits(c.mean, c.var, 0), V,
     "n_samples must be an integer >= 1"),
    ("sample_logits_negative_var", lambda c: sample_logits(c.mean, -c.var), V,
     "var must be non-negative"),
    ("sample_logits_nan_mean", lambda c: sample_logits(c.mean * NAN, c.var), V,
     "mean contains NaN"),
    ("sample_logits_seed", lambda c: sample_logits(c.mean, c.var, 4, 1.5), T,
     "generator (a seed) must be an integer"),
    ("bridge_cov_shape", lambda c: laplace_bridge(c.mean, c.var), V, "cov must be (N, C, C)"),
    ("bald_nan", lambda c: bald_from_samples(c.samples * NAN), V, "samples contains NaN"),
    ("epig_axes", lambda c: epig_from_samples(c.samples, c.samples[:3]), V,
     "share the sample axis"),
    ("entropy_link", lambda c: predictive_entropy(c.mean, c.var, link_approx="bridge"), V,
     "link_approx must be 'probit' or 'mc'"),
    # zero-shot
    ("zeroshot_list", lambda c: ZeroShotClassifier(c.la, c.classes.tolist()), T,
     "class_activations must be a torch.Tensor"),
    ("zeroshot_not_la", lambda c: ZeroShotClassifier(object(), c.classes), T,
     "la must be a fitted DualEncoderLaplace"),
    ("zeroshot_residual_rows",
     lambda c: ZeroShotClassifier(c.la, c.classes, class_residual=torch.randn(5, D)), V,
     "class_residual must have 4 rows"),
    ("zeroshot_map_link", lambda c: c.clf.predict(c.acts, pred_type="map", link_approx="foo"),
     V, "link_approx must be one of"),
    ("zeroshot_samples", lambda c: c.clf.predict(c.acts, n_samples=0), V,
     "n_samples must be an integer >= 1"),
    ("zeroshot_nn", lambda c: c.clf.predict(c.acts, pred_type="nn"), V, "link_approx='mc'"),
    # retrieval
    ("recall_ks", lambda c: recall_at_k(c.ranking, c.targets, ks=(0, -1)), V,
     "ks[0] must be an integer >= 1, got 0"),
    ("recall_ks_float", lambda c: recall_at_k(c.ranking, c.targets, ks=(1.5,)), T,
     "ks[0] must be an integer"),
    ("recall_float_ranking", lambda c: recall_at_k(c.ranking.mean, c.targets), T,
     "ranking must be a Ranking"),
    ("rank_direction", lambda c: rank(c.la, c.acts, c.classes, direction="sideways"), V,
     "direction must be one of"),
    ("rank_pred_type", lambda c: rank(c.la, c.acts, c.classes, pred_type="nn"), V,
     "pred_type must be one of"),
    ("rank_scores_shape", lambda c: rank_scores(torch.zeros(2, 3), torch.zeros(3, 2)), V,
     "mean and var"),
    ("rank_scores_nan", lambda c: rank_scores(torch.full((2, 3), NAN), torch.zeros(2, 3)), V,
     "mean contains NaN"),
    ("relevance_float", lambda c: relevance_matrix(torch.tensor([0.5, 1.0]), 3), T,
     "targets must be integer gallery indices"),
    # detection, selective prediction, acquisition
    ("fpr_tpr_str", lambda c: fpr_at_tpr(c.scores, c.scores, tpr="0.95"), V,
     "tpr must be a number in (0, 1]"),
    ("auroc_nan", lambda c: detection_auroc(c.scores, c.scores * NAN), V,
     "score_neg must be finite"),
    ("mcm_nan_temperature", lambda c: mcm(c.probs, temperature=NAN), V,
     "temperature must be a finite number > 0"),
    ("failure_all_correct", lambda c: failure_auroc(c.scores, torch.ones(4, dtype=torch.bool)),
     V, "needs both correct and misclassified"),
    ("aurc_not_binary", lambda c: aurc(c.scores, torch.tensor([0, 1, 2, 1])), V, "0/1"),
    ("acquisition_nan_mean", lambda c: acquisition_scores("entropy", c.mean * NAN, c.var), V,
     "mean contains NaN"),
    ("acquisition_nan_var", lambda c: acquisition_scores("logit_variance", c.mean, c.var * NAN),
     V, "var contains NaN"),
    ("acquisition_nan_samples", lambda c: acquisition_scores("bald", samples=c.samples * NAN),
     V, "samples contains NaN"),
]  # fmt: skip


@pytest.mark.parametrize("call, error, match", [c[1:] for c in HOSTILE_CALLS],
                         ids=[c[0] for c in HOSTILE_CALLS])  # fmt: skip
def test_hostile_calls_raise_a_named_error(ctx, call, error, match):
    """Each hostile call raises exactly ``error`` (not a subclass such as a raw torch error
    that happens to be a TypeError), with a message that names the argument."""
    with pytest.raises(error, match=re.escape(match) if "\\" not in match else match) as info:
        call(ctx)
    assert type(info.value) is error, info.value


def test_the_hostile_table_is_large_and_fits_laplace_conventions(ctx):
    assert len(HOSTILE_CALLS) >= 40
    assert len({c[0] for c in HOSTILE_CALLS}) == len(HOSTILE_CALLS)
    # the table's calls left the shared posterior as it was
    torch.testing.assert_close(ctx.la.prior_precision, torch.ones(1))
    assert ctx.la.temperature == 1.0 and ctx.la.n_outputs == 0


def test_predict_before_fit():
    kw, a_i, a_t = make_problem(bias=False)
    with pytest.raises(AttributeError, match="not fitted"):
        DualEncoderLaplace(**kw).predictive_moments({"image": a_i[:2], "text": a_t[:2]})


# ----------------------------------------------------------------- files
class Malicious:
    """Unpickling this writes a marker file: proof that a loader ran pickle."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def saved(tmp_path):
    la, _, _ = fitted()
    path = tmp_path / "posterior.safetensors"
    la.save(str(path))
    return la, path


def _broken_file(kind: str, tmp_path, saved_path):
    path = tmp_path / f"{kind}.bin"
    if kind == "truncated":
        data = saved_path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "header_only":
        path.write_bytes(saved_path.read_bytes()[:20])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "random":
        noise = torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0))
        path.write_bytes(noise.to(torch.uint8).numpy().tobytes())
    elif kind == "foreign_safetensors":
        save_file({"weight": torch.randn(3, 3)}, str(path), metadata={"format": "pt"})
    return path


@pytest.mark.parametrize(
    "kind, match",
    [
        ("truncated", "not a readable safetensors file"),
        ("header_only", "not a readable safetensors file"),
        ("empty", "not a readable safetensors file"),
        ("random", "not a readable safetensors file"),
        ("foreign_safetensors", "not a laplace-vlm posterior"),
    ],
)
def test_broken_files_are_refused(saved, tmp_path, kind, match):
    _, path = saved
    with pytest.raises(ValueError, match=match):
        DualEncoderLaplace.load(str(_broken_file(kind, tmp_path, path)))


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_pickles_are_refused_and_never_unpickled(tmp_path, writer):
    marker = tmp_path / "pwned"
    payload = {"H": Malicious(str(marker))}
    path = tmp_path / "posterior.pt"
    if writer == "pickle":
        path.write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, str(path))
    # the payload is live: plain pickle would write the marker
    pickle.loads(pickle.dumps(Malicious(str(tmp_path / "control"))))
    assert (tmp_path / "control").exists()
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        DualEncoderLaplace.load(str(path))
    assert not marker.exists()


def test_a_file_saved_for_another_model_is_refused(tmp_path):
    model = tiny_clip(seed=0)
    la = DualEncoderLaplace(model)
    g = torch.Generator().manual_seed(0)
    d_img = la.heads.image_projection.in_features
    d_txt = la.heads.text_projection.in_features
    # float (N, d) tensors are pre-projection activations, also in model mode
    la.fit([(torch.randn(16, d_img, generator=g), torch.randn(16, d_txt, generator=g))])
    path = tmp_path / "clip.safetensors"
    la.save(str(path))
    assert DualEncoderLaplace.load(str(path), model=model).n_data == 16  # its own model loads
    for other in (tiny_clip(seed=1), tiny_clip(embed_dim=16, seed=0)):
        with pytest.raises(ValueError, match="other projection heads"):
            DualEncoderLaplace.load(str(path), model=other)


def test_save_refuses_to_overwrite(saved, tmp_path):
    la, path = saved
    before = path.read_bytes()
    other, _, _ = fitted(prior_precision=5.0)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        other.save(str(path))
    assert path.read_bytes() == before
    other.save(str(path), overwrite=True)
    torch.testing.assert_close(DualEncoderLaplace.load(str(path)).prior_precision,
                               other.prior_precision)  # fmt: skip
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]  # no temp file left


def _tampered(saved_path, tmp_path, tensors=None, state=None):
    with safe_open(str(saved_path), framework="pt") as f:
        meta, tens = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    tens.update(tensors or {})
    tens = {k: v for k, v in tens.items() if v is not None}
    structure = json.loads(meta["state"])
    structure.update(state or {})
    meta["state"] = json.dumps({k: v for k, v in structure.items() if v is not None})
    path = tmp_path / "tampered.safetensors"
    save_file(tens, str(path), metadata=meta)
    return path


@pytest.mark.parametrize(
    "tensors, state, match",
    [
        ({"H.0.0": torch.full((D, D), NAN)}, None, "NaN or inf"),
        ({"H.0.1": None}, None, "H.0.1"),
        ({"H.0.0": torch.eye(D + 1)}, None, "shape"),
        ({"prior_precision": torch.tensor([-1.0])}, None, "prior_precision"),
        (None, {"H": None}, r"lacks \['H'\]"),
        (None, {"n_data": "many"}, "n_data"),
    ],
    ids=[
        "nan_factor",
        "missing_factor",
        "wrong_shape",
        "negative_prior",
        "no_layout",
        "bad_n_data",
    ],  # fmt: skip
)
def test_tampered_posterior_files_are_refused(saved, tmp_path, tensors, state, match):
    _, path = saved
    bad = _tampered(path, tmp_path, tensors, state)
    raises_value_error(lambda: DualEncoderLaplace.load(str(bad)), match)


@pytest.mark.parametrize("shape", [(0, 3), (4, 0)])
def test_scores_of_no_inputs_or_no_classes_are_refused_by_name(shape):
    from laplace_vlm.evaluation.conformal import SplitConformal
    from laplace_vlm.evaluation.detection import expected_logit_variance, msp

    empty = torch.ones(shape) / max(shape[1], 1)
    for name, call in [("probs", lambda: msp(empty)), ("var", lambda: expected_logit_variance(empty)),
                       ("probs", lambda: SplitConformal("lac").scores(empty))]:  # fmt: skip
        with pytest.raises(ValueError, match=re.escape(f"{name} is empty, got shape {shape}")):
            call()
