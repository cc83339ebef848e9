"""Acquisition functions for active learning from the analytic logit predictive.

Every score is "higher = more worth labelling" and is a tensor `(N,)` over the pool.

Two kinds of input:

- **logit moments** ``mean, var`` `(N, C)` (diagonal Gaussian logits per input, as returned by
  ``DualEncoderLaplace.predictive_moments``). Enough for MAP entropy, predictive entropy
  (probit or Monte Carlo), logit variance and BALD (Monte Carlo over independent logits).
- **joint functional samples** `(S, N, C)`: logit samples drawn from the posterior over the
  *weights* (``DualEncoderLaplace.functional_samples``), so that the samples of different
  inputs and classes are correlated. BALD is exact in the class correlations with them, and
  EPIG *needs* them: with independent pool and target samples the mutual information between
  a pool label and a target label is zero, and every EPIG score collapses to Monte Carlo noise.

Batch selection is top-``b`` (:func:`select_top`), optionally balanced over predicted classes,
with seeded random tie-breaking.
"""

from __future__ import annotations

import torch

from laplace_vlm.predictive.links import as_generator
from laplace_vlm.predictive.uncertainty import (
    bald,
    bald_from_samples,
    epig_from_samples,
    logit_variance,
    map_entropy,
    predictive_entropy,
)

STRATEGIES: tuple[str, ...] = (
    "random",
    "map_entropy",
    "entropy",
    "bald",
    "epig",
    "logit_variance",
)


def acquisition_scores(
    strategy: str,
    mean: torch.Tensor | None = None,
    var: torch.Tensor | None = None,
    *,
    map_logits: torch.Tensor | None = None,
    samples: torch.Tensor | None = None,
    target_samples: torch.Tensor | None = None,
    n_samples: int = 200,
    generator: torch.Generator | int | None = None,
) -> torch.Tensor:
    """Scores `(N,)` of one strategy from :data:`STRATEGIES`.

    Parameters
    ----------
    strategy : str
        one of :data:`STRATEGIES`.
    mean, var : torch.Tensor, optional
        `(N, C)` logit moments (needed by ``entropy``, ``logit_variance``, and ``bald``
        without ``samples``).
    map_logits : torch.Tensor, optional
        `(N, C)` deterministic logits for ``map_entropy`` (defaults to ``mean``).
    samples : torch.Tensor, optional
        `(S, N, C)` joint logit samples of the pool; used by ``bald`` when given and
        required by ``epig``.
    target_samples : torch.Tensor, optional
        `(S, N*, C)` logit samples of the targets from the same weight samples (``epig``).
    n_samples : int
        Monte Carlo samples where moments are sampled.
    generator : torch.Generator or int, optional
        randomness for ``random`` and Monte Carlo.

    Returns
    -------
    scores : torch.Tensor
        `(N,)`; higher is selected first.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}.")
    if strategy == "epig":
        if samples is None or target_samples is None:
            raise ValueError("strategy 'epig' needs joint samples and target_samples.")
        return epig_from_samples(samples, target_samples)
    if strategy == "bald" and samples is not None:
        return bald_from_samples(samples)
    if strategy == "map_entropy":
        logits = map_logits if map_logits is not None else mean
        if logits is None:
            raise ValueError("strategy 'map_entropy' needs map_logits or mean.")
        return map_entropy(logits)
    ref = mean if mean is not None else samples
    if ref is None:
        raise ValueError(f"strategy {strategy!r} needs mean (and var).")
    if strategy == "random":
        n = ref.shape[-2]
        return torch.rand(n, generator=as_generator(generator), dtype=torch.float64)
    if mean is None or var is None:
        raise ValueError(f"strategy {strategy!r} needs mean and var.")
    if strategy == "entropy":
        return predictive_entropy(mean, var)
    if strategy == "logit_variance":
        return logit_variance(var)
    return bald(mean, var, n_samples, generator)


def select_top(
    scores: torch.Tensor,
    budget: int,
    *,
    class_balanced: bool = False,
    predicted_class: torch.Tensor | None = None,
    exclude: torch.Tensor | None = None,
    generator: torch.Generator | int | None = None,
) -> torch.Tensor:
    """Indices of the ``budget`` best-scored pool points.

    Ties are broken at random (seeded): the pool is permuted before a stable sort.
    With ``class_balanced`` the points are ranked within their predicted class and taken
    round-robin: every class's best point first (in order of score), then every class's
    second best, and so on, so that no predicted class takes more than its share while
    others still have candidates.

    Parameters
    ----------
    scores : torch.Tensor
        `(N,)`.
    budget : int
        number of points b; capped at the number of eligible points.
    class_balanced : bool
        balance over ``predicted_class``.
    predicted_class : torch.Tensor, optional
        `(N,)` int class per point (required when ``class_balanced``).
    exclude : torch.Tensor, optional
        `(N,)` bool mask or int indices of points that cannot be chosen (already labelled).
    generator : torch.Generator or int, optional
        tie-breaking randomness.

    Returns
    -------
    indices : torch.Tensor
        `(min(b, eligible),)` long, in selection order.
    """
    if scores.dim() != 1:
        raise ValueError(f"scores must be (N,), got shape {tuple(scores.shape)}.")
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}.")
    n = scores.shape[0]
    if class_balanced and predicted_class is None:
        raise ValueError("predicted_class is required when class_balanced=True.")
    if predicted_class is not None and predicted_class.shape != (n,):
        raise ValueError(f"predicted_class must be ({n},), got {tuple(predicted_class.shape)}.")
    keep = torch.ones(n, dtype=torch.bool)
    if exclude is not None:
        keep[exclude.to(torch.long) if exclude.dtype != torch.bool else exclude] = False
    perm = torch.randperm(n, generator=as_generator(generator))
    perm = perm[keep[perm]]
    s = scores.detach().cpu().to(torch.float64)[perm]
    order = perm[torch.sort(s, descending=True, stable=True).indices]
    if class_balanced:
        cls = predicted_class.cpu()[order]
        # rank of each point within its class, in score order
        rank = torch.empty_like(cls)
        for c in cls.unique():
            idx = (cls == c).nonzero().squeeze(1)
            rank[idx] = torch.arange(idx.numel())
        order = order[torch.sort(rank, stable=True).indices]
    return order[:budget]
