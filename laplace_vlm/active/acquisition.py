"""Acquisition: scores, stochastic batch selection and representativeness weighting.

Every score is "higher = more worth labelling" and is a tensor `(N,)` over the candidates.

Two kinds of input:

- **logit moments** ``mean, var`` `(N, C)` (diagonal Gaussian logits per input, as returned by
  ``DualEncoderLaplace.predictive_moments``): MAP entropy, predictive entropy and logit
  variance.
- **joint functional samples** `(S, N, C)`: logit samples drawn from the posterior over the
  *weights* (``DualEncoderLaplace.functional_samples``, by default through the exact
  normalisation), so that the samples of different inputs and classes are correlated. BALD uses
  them, and EPIG *needs* them: with independent pool and target samples the mutual information
  between a pool label and a target label is zero.

A batch is chosen from the scores (:func:`select`, with the rules of
:mod:`laplace_vlm.active.batch_rules`) by

- ``top``: the ``b`` best (``select_top``);
- ``power`` / ``softmax`` / ``softrank``: stochastic batch acquisition (Kirsch et al. 2023,
  "Stochastic Batch Acquisition: A Simple Baseline for Deep Active Learning", TMLR): ``b``
  points sampled without replacement with probabilities proportional to ``s^beta``,
  ``exp(beta s)`` or ``rank^-beta`` (``select_stochastic``). Top-k of one round's scores
  picks near-duplicates (a few hard classes); sampling keeps the batch diverse at no cost.

A ``_balanced`` strategy takes its rule's order under per-predicted-class quotas that count
the labels already bought (``balanced_order``, PCB's pseudo-class balancing): naive
uncertainty picks class-imbalanced sets at few-shot budgets.

A strategy may weight its scores by how representative a candidate is of the target (query)
inputs, the *information density* of Settles & Craven (2008), "An Analysis of Active Learning
Strategies for Sequence Labeling Tasks", EMNLP: ``score(x) * density(x)^beta`` with
``density(x)`` the mean similarity of ``x`` to the targets (:func:`information_density`). It
is the cold-start-aware variant: with few labels, uncertainty alone picks hard, atypical
images, and a small head gains more from representative ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from laplace_vlm.active.batch_rules import (
    SELECTIONS,
    balanced_order,
    select_stochastic,
    select_top,
)
from laplace_vlm.active.targeting import expected_cosine
from laplace_vlm.predictive.links import as_generator
from laplace_vlm.predictive.uncertainty import (
    bald_from_samples,
    epig_from_samples,
    logit_variance,
    map_entropy,
    predictive_entropy,
)

SCORES: tuple[str, ...] = ("random", "map_entropy", "entropy", "bald", "epig", "logit_variance")
"""Acquisition scores; ``bald`` and ``epig`` need joint functional samples."""
SAMPLED_SCORES: tuple[str, ...] = ("bald", "epig")
DENSITY = "density"
BALANCED = "balanced"
RANDOM_UNTARGETED = "random_untargeted"


@dataclass(frozen=True)
class Strategy:
    """A parsed strategy name: ``<score>[_density][_balanced][_<selection>]`` or
    ``random_untargeted``.

    Attributes
    ----------
    name : str
        the name it was parsed from (the key in result tables).
    score : str
        one of :data:`SCORES`.
    density : bool
        weight the scores by the information density of the candidates.
    selection : str
        one of :data:`SELECTIONS`.
    targeted : bool
        False only for ``random_untargeted`` (uniform over the whole pool).
    balanced : bool
        take the selection rule's order under per-predicted-class quotas
        (:func:`balanced_order`, as PCB does).
    """

    name: str
    score: str
    density: bool = False
    selection: str = "top"
    targeted: bool = True
    balanced: bool = False

    @classmethod
    def parse(cls, name: str) -> Strategy:
        """Parse ``name``; a ``ValueError`` names the parts it accepts.

        Parameters
        ----------
        name : str
            ``<score>[_density][_balanced][_<selection>]`` or ``random_untargeted``.

        Returns
        -------
        Strategy
            the parts of ``name``, ``name`` itself kept as :attr:`name`.
        """
        if name == RANDOM_UNTARGETED:
            return cls(name, "random", targeted=False)
        rest, selection = name, "top"
        for option in SELECTIONS[1:]:
            if rest.endswith(f"_{option}"):
                rest, selection = rest[: -len(option) - 1], option
        balanced = rest.endswith(f"_{BALANCED}")
        rest = rest[: -len(BALANCED) - 1] if balanced else rest
        density = rest.endswith(f"_{DENSITY}")
        score = rest[: -len(DENSITY) - 1] if density else rest
        if score not in SCORES:
            raise ValueError(
                f"strategy must be {RANDOM_UNTARGETED!r} or "
                f"<score>[_{DENSITY}][_{BALANCED}][_<selection>] with score in {SCORES} and "
                f"selection in {SELECTIONS[1:]}, got {name!r}."
            )
        return cls(name, score, density, selection, balanced=balanced)


def acquisition_scores(
    score: str,
    mean: torch.Tensor | None = None,
    var: torch.Tensor | None = None,
    *,
    map_logits: torch.Tensor | None = None,
    samples: torch.Tensor | None = None,
    target_samples: torch.Tensor | None = None,
    generator: torch.Generator | int | None = None,
) -> torch.Tensor:
    """Scores `(N,)` of one of :data:`SCORES`.

    Parameters
    ----------
    score : str
        one of :data:`SCORES`.
    mean, var : torch.Tensor, optional
        `(N, C)` logit moments (``entropy``, ``logit_variance``; ``random`` reads N from them).
    map_logits : torch.Tensor, optional
        `(N, C)` deterministic logits for ``map_entropy`` (defaults to ``mean``).
    samples : torch.Tensor, optional
        `(S, N, C)` joint logit samples of the candidates (``bald``, ``epig``).
    target_samples : torch.Tensor, optional
        `(S, N*, C)` logit samples of the targets from the same weight samples (``epig``).
    generator : torch.Generator or int, optional
        randomness of ``random``.

    Returns
    -------
    scores : torch.Tensor
        `(N,)`; higher is selected first.
    """
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}.")
    if score in SAMPLED_SCORES and samples is None:
        raise ValueError(f"score {score!r} needs joint samples.")
    if score == "epig":
        if target_samples is None:
            raise ValueError("score 'epig' needs target_samples.")
        return epig_from_samples(samples, target_samples)
    if score == "bald":
        return bald_from_samples(samples)
    if score == "map_entropy":
        logits = map_logits if map_logits is not None else mean
        if logits is None:
            raise ValueError("score 'map_entropy' needs map_logits or mean.")
        return map_entropy(logits)
    if mean is None:
        raise ValueError(f"score {score!r} needs mean (and var).")
    if score == "random":
        return torch.rand(mean.shape[-2], generator=as_generator(generator), dtype=torch.float64)
    if var is None:
        raise ValueError(f"score {score!r} needs mean and var.")
    return predictive_entropy(mean, var) if score == "entropy" else logit_variance(var)


def information_density(
    candidates: tuple[torch.Tensor, torch.Tensor],
    targets: tuple[torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    """Mean similarity of every candidate to the targets, `(N,)` in ``[0, 1]``.

    Settles & Craven's information density uses the mean cosine similarity to the unlabelled
    set; here the similarity is the expected cosine of the Gaussian image embeddings
    (:func:`laplace_vlm.active.targeting.expected_cosine`), clamped at 0 so that the weight
    stays a non-negative multiplier (their features were non-negative, ours are not).

    Parameters
    ----------
    candidates, targets : tuple of torch.Tensor
        ``(mean, var)`` of the image embeddings, `(N, D)` and `(N*, D)`.

    Returns
    -------
    torch.Tensor
        `(N,)` densities in ``[0, 1]``, the mean clamped expected cosine over the targets.
    """
    return expected_cosine(*candidates, *targets).clamp_min(0.0).mean(-1)


def select(
    scores: torch.Tensor,
    budget: int,
    strategy: Strategy,
    beta: float = 1.0,
    *,
    predicted_class: torch.Tensor | None = None,
    counts: torch.Tensor | None = None,
    generator: torch.Generator | int | None = None,
) -> torch.Tensor:
    """The batch of ``strategy``'s selection rule (top-k or a stochastic one).

    A ``balanced`` strategy takes the rule's whole order under per-predicted-class quotas
    (``batch_rules.balanced_order``).

    Parameters
    ----------
    scores : torch.Tensor
        `(N,)` acquisition scores.
    budget : int
        number of points b.
    strategy : Strategy
        its ``selection`` decides: ``select_top`` or ``select_stochastic``.
    beta : float
        inverse temperature of the stochastic rules.
    predicted_class : torch.Tensor, optional
        `(N,)` MAP class per point (required by a ``balanced`` strategy).
    counts : torch.Tensor, optional
        `(C,)` labelled points per class so far, for a ``balanced`` strategy's quotas.
    generator : torch.Generator or int, optional
        tie-breaking / sampling randomness.

    Returns
    -------
    indices : torch.Tensor
        `(min(b, N),)` long, in selection order.
    """
    if strategy.balanced and predicted_class is None:
        raise ValueError(f"predicted_class is required by the balanced strategy {strategy.name!r}.")
    n = len(scores) if strategy.balanced else budget
    if strategy.selection == "top":
        order = select_top(scores, n, generator=generator)
    else:
        order = select_stochastic(scores, n, strategy.selection, beta, generator=generator)
    return balanced_order(order, predicted_class, budget, counts) if strategy.balanced else order
