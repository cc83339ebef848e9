"""From logit distributions to probabilities: the probit links and the Gaussian logit sampler."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from laplace_vlm.docstrings import fill_doc
from laplace_vlm.enums import Link, parse_option

_fill_doc = fill_doc.extend(
    link_parameters="""
        Parameters
        ----------
        link : {'softmax', 'sigmoid'} or Link
            the link: a softmax over the classes, or SigLIP's sigmoid per pair.
        """,
    unknown_link="""
        Raises
        ------
        ValueError
            for another ``link``.
        """,
)


def as_generator(generator: torch.Generator | int | None) -> torch.Generator:
    """A ``torch.Generator``: the given one, or a new one seeded with the int (default 0).

    Parameters
    ----------
    generator : torch.Generator or int, optional
        a generator (returned as is), a seed, or None for seed 0.

    Returns
    -------
    torch.Generator
        a new one is a CPU generator.
    """
    if isinstance(generator, torch.Generator):
        return generator
    seed = 0 if generator is None else int(generator)
    return torch.Generator().manual_seed(seed)


def check_moments(mean: torch.Tensor, var: torch.Tensor | None = None) -> None:
    """Raise a ``ValueError`` unless ``mean`` is `(N, C)` and ``var`` matches it, non-negative.

    Parameters
    ----------
    mean : torch.Tensor
        `(N, C)` logit means.
    var : torch.Tensor, optional
        `(N, C)` logit variances; not checked if None.
    """
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


def probit_scale(var: torch.Tensor) -> torch.Tensor:
    """MacKay's probit factor ``1 / sqrt(1 + pi/8 var)``.

    Parameters
    ----------
    var : torch.Tensor
        logit variances, any shape.

    Returns
    -------
    torch.Tensor
        the factor, elementwise.
    """
    return torch.rsqrt(1.0 + math.pi / 8.0 * var)


@fill_doc
def probit_softmax(mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """Probit approximation of ``E[softmax(f)]`` per row, ``f ~ N(mean, diag(var))``.

    %(logit_moment_parameters)s

    Returns
    -------
    probs : torch.Tensor
        `(N, C)` class probabilities, each row summing to 1.
    """
    return torch.softmax(mean * probit_scale(var), dim=-1)


@fill_doc
def probit_sigmoid(mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """Probit approximation of ``E[sigmoid(f)]`` per pair (SigLIP), ``f ~ N(mean, var)``.

    %(logit_moment_parameters)s

    Returns
    -------
    pair_probs : torch.Tensor
        `(N, C)` probability in ``(0, 1)`` that each pair matches, independent across pairs.
    """
    return torch.sigmoid(mean * probit_scale(var))


@_fill_doc
def link_function(link: str | Link) -> Callable[[torch.Tensor], torch.Tensor]:
    """``softmax`` over classes or SigLIP's per-pair ``sigmoid``, applied to logits.

    %(link_parameters)s

    Returns
    -------
    callable
        ``logits -> probabilities``, the softmax along the last dim.

    %(unknown_link)s
    """
    if parse_option(Link, link, "link") is Link.SOFTMAX:
        return lambda f: torch.softmax(f, dim=-1)
    return torch.sigmoid


@_fill_doc
def probit_link(link: str | Link) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The probit approximation of ``E[link(f)]`` for ``f ~ N(mean, var)``.

    %(link_parameters)s

    Returns
    -------
    callable
        :func:`probit_softmax` or :func:`probit_sigmoid`.

    %(unknown_link)s
    """
    return probit_softmax if parse_option(Link, link, "link") is Link.SOFTMAX else probit_sigmoid


@fill_doc
def sample_logits(
    mean: torch.Tensor,
    var: torch.Tensor,
    n_samples: int = 200,
    generator: torch.Generator | int | None = None,
) -> torch.Tensor:
    """Independent Gaussian logit samples ``mean + sqrt(var) eps``.

    %(logit_sampling_parameters)s

    Returns
    -------
    samples : torch.Tensor
        `(n_samples, N, C)`; independent across samples, inputs and classes.

    Raises
    ------
    ValueError
        for moments of the wrong shapes, negative variances or ``n_samples < 1``.
    """
    check_moments(mean, var)
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}.")
    eps = torch.randn((n_samples, *mean.shape), generator=as_generator(generator), dtype=mean.dtype)
    return mean + var.sqrt() * eps.to(mean.device)
