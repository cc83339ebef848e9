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

A batch is chosen from the scores by

- ``top``: the ``b`` best (:func:`select_top`);
- ``power`` / ``softmax`` / ``softrank``: stochastic batch acquisition (Kirsch et al. 2023,
  "Stochastic Batch Acquisition: A Simple Baseline for Deep Active Learning", TMLR): ``b``
  points sampled without replacement with probabilities proportional to ``s^beta``,
  ``exp(beta s)`` or ``rank^-beta`` (:func:`select_stochastic`). Top-k of one round's scores
  picks near-duplicates (a few hard classes); sampling keeps the batch diverse at no cost.

A ``_balanced`` strategy takes its rule's order under per-predicted-class quotas that count
the labels already bought (:func:`balanced_order`, PCB's pseudo-class balancing): naive
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

from laplace_vlm.active.targeting import expected_cosine
from laplace_vlm.docstrings import fill_doc
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
SELECTIONS: tuple[str, ...] = ("top", "power", "softmax", "softrank")
"""``top``: the best b; the others: Kirsch et al.'s stochastic batch acquisition."""
DENSITY = "density"
BALANCED = "balanced"
RANDOM_UNTARGETED = "random_untargeted"

# the batch rules' common arguments
_fill_doc = fill_doc.extend(
    batch_budget="""
        scores : torch.Tensor
            `(N,)` acquisition scores, higher first.
        budget : int
            number of points b; capped at the number of eligible points.
        """,
    exclude="""
        exclude : torch.Tensor, optional
            `(N,)` bool mask or int indices of points that cannot be chosen.
        """,
)


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


def _eligible(n: int, exclude: torch.Tensor | None) -> torch.Tensor:
    keep = torch.ones(n, dtype=torch.bool)
    if exclude is not None:
        keep[exclude.to(torch.long) if exclude.dtype != torch.bool else exclude] = False
    return keep


def _check_budget(scores: torch.Tensor, budget: int) -> None:
    if scores.dim() != 1:
        raise ValueError(f"scores must be (N,), got shape {tuple(scores.shape)}.")
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}.")


@_fill_doc
def select_top(
    scores: torch.Tensor,
    budget: int,
    *,
    class_balanced: bool = False,
    predicted_class: torch.Tensor | None = None,
    exclude: torch.Tensor | None = None,
    generator: torch.Generator | int | None = None,
) -> torch.Tensor:
    """Indices of the ``budget`` best-scored points.

    Ties are broken at random (seeded): the points are permuted before a stable sort. With
    ``class_balanced`` the points are ranked within their predicted class and taken
    round-robin: every class's best point first (in order of score), then every class's
    second best, and so on.

    Parameters
    ----------
    %(batch_budget)s
    class_balanced : bool
        balance over ``predicted_class``.
    predicted_class : torch.Tensor, optional
        `(N,)` int class per point (required when ``class_balanced``).
    %(exclude)s
    generator : torch.Generator or int, optional
        tie-breaking randomness.

    Returns
    -------
    indices : torch.Tensor
        `(min(b, eligible),)` long, in selection order.
    """
    _check_budget(scores, budget)
    n = scores.shape[0]
    if class_balanced and predicted_class is None:
        raise ValueError("predicted_class is required when class_balanced=True.")
    if predicted_class is not None and predicted_class.shape != (n,):
        raise ValueError(f"predicted_class must be ({n},), got {tuple(predicted_class.shape)}.")
    perm = torch.randperm(n, generator=as_generator(generator))
    perm = perm[_eligible(n, exclude)[perm]]
    s = scores.detach().cpu().to(torch.float64)[perm]
    order = perm[torch.sort(s, descending=True, stable=True).indices]
    if class_balanced:
        return balanced_order(order, predicted_class, budget)
    return order[:budget]


def balanced_order(
    order: torch.Tensor,
    predicted_class: torch.Tensor,
    budget: int,
    counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """The first ``budget`` points of ``order`` under per-predicted-class quotas (PCB).

    Pseudo-class balancing (Bang et al., CVPR 2024, "Active Prompt Learning in Vision Language
    Models"): every next point comes from the class with the fewest points so far, counting
    the already-labelled ones (``counts``, by their true labels) and the points picked here
    (by their predicted classes); within a class the points are taken in ``order``, and a tie
    between classes goes to the class whose next point comes first in ``order``. A class with
    no point left drops out. With ``counts`` zero this is a round-robin over the classes.

    Parameters
    ----------
    order : torch.Tensor
        `(M,)` long point indices in the strategy's priority order (no repeats).
    predicted_class : torch.Tensor
        `(N,)` int class of every point (indexed by ``order``'s entries).
    budget : int
        number of points b.
    counts : torch.Tensor, optional
        `(C',)` labelled points per class so far (default: none); classes beyond its length
        count 0.

    Returns
    -------
    torch.Tensor
        `(min(b, M),)` long, a sub-sequence of ``order`` in pick order.
    """
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}.")
    classes = predicted_class.cpu()[order.cpu()].tolist()
    queues: dict[int, list[int]] = {}
    for position, c in enumerate(classes):
        queues.setdefault(int(c), []).append(position)
    given = [] if counts is None else [int(v) for v in counts.tolist()]
    have = {c: (given[c] if c < len(given) else 0) for c in queues}
    heads = dict.fromkeys(queues, 0)
    picked: list[int] = []
    while len(picked) < budget and queues:
        c = min(queues, key=lambda k: (have[k], queues[k][heads[k]]))
        picked.append(queues[c][heads[c]])
        have[c], heads[c] = have[c] + 1, heads[c] + 1
        if heads[c] == len(queues[c]):
            del queues[c]
    return order[torch.tensor(picked, dtype=torch.long)]


def sampling_log_weights(scores: torch.Tensor, selection: str, beta: float = 1.0) -> torch.Tensor:
    """Log of the unnormalised sampling weights of stochastic batch acquisition, `(N,)`.

    ``power``: ``beta log s`` (scores must be >= 0; a zero score is never sampled while others
    are left); ``softmax``: ``beta s``; ``softrank``: ``-beta log rank`` (rank 1 = best).

    Parameters
    ----------
    scores : torch.Tensor
        `(N,)`.
    selection : {'power', 'softmax', 'softrank'}
        the rule. ``softmax`` is not scale invariant: scores of a few millinats (BALD of a
        narrow posterior) make it uniform; ``power`` and ``softrank`` are.
    beta : float
        the inverse temperature (Kirsch et al. use 1); larger is closer to top-k.

    Returns
    -------
    log_weights : torch.Tensor
        `(N,)` float64; ``-inf`` for a zero power score.
    """
    if selection not in SELECTIONS[1:]:
        raise ValueError(f"selection must be one of {SELECTIONS[1:]}, got {selection!r}.")
    if not beta > 0:
        raise ValueError(f"beta must be positive, got {beta}.")
    s = scores.detach().cpu().to(torch.float64)
    if selection == "power":
        if (s < 0).any():
            raise ValueError("power selection needs non-negative scores.")
        return beta * s.log()
    if selection == "softmax":
        return beta * s
    ranks = torch.empty_like(s)
    ranks[torch.argsort(s, descending=True, stable=True)] = torch.arange(
        1, len(s) + 1, dtype=s.dtype
    )
    return -beta * ranks.log()


@_fill_doc
def select_stochastic(
    scores: torch.Tensor,
    budget: int,
    selection: str = "power",
    beta: float = 1.0,
    *,
    exclude: torch.Tensor | None = None,
    generator: torch.Generator | int | None = None,
) -> torch.Tensor:
    """Sample ``budget`` points without replacement, ``p(i) ~ exp(sampling_log_weights)_i``.

    The Gumbel-top-k trick (Kirsch et al. 2023): the top ``b`` of ``log w_i + g_i`` with
    ``g_i ~ Gumbel(0, 1)`` are a draw of ``b`` points without replacement, each next point
    chosen with probability proportional to its weight among those left (Plackett-Luce).

    Parameters
    ----------
    %(batch_budget)s
    selection : {'power', 'softmax', 'softrank'}
        the rule of :func:`sampling_log_weights`.
    beta : float
        inverse temperature of :func:`sampling_log_weights`.
    %(exclude)s
    generator : torch.Generator or int, optional
        randomness of the draw.

    Returns
    -------
    indices : torch.Tensor
        `(min(b, eligible),)` long, in draw order.
    """
    _check_budget(scores, budget)
    log_w = sampling_log_weights(scores, selection, beta)
    u = torch.rand(len(log_w), generator=as_generator(generator), dtype=torch.float64)
    gumbel = -torch.log(-torch.log(u.clamp(1e-300, 1.0 - 1e-16)))
    eligible = _eligible(len(log_w), exclude)
    weighted = eligible & torch.isfinite(log_w)
    # zero-weight points (a zero power score) come last, in random order, if b needs them
    parts = [(weighted, log_w + gumbel), (eligible & ~weighted, gumbel)]
    order = [idx[torch.sort(key[idx], descending=True, stable=True).indices]
             for mask, key in parts for idx in [mask.nonzero().squeeze(1)]]  # fmt: skip
    return torch.cat(order)[:budget]


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
    (:func:`balanced_order`).

    Parameters
    ----------
    scores : torch.Tensor
        `(N,)` acquisition scores.
    budget : int
        number of points b.
    strategy : Strategy
        its ``selection`` decides: :func:`select_top` or :func:`select_stochastic`.
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
