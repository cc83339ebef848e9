"""Property tests (hypothesis) of the predictive over random small problems, in float64."""

from __future__ import annotations

import contextlib

import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from test_dual_encoder_laplace import loader, make_problem

from laplace_vlm import DualEncoderLaplace

METHODS = ("glm", "probcosine", "probcosine_diag")
# every valid (pred_type, link_approx) pair with the softmax link ('nn' samples only)
PRED_LINKS = [(p, link) for p in ("glm", "probcosine", "probcosine_diag", "map")
              for link in ("probit", "mc", "bridge", "bridge_norm")] + [("nn", "mc")]  # fmt: skip
PROPERTY_SETTINGS = settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,  # the same examples on every run: a failure always reproduces
)


def problem_strategy(prior_min: float = 1e-2, prior_max: float = 1e2):
    return st.fixed_dictionaries(
        {
            "seed": st.integers(0, 10_000),
            "contrastive": st.sampled_from(["clip", "siglip"]),
            "bias": st.booleans(),
            "damping": st.booleans(),
            "prior": st.floats(prior_min, prior_max),
            "temperature": st.floats(1e-2, 10.0),
        }
    )


problems = problem_strategy()


@contextlib.contextmanager
def float64():
    # hypothesis runs many examples per test call: a function-scoped fixture would not reset
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build(p: dict) -> tuple[DualEncoderLaplace, dict[str, torch.Tensor]]:
    kw, a_i, a_t = make_problem(p["bias"], seed=p["seed"], n=16, contrastive=p["contrastive"])
    la = DualEncoderLaplace(**kw, damping=p["damping"], prior_precision=p["prior"],
                            temperature=p["temperature"])  # fmt: skip
    la.fit(loader(a_i, a_t))
    return la, {"image": a_i[:5], "text": a_t[:7]}


@given(problems)
@PROPERTY_SETTINGS
def test_variances_are_finite_and_non_negative(p):
    with float64():
        la, x = build(p)
        for method in METHODS:
            mean, var = la.predictive_moments(x, pred_type=method)
            assert torch.isfinite(mean).all() and torch.isfinite(var).all(), method
            assert (var >= 0).all(), (method, var.min())
        _, cov = la.predictive_moments(x, pred_type="glm", class_covariance=True)
        # a covariance over classes: symmetric positive semi-definite (up to rounding)
        torch.testing.assert_close(cov, cov.transpose(1, 2))
        eig = torch.linalg.eigvalsh(cov)
        assert (eig >= -1e-10 * eig.abs().max()).all()


@given(problems, st.integers(0, 2**31 - 1))
@PROPERTY_SETTINGS
def test_probabilities_are_distributions_for_every_pred_type_and_link(p, sample_seed):
    with float64():
        la, x = build(p)
        for pred_type, link_approx in PRED_LINKS:
            g = torch.Generator().manual_seed(sample_seed)
            probs = la(x, pred_type=pred_type, link_approx=link_approx, n_samples=16,
                       generator=g)  # fmt: skip
            where = (pred_type, link_approx)
            assert probs.shape == (5, 7), where
            assert torch.isfinite(probs).all(), where
            assert (probs >= 0).all() and (probs <= 1).all(), where
            torch.testing.assert_close(probs.sum(-1), torch.ones(5), msg=lambda m: f"{where}: {m}")


def _relative_spread(la, x) -> float:
    """``max tr Cov[z] / |E z|^2`` over the images and texts of ``x``."""
    moments = la.embedding_moments(x)
    return max((var.sum(-1) / mean.square().sum(-1)).max().item() for mean, var in moments.values())


@contextlib.contextmanager
def more_precision(la, p: dict, factor: float, prior: bool):
    """Prior precision, or the pseudo-count ``n = 1 / temperature``, times ``factor``."""
    name, value = ("prior_precision", p["prior"] * factor) if prior else (
        "temperature", p["temperature"] / factor)  # fmt: skip
    old = getattr(la, name)
    setattr(la, name, value)
    try:
        yield
    finally:
        setattr(la, name, old)


def assert_variance_shrinks(la, x, p, method: str, factor: float, prior: bool) -> None:
    before = la.predictive_moments(x, pred_type=method)[1]
    with more_precision(la, p, factor, prior):
        after = la.predictive_moments(x, pred_type=method)[1]
    # relative slack for rounding only: more precision never adds variance
    assert (after <= before * (1 + 1e-9) + 1e-15).all(), (method, p, (after - before).max())
    assert (after < before).any(), method  # and the change is visible


@given(problem_strategy(1e-4, 1e3), st.floats(1.5, 100.0), st.booleans())
@PROPERTY_SETTINGS
def test_glm_variance_shrinks_as_prior_precision_or_pseudo_count_grows(p, factor, prior):
    # J Sigma J^T with Sigma = (h GGN + delta)^-1: decreasing in h and delta (Loewner order),
    # whatever the prior
    with float64():
        la, x = build(p)
        assert_variance_shrinks(la, x, p, "glm", factor, prior)


@given(problems, st.floats(1.5, 100.0), st.booleans())
@PROPERTY_SETTINGS
def test_probcosine_variance_shrinks_while_the_posterior_is_concentrated(p, factor, prior):
    """ProbCosine divides ``Var[z^T t]`` (monotone in the covariances) by
    ``E|z|^2 E|t|^2 = (|mu_z|^2 + tr C_z)(|mu_t|^2 + tr C_t)``, which shrinks with them: the
    ratio is monotone only while ``tr C`` is small against ``|mu|^2``. In 400 random trials
    no violation had a relative spread below 0.5 and weak priors above it gave violations;
    the property is asserted where the spread is below 0.25.
    """
    with float64():
        la, x = build(p)
        assume(_relative_spread(la, x) < 0.25)
        assert_variance_shrinks(la, x, p, "probcosine", factor, prior)
