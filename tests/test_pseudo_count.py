"""Pseudo-count selection against an independent loop over the grid."""

from __future__ import annotations

import pytest
import torch
from test_dual_encoder_laplace import loader, make_problem

from laplace_vlm import DualEncoderLaplace
from laplace_vlm.evaluation.pseudo_count import select_pseudo_count


def test_select_pseudo_count_is_the_argmin_of_validation_nlpd():
    kw, a_i, a_t = make_problem(False, seed=3)
    la = DualEncoderLaplace(**kw)
    la.fit(loader(a_i, a_t))
    labels = torch.arange(len(a_i)) % 5
    x = {"image": a_i, "text": a_t[:5]}
    grid = (1.0, 30.0, 1000.0)
    predictives = {"pc": {"pred_type": "probcosine"}, "glm": {"pred_type": "glm"}}
    choice = select_pseudo_count(la, x, labels, predictives, grid)
    for name, kwargs in predictives.items():
        expected = {}
        for n in grid:  # independent: tune, predict, score by hand
            la.temperature, la.prior_precision = 1 / n, 1.0
            la.optimize_prior_precision(method="marglik", prior_structure="layerwise")
            probs = la(x, **kwargs)
            expected[n] = -probs[torch.arange(len(labels)), labels].log().mean().item()
        assert choice[name].nlpd_by_pseudo_count == pytest.approx(expected, rel=1e-6)
        best = min(expected, key=expected.get)
        assert choice[name].setting.pseudo_count == best
    with pytest.raises(ValueError, match="pseudo_counts"):
        select_pseudo_count(la, x, labels, predictives, (0.0, 1.0))
    with pytest.raises(ValueError, match="predictives"):
        select_pseudo_count(la, x, labels, {}, grid)
