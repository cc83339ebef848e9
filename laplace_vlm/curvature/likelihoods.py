"""Contrastive likelihoods of dual encoders: logits, losses and logit-Hessian weights.

Both likelihoods treat one tower's batch as the *classes* of the other tower's inputs:
CLIP's InfoNCE is a softmax over the other modality's items, SigLIP's is an independent
sigmoid per pair with the matching pair labelled 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from laplace_vlm.enums import Contrastive, parse_option, plain

CONTRASTIVE_TYPES: tuple[str, ...] = tuple(c.value for c in Contrastive)


def check_contrastive(contrastive: str) -> str:
    """Return ``contrastive`` as a plain lowercase string or raise a ``ValueError``.

    Parameters
    ----------
    contrastive : str or Contrastive
        ``'clip'`` or ``'siglip'`` in any case, or a str-Enum member with such a value.

    Returns
    -------
    str
        ``'clip'`` or ``'siglip'``.
    """
    lowered = plain(contrastive).lower() if isinstance(contrastive, str) else contrastive
    return parse_option(Contrastive, lowered, "contrastive").value


def hessian_weights(logits: torch.Tensor, contrastive: str) -> torch.Tensor:
    """Per-logit weights ``w`` of the loss Hessian with respect to the logits.

    CLIP: ``w = softmax(logits)`` along the classes, and the logit Hessian of row ``i`` is
    ``diag(w_i) - w_i w_i^T``. SigLIP: ``w = sigma(l)(1 - sigma(l))`` and the Hessian is
    ``diag(w_i)`` (the labels drop out since ``sigma(yl)(1-sigma(yl))`` is even in ``y``).

    Parameters
    ----------
    logits : torch.Tensor
        `(M, K)` logits of M inputs against K classes.
    contrastive : {'clip', 'siglip'}
        the likelihood, as :func:`check_contrastive` returns it.

    Returns
    -------
    w : torch.Tensor
        `(M, K)`
    """
    if contrastive == "clip":
        return torch.softmax(logits, dim=-1)
    sig = torch.sigmoid(logits)
    return sig * (1.0 - sig)


def contrastive_loss(logits: torch.Tensor, labels: torch.Tensor, contrastive: str) -> torch.Tensor:
    """Sum-reduced negative log-likelihood of the rows of ``logits``.

    Parameters
    ----------
    logits : torch.Tensor
        `(M, K)` logits of M inputs against K classes.
    labels : torch.Tensor
        `(M,)` index of each row's matching class.
    contrastive : {'clip', 'siglip'}
        the likelihood, as :func:`check_contrastive` returns it.

    Returns
    -------
    loss : torch.Tensor
        scalar: cross-entropy (CLIP) or the pairwise ``-log sigma(y l)`` with ``y = +-1`` (SigLIP).
    """
    if contrastive == "clip":
        return F.cross_entropy(logits, labels, reduction="sum")
    signs = -torch.ones_like(logits)
    signs[torch.arange(len(labels), device=logits.device), labels] = 1.0
    return -F.logsigmoid(signs * logits).sum()


def pair_loss(
    u: torch.Tensor,
    v: torch.Tensor,
    labels: torch.Tensor,
    logits_fn,
    contrastive: str,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Summed NLL of a class batch: image-to-text plus text-to-image for CLIP, each pair once
    for SigLIP, in row chunks of ``chunk_size`` (the full `(M, M)` logits never exist at once).

    Parameters
    ----------
    u, v : torch.Tensor
        `(M, D)` normalised image and text embeddings of matched pairs.
    labels : torch.Tensor
        `(M,)` matching index per row.
    logits_fn : callable
        ``(rows, cols) -> logits`` (scale and bias applied).
    contrastive : {'clip', 'siglip'}
        the likelihood, as :func:`check_contrastive` returns it.
    chunk_size : int, optional
        rows per chunk; default all rows at once.

    Returns
    -------
    loss : torch.Tensor
        scalar, the summed negative log-likelihood.
    """
    directions = [(u, v)] if contrastive == "siglip" else [(u, v), (v, u)]
    step = chunk_size or len(u)
    loss = u.new_zeros(())
    for rows, cols in directions:
        for s in range(0, len(rows), step):
            loss += contrastive_loss(
                logits_fn(rows[s : s + step], cols), labels[s : s + step], contrastive
            )
    return loss
