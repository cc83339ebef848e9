"""Uncertainty measures of the predictive: entropy, mutual information (BALD), EPIG.

Inputs are either diagonal Gaussian logit moments ``mean, var`` `(N, C)` or joint logit samples
`(S, N, C)` drawn from the posterior over the *weights*
(``DualEncoderLaplace.functional_samples``), so that the samples of different inputs and
classes are correlated. BALD keeps the class correlations with joint samples, and EPIG *needs*
them: with independent pool and target samples the mutual information between a pool label
and a target label is zero.
"""

from __future__ import annotations

import torch

from laplace_vlm.docstrings import fill_doc
from laplace_vlm.predictive.links import check_moments, probit_softmax, sample_logits
from laplace_vlm.validation import check_finite, check_int


def check_samples(samples: torch.Tensor, name: str = "samples") -> None:
    """Raise unless ``samples`` is a finite, non-empty `(S, N, C)` tensor.

    Parameters
    ----------
    samples : torch.Tensor
        the tensor to check.
    name : str, default='samples'
        its name, for the message.

    Raises
    ------
    TypeError
        if ``samples`` is not a tensor.
    ValueError
        for another shape, no samples, or NaN or inf.
    """
    if not isinstance(samples, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(samples).__name__}.")
    if samples.dim() != 3 or samples.numel() == 0:
        raise ValueError(f"{name} must be a non-empty (S, N, C), got shape {tuple(samples.shape)}.")
    check_finite(name, samples)


def entropy(probs: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Shannon entropy (nats) of categorical ``probs`` along ``dim``, with ``0 log 0 = 0``.

    Parameters
    ----------
    probs : torch.Tensor
        probabilities, any shape.
    dim : int, default=-1
        the class dimension.

    Returns
    -------
    torch.Tensor
        the shape of ``probs`` without ``dim``.
    """
    return -torch.special.xlogy(probs, probs).sum(dim)


def map_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the deterministic (MAP) softmax ``softmax(logits)``.

    Parameters
    ----------
    logits : torch.Tensor
        `(N, C)` logits.

    Returns
    -------
    torch.Tensor
        `(N,)`, nats.
    """
    check_moments(logits, names=("logits", "var"))
    return entropy(torch.softmax(logits, dim=-1))


@fill_doc
def predictive_entropy(
    mean: torch.Tensor,
    var: torch.Tensor,
    link_approx: str = "probit",
    n_samples: int = 200,
    generator: torch.Generator | int | None = None,
) -> torch.Tensor:
    """Entropy of the Bayesian predictive ``E[softmax(f)]``, `(N,)`.

    ``link_approx="probit"`` uses the closed-form probit approximation, ``"mc"`` averages the
    softmax over ``n_samples`` independent logit samples.

    %(logit_moment_parameters)s
    link_approx : {'probit', 'mc'}, default='probit'
        how ``E[softmax(f)]`` is approximated.
    n_samples : int, default=200
        logit samples for ``'mc'``.
    generator : torch.Generator or int, optional
        randomness for ``'mc'`` (an int is a seed; None means seed 0).

    Returns
    -------
    torch.Tensor
        `(N,)`, nats.
    """
    check_moments(mean, var)
    if link_approx == "probit":
        return entropy(probit_softmax(mean, var))
    if link_approx == "mc":
        return entropy(torch.softmax(sample_logits(mean, var, n_samples, generator), -1).mean(0))
    raise ValueError(f"link_approx must be 'probit' or 'mc', got {link_approx!r}.")


def logit_variance(var: torch.Tensor) -> torch.Tensor:
    """Mean logit variance over the classes.

    Parameters
    ----------
    var : torch.Tensor
        `(N, C)` non-negative logit variances.

    Returns
    -------
    torch.Tensor
        `(N,)`.
    """
    check_moments(var, var, names=("var", "var"))
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
    check_samples(samples)
    probs = torch.softmax(samples, dim=-1)
    total = entropy(probs.mean(0))
    expected = entropy(probs).mean(0)
    return (total - expected).clamp_min(0.0)


@fill_doc
def bald(
    mean: torch.Tensor,
    var: torch.Tensor,
    n_samples: int = 200,
    generator: torch.Generator | int | None = None,
) -> torch.Tensor:
    """BALD from diagonal Gaussian logit moments, by seeded Monte Carlo, `(N,)`.

    No closed form exists for the softmax; the class correlations are ignored (use
    :func:`bald_from_samples` on joint functional samples to keep them).

    %(logit_sampling_parameters)s

    Returns
    -------
    scores : torch.Tensor
        `(N,)`, nats.
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
    max_elements : int, default=2**24
        memory bound on the joint probability tensor.

    Returns
    -------
    scores : torch.Tensor
        `(N,)` expected information gain about a target label, in nats.
    """
    check_samples(pool_samples, "pool_samples")
    check_samples(target_samples, "target_samples")
    check_int("max_elements", max_elements)
    if pool_samples.shape[0] != target_samples.shape[0]:
        raise ValueError(
            "pool_samples and target_samples must share the sample axis, got "
            f"{pool_samples.shape[0]} and {target_samples.shape[0]} samples."
        )
    n_samples, n_targ = pool_samples.shape[0], target_samples.shape[1]
    p_pool = torch.softmax(pool_samples, -1).permute(1, 2, 0)  # (N, C, S)
    p_targ = torch.softmax(target_samples, -1)  # (S, N*, C*)
    # the joint's marginals are the sample means, so sum joint log(p(y) p(y*)) = -H(y) - H(y*):
    # I(y; y*) = H(y) + H(y*) + sum joint log joint, one xlogy over the joint instead of two
    h_pool = entropy(p_pool.mean(-1))  # (N,)
    h_targ = entropy(p_targ.mean(0)).mean()  # averaged over the targets, as EPIG is
    # the joint as one GEMM `(chunk C, S) @ (S, N* C*)`, laid out `(chunk, C, N*, C*)`: no
    # permuted copy of it, and 1 / S folded into the small pool operand
    targ = p_targ.reshape(n_samples, -1)
    per_pool = targ.shape[1] * p_pool.shape[1]
    chunk = max(1, max_elements // per_pool)  # per_pool >= 1: check_samples refuses empty
    neg_joint_entropy = []
    for start in range(0, p_pool.shape[0], chunk):
        pp = p_pool[start : start + chunk] / n_samples
        joint = (pp.reshape(-1, n_samples) @ targ).reshape(len(pp), -1)
        neg_joint_entropy.append(torch.special.xlogy(joint, joint).sum(-1) / n_targ)
    return (h_pool + h_targ + torch.cat(neg_joint_entropy)).clamp_min(0.0)
