"""Pseudo-count selection against a loop written here from independent parts: the prior at
each ``n`` by a derivative-free search of laplace's evidence, the predictive from the dense
posterior, the NLPD in numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from brute_force import bracketed_argmax
from test_dual_encoder_laplace import loader, make_problem
from test_properties import reference_moments

from laplace_vlm import DualEncoderLaplace
from laplace_vlm.evaluation.pseudo_count import select_pseudo_count

pytestmark = pytest.mark.usefixtures("float64")


def _reference_nlpd(la, x, labels, pred_type: str) -> float:
    """probit of the dense-posterior moments, scored in numpy."""
    mean, cov = reference_moments(la, x, pred_type)
    kappa = 1 / torch.sqrt(1 + torch.pi / 8 * cov.diagonal(dim1=1, dim2=2))
    p = torch.softmax(kappa * mean, -1).numpy()
    return float(-np.log(p[np.arange(len(labels)), labels.numpy()]).mean())


def test_select_pseudo_count_is_the_argmin_of_an_independent_loop():
    kw, a_i, a_t = make_problem(False, seed=3)
    la = DualEncoderLaplace(**kw)
    la.fit(loader(a_i, a_t))
    labels = torch.arange(len(a_i)) % 5
    x = {"image": a_i, "text": a_t[:5]}
    grid = (1.0, 30.0, 1000.0)
    predictives = {"pc": {"pred_type": "probcosine"}, "glm": {"pred_type": "glm"}}
    choice = select_pseudo_count(la, x, labels, predictives, grid)
    priors = {}
    for n in grid:  # the evidence optimum at each n, whatever the predictive
        la.temperature = 1 / n

        def evidence(t):
            return la.log_marginal_likelihood(prior_precision=t.exp()).item()

        t, _, inside = bracketed_argmax(evidence, la.n_layers)  # layerwise: one per tensor
        assert inside  # an interior optimum of the evidence, not the search's edge
        priors[n] = t.exp()
    for name, kwargs in predictives.items():
        expected = {}
        for n in grid:
            la.temperature, la.prior_precision = 1 / n, priors[n]
            expected[n] = _reference_nlpd(la, x, labels, kwargs["pred_type"])
        assert choice[name].nlpd_by_pseudo_count == pytest.approx(expected, rel=1e-5)
        assert max(expected.values()) - min(expected.values()) > 1e-3  # the grid does decide
        best = min(expected, key=expected.get)
        assert choice[name].setting.pseudo_count == best
        torch.testing.assert_close(choice[name].setting.prior_precision, priors[best], rtol=1e-5,
                                   atol=0)  # fmt: skip


def test_tune_prior_at_keeps_the_pseudo_count_exactly():
    from laplace_vlm.evaluation.pseudo_count import tune_prior_at

    kw, a_i, a_t = make_problem(False, seed=1)
    la = DualEncoderLaplace(**kw)
    la.fit(loader(a_i, a_t))
    setting = tune_prior_at(la, 0.03)  # not representable in float32
    assert setting.pseudo_count == 0.03 and la.temperature == 1 / 0.03


def test_tune_priors_at_equals_tune_prior_at_one_by_one():
    """The batched grid against the one-at-a-time loop; an overriding class is called per n."""
    from laplace_vlm.evaluation.pseudo_count import tune_prior_at, tune_priors_at

    kw, a_i, a_t = make_problem(False, seed=2)
    grid = (0.03, 1.0, 300.0, 1e5)
    la = DualEncoderLaplace(**kw)
    la.fit(loader(a_i, a_t))
    batched = tune_priors_at(la, grid)
    assert la.temperature == 1 / grid[-1]
    for n, setting in zip(grid, batched):
        alone = tune_prior_at(la, n)
        assert setting.pseudo_count == n == alone.pseudo_count
        torch.testing.assert_close(setting.prior_precision, alone.prior_precision, rtol=1e-12,
                                   atol=0)  # fmt: skip
    assert len({tuple(s.prior_precision.tolist()) for s in batched}) == len(grid)

    calls = []

    class Own(DualEncoderLaplace):
        def optimize_prior_precision(self, *args, **kwargs):
            calls.append(self.temperature)
            super().optimize_prior_precision(*args, **kwargs)

    own = Own(**kw)
    own.fit(loader(a_i, a_t))
    for mine, setting in zip(tune_priors_at(own, grid), batched):
        torch.testing.assert_close(mine.prior_precision, setting.prior_precision, rtol=1e-12,
                                   atol=0)  # fmt: skip
    assert calls == [1 / n for n in grid]
    with pytest.raises(ValueError, match="pseudo_count"):
        tune_priors_at(la, (1.0, -2.0))
