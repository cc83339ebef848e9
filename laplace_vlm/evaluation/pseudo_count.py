"""Choosing the pseudo-count ``n`` (laplace's ``temperature = 1 / n``) on validation NLPD.

At every ``n`` on a grid the prior precision is re-optimised by the marginal likelihood, each
named predictive is scored by its NLPD on labelled validation data, and the setting of
lowest NLPD is kept per predictive. The one recipe for the demos, the benchmark and active
learning.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from laplace_vlm.dual_encoder_laplace.prior_tuning import PriorTuningMixin
from laplace_vlm.evaluation.metrics import nlpd
from laplace_vlm.posterior.marglik import maximize_marglik_at_temperatures
from laplace_vlm.validation import check_positive

PSEUDO_COUNTS: tuple[float, ...] = (
    (1e-4, 1e-3) + tuple(float(f"{m}e{e}") for e in range(-2, 6) for m in (1, 3)) + (1e6,)
)
"""The default grid: decades from 10^-4 to 0.01, then half-decades to 10^6. Wide enough that
the pseudo-count chosen for the paper's form lies inside it on both stand-ins;
:attr:`PseudoCountChoice.at_edge` says when a choice does not."""


@dataclass
class PosteriorSetting:
    """Posterior hyperparameters: the pseudo-count and the prior precision tuned at it.

    Attributes
    ----------
    pseudo_count : float
        the pseudo-data count ``n`` (temperature ``1 / n``).
    prior_precision : torch.Tensor
        the prior precision tuned at ``pseudo_count``.
    """

    pseudo_count: float
    prior_precision: torch.Tensor

    def apply(self, la: Any) -> None:
        """Set ``la``'s temperature and prior precision to this setting.

        Parameters
        ----------
        la : DualEncoderLaplace
            the posterior, changed in place (the prior precision is copied).
        """
        la.temperature = 1.0 / self.pseudo_count
        la.prior_precision = self.prior_precision.clone()


@dataclass
class PseudoCountChoice:
    """The chosen setting of one predictive and the validation NLPD at every pseudo-count.

    Attributes
    ----------
    setting : PosteriorSetting
        the setting of lowest validation NLPD.
    nlpd_by_pseudo_count : dict of float to float
        validation NLPD at every grid point.
    """

    setting: PosteriorSetting
    nlpd_by_pseudo_count: dict[float, float]

    @property
    def at_edge(self) -> bool:
        """Whether the chosen pseudo-count is the smallest or largest of the grid."""
        grid = self.nlpd_by_pseudo_count
        return self.setting.pseudo_count in (min(grid), max(grid))


def tune_prior_at(la: Any, pseudo_count: float, prior_structure: str = "layerwise"):
    """Set ``temperature = 1 / pseudo_count`` and the marginal-likelihood prior precision.

    The prior precision is reset to 1 before it is optimised.

    Parameters
    ----------
    la : DualEncoderLaplace
        a fitted posterior, changed in place.
    pseudo_count : float
        the pseudo-data count ``n`` (> 0).
    prior_structure : str, default="layerwise"
        ``prior_structure`` of ``la.optimize_prior_precision``.

    Returns
    -------
    PosteriorSetting
        what ``la`` now holds.
    """
    check_positive("pseudo_count", pseudo_count)
    pseudo_count = float(pseudo_count)  # not the float32 tensor the check returns
    la.temperature, la.prior_precision = 1.0 / pseudo_count, 1.0
    la.optimize_prior_precision(method="marglik", prior_structure=prior_structure)
    return PosteriorSetting(float(pseudo_count), la.prior_precision.detach().clone())


def tune_priors_at(la: Any, pseudo_counts: Sequence[float],
                   prior_structure: str = "layerwise") -> list[PosteriorSetting]:  # fmt: skip
    """:func:`tune_prior_at` at every pseudo-count of a grid, in one batched optimisation.

    The marginal-likelihood optima at all ``n`` advance together
    (:func:`~laplace_vlm.posterior.marglik.maximize_marglik_at_temperatures`, from prior
    precision 1 with ``optimize_prior_precision``'s budget), equal to :func:`tune_prior_at`'s
    one by one. A class that overrides ``optimize_prior_precision`` is tuned by it, one ``n``
    at a time.

    Parameters
    ----------
    la : DualEncoderLaplace
        a fitted posterior; left at the last pseudo-count and its prior precision.
    pseudo_counts : sequence of float
        the pseudo-data counts ``n`` (> 0).
    prior_structure : str, default="layerwise"
        ``prior_structure`` of the marginal-likelihood tuning.

    Returns
    -------
    list of PosteriorSetting
        one per pseudo-count, in order.
    """
    for n in pseudo_counts:
        check_positive("pseudo_count", n)
    counts = [float(n) for n in pseudo_counts]  # not the float32 tensors the check returns
    if type(la).optimize_prior_precision is not PriorTuningMixin.optimize_prior_precision:
        return [tune_prior_at(la, n, prior_structure) for n in counts]
    la.prior_precision = 1.0
    priors = maximize_marglik_at_temperatures(la, [1.0 / n for n in counts], prior_structure,
                                              budget=True)  # fmt: skip
    settings = []
    for n, prior in zip(counts, priors):  # the prior as la's setter holds it
        la.temperature, la.prior_precision = 1.0 / n, prior
        settings.append(PosteriorSetting(n, la.prior_precision.detach().clone()))
    return settings


def select_pseudo_count(
    la: Any,
    x_val: Any,
    labels_val: torch.Tensor,
    predictives: Mapping[str, Mapping[str, Any]],
    pseudo_counts: Sequence[float] = PSEUDO_COUNTS,
    prior_structure: str = "layerwise",
) -> dict[str, PseudoCountChoice]:
    """Per named predictive, the pseudo-count of lowest validation NLPD.

    Parameters
    ----------
    la : DualEncoderLaplace
        a fitted posterior; left at the last grid point (apply a chosen setting to use it).
    x_val : dict or torch.Tensor
        validation inputs of ``la(x_val, ...)``: ``{"image": (M, d_img), "text": (C, d_txt)}``
        or images scored against ``la.set_classes``.
    labels_val : torch.Tensor
        `(M,)` class labels.
    predictives : mapping of str to mapping
        name -> keyword arguments of ``la(x, **kwargs)``, e.g.
        ``{"laplace_probcosine": {"pred_type": "probcosine"}}``.
    pseudo_counts : sequence of float, default=PSEUDO_COUNTS
        the grid of ``n``.
    prior_structure : str, default='layerwise'
        of the marginal-likelihood tuning at each ``n``.

    Returns
    -------
    dict of str to PseudoCountChoice
        predictive name -> its choice (lowest NLPD; the first grid point on a tie).
    """
    if not predictives:
        raise ValueError("predictives must name at least one predictive.")
    if not pseudo_counts or min(pseudo_counts) <= 0:
        raise ValueError(f"pseudo_counts must be positive numbers, got {tuple(pseudo_counts)}.")
    scores: dict[str, dict[float, float]] = {name: {} for name in predictives}
    settings: dict[float, PosteriorSetting] = {}
    for setting in tune_priors_at(la, pseudo_counts, prior_structure):
        n = setting.pseudo_count
        setting.apply(la)
        settings[n] = setting
        with torch.no_grad():
            for name, kwargs in predictives.items():
                scores[name][float(n)] = nlpd(la(x_val, **kwargs), labels_val)
    return {name: PseudoCountChoice(settings[min(by_n, key=by_n.get)], by_n)
            for name, by_n in scores.items()}  # fmt: skip
