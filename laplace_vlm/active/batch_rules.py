"""Batch rules: choosing ``b`` points from acquisition scores.

- :func:`select_top`: the ``b`` best, ties broken at random;
- :func:`select_stochastic`: stochastic batch acquisition (Kirsch et al. 2023), ``b`` points
  sampled without replacement with log-weights :func:`sampling_log_weights`;
- :func:`balanced_order`: a rule's order under per-predicted-class quotas (PCB).

``laplace_vlm.active.acquisition.select`` dispatches a parsed strategy to these.
"""

from __future__ import annotations

import torch

from laplace_vlm.docstrings import fill_doc
from laplace_vlm.predictive.links import as_generator

SELECTIONS: tuple[str, ...] = ("top", "power", "softmax", "softrank")
"""``top``: the best b; the others: Kirsch et al.'s stochastic batch acquisition."""

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
