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

import math

import torch

STRATEGIES: tuple[str, ...] = (
    "random",
    "map_entropy",
    "entropy",
    "bald",
    "epig",
    "logit_variance",
)


def _generator(generator: torch.Generator | int | None) -> torch.Generator:
    """A ``torch.Generator``: the given one, or a new one seeded with the int (default 0)."""
    if isinstance(generator, torch.Generator):
        return generator
    seed = 0 if generator is None else int(generator)
    return torch.Generator().manual_seed(seed)


def _check_moments(mean: torch.Tensor, var: torch.Tensor | None = None) -> None:
    if mean.dim() != 2:
        raise ValueError(f"mean must be (N, C), got shape {tuple(mean.shape)}.")
    if var is None:
        return
    if var.shape != mean.shape:
        raise ValueError(
            f"var must have the shape of mean {tuple(mean.shape)}, got {tuple(var.shape)}."
        )
    if (var < 0).any():
        raise ValueError("var must be non-negative.")


def _check_samples(samples: torch.Tensor, name: str = "samples") -> None:
    if samples.dim() != 3:
        raise ValueError(f"{name} must be (S, N, C), got shape {tuple(samples.shape)}.")


def entropy(probs: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Shannon entropy (nats) of categorical ``probs`` along ``dim``, with ``0 log 0 = 0``."""
    return -torch.special.xlogy(probs, probs).sum(dim)


def probit_probs(mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """Probit-approximate predictive ``softmax(mean / sqrt(1 + pi/8 var))``, `(N, C)`."""
    return torch.softmax(mean / torch.sqrt(1.0 + math.pi / 8.0 * var), dim=-1)


def sample_logits(
    mean: torch.Tensor,
    var: torch.Tensor,
    n_samples: int = 200,
    generator: torch.Generator | int | None = None,
) -> torch.Tensor:
    """Independent Gaussian logit samples ``mean + sqrt(var) eps``.

    Parameters
    ----------
    mean, var : torch.Tensor
        `(N, C)` logit moments.
    n_samples : int
        S.
    generator : torch.Generator or int, optional
        randomness (an int is a seed; None means seed 0).

    Returns
    -------
    samples : torch.Tensor
        `(S, N, C)`; independent across inputs and classes.
    """
    _check_moments(mean, var)
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}.")
    eps = torch.randn(
        (n_samples, *mean.shape), generator=_generator(generator), dtype=mean.dtype
    ).to(mean.device)
    return mean + var.sqrt() * eps


def map_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the deterministic (MAP) softmax ``softmax(logits)``, `(N,)`."""
    _check_moments(logits)
    return entropy(torch.softmax(logits, dim=-1))


def predictive_entropy(
    mean: torch.Tensor,
    var: torch.Tensor,
    method: str = "probit",
    n_samples: int = 200,
    generator: torch.Generator | int | None = None,
) -> torch.Tensor:
    """Entropy of the Bayesian predictive ``E[softmax(f)]``, `(N,)`.

    ``method="probit"`` uses the closed-form probit approximation, ``"mc"`` averages the
    softmax over ``n_samples`` independent logit samples.
    """
    _check_moments(mean, var)
    if method == "probit":
        return entropy(probit_probs(mean, var))
    if method == "mc":
        return entropy(torch.softmax(sample_logits(mean, var, n_samples, generator), -1).mean(0))
    raise ValueError(f"method must be 'probit' or 'mc', got {method!r}.")


def logit_variance(var: torch.Tensor) -> torch.Tensor:
    """Mean logit variance over the classes, `(N,)`."""
    _check_moments(var, var)
    return var.mean(-1)


def bald_from_samples(samples: torch.Tensor) -> torch.Tensor:
    """BALD ``I(y; theta | x) = H[E_s p_s] - E_s H[p_s]`` from logit samples.

    Parameters
    ----------
    samples : torch.Tensor
        `(S, N, C)` logit samples.

    Returns
    -------
    scores : torch.Tensor
        `(N,)`, non-negative up to round-off.
    """
    _check_samples(samples)
    probs = torch.softmax(samples, dim=-1)
    total = entropy(probs.mean(0))
    expected = entropy(probs).mean(0)
    return (total - expected).clamp_min(0.0)


def bald(
    mean: torch.Tensor,
    var: torch.Tensor,
    n_samples: int = 200,
    generator: torch.Generator | int | None = None,
) -> torch.Tensor:
    """BALD from diagonal Gaussian logit moments, by seeded Monte Carlo, `(N,)`.

    No closed form exists for the softmax; the class correlations are ignored (use
    :func:`bald_from_samples` on joint functional samples to keep them).
    """
    return bald_from_samples(sample_logits(mean, var, n_samples, generator))


def epig_from_samples(
    pool_samples: torch.Tensor,
    target_samples: torch.Tensor,
    max_elements: int = 2**24,
) -> torch.Tensor:
    """EPIG (Bickford-Smith et al., 2023) from joint logit samples of pool and targets.

    ``EPIG(x) = E_{x*} I(y; y* | x, x*)`` with ``p(y, y*) = E_theta[p(y|x,theta) p(y*|x*,theta)]``,
    estimated by averaging over the S weight samples (sample ``s`` of the pool and of the
    targets must come from the *same* weight sample). Chunked over the pool so that the
    `(chunk, N*, C, C)` joint never exceeds ``max_elements``.

    Parameters
    ----------
    pool_samples : torch.Tensor
        `(S, N, C)` logit samples of the pool.
    target_samples : torch.Tensor
        `(S, N*, C*)` logit samples of the target inputs, from the same weight samples.
    max_elements : int
        memory bound on the joint probability tensor.

    Returns
    -------
    scores : torch.Tensor
        `(N,)` expected information gain about a target label, in nats.
    """
    _check_samples(pool_samples, "pool_samples")
    _check_samples(target_samples, "target_samples")
    if pool_samples.shape[0] != target_samples.shape[0]:
        raise ValueError(
            "pool_samples and target_samples must share the sample axis, got "
            f"{pool_samples.shape[0]} and {target_samples.shape[0]} samples."
        )
    n_samples = pool_samples.shape[0]
    p_pool = torch.softmax(pool_samples, -1).transpose(0, 1)  # (N, S, C)
    p_targ = torch.softmax(target_samples, -1).transpose(0, 1)  # (N*, S, C*)
    marg_targ = p_targ.mean(1)  # (N*, C*)
    per_pool = p_targ.shape[0] * p_pool.shape[-1] * p_targ.shape[-1]
    chunk = max(1, max_elements // max(per_pool, 1))
    scores = []
    for start in range(0, p_pool.shape[0], chunk):
        pp = p_pool[start : start + chunk]
        joint = torch.einsum("psc,tsd->ptcd", pp, p_targ) / n_samples
        indep = pp.mean(1)[:, None, :, None] * marg_targ[None, :, None, :]
        mi = (torch.special.xlogy(joint, joint) - torch.special.xlogy(joint, indep)).sum((-2, -1))
        scores.append(mi.mean(-1))
    return torch.cat(scores).clamp_min(0.0)


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
        return torch.rand(n, generator=_generator(generator), dtype=torch.float64)
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
    perm = torch.randperm(n, generator=_generator(generator))
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
