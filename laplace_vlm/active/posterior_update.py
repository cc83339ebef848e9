"""Updating the posterior after labelling: the new mean and the labelled images' curvature.

:func:`update_posterior` moves the posterior mean to the fine-tuned projection and adds, for
every labelled image, the image head's GGN of the C-way softmax over *all* class prompts, the
classification the fine-tuning optimises (:func:`classification_factor_sums`). The text head
is frozen in the fine-tuning and its posterior is kept as it was: the posterior is
block-diagonal across the heads, and the text-head curvature of the C-way likelihood is left
out (every labelled image would add curvature only along the C class prompts).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from laplace_vlm.active.adaptation import Labelled, check_labelled, class_embeddings
from laplace_vlm.curvature import get_curvature_backend
from laplace_vlm.docstrings import fill_doc


@fill_doc
def classification_factor_sums(
    la, labelled: Labelled, class_text: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """KFAC sums of the image head for the C-way classification of labelled images.

    Every labelled image is classified by a softmax over *all* class prompts (the problem the
    fine-tuning optimises; a softmax for SigLIP's heads too, as the fine-tuning's), at the
    posterior's current heads, with ``la``'s curvature backend.

    Parameters
    ----------
    la : DualEncoderLaplace
        the posterior (its heads, logit scale and curvature backend).
    labelled : tuple of torch.Tensor
        ``(activations (M, d_img), labels (M,))``.
    %(class_text)s

    Returns
    -------
    B, A : torch.Tensor
        `(D, D)` summed output GGNs and `(d_img, d_img)` summed input outer products.
    loss : torch.Tensor
        the summed cross-entropy.
    """
    heads = la.heads
    proj = heads.image_projection
    acts = heads.design("image", labelled[0].to(proj.weight))
    labels = labelled[1].to(proj.weight.device)
    text_unit = class_embeddings(heads, class_text)
    backend = get_curvature_backend(la.curvature)
    bias = None if proj.bias is None else proj.bias.detach()
    with torch.no_grad():
        B, A = backend(proj.weight.detach(), bias, acts, None, text_unit, heads.scale,
                       heads.logit_bias, "clip", labels=labels, chunk_size=la.chunk_size)  # fmt: skip
        logits = heads.logits(heads.embed_image(acts), text_unit)
        loss = F.cross_entropy(logits, labels, reduction="sum")
    return B, A, loss


def add_image_curvature(la, B: torch.Tensor, A: torch.Tensor, n: int, loss: torch.Tensor) -> None:
    """Add ``n`` examples' image-head sums ``(B, A)`` to ``la``, leaving its text head as it is.

    laplace's Kronecker factors share one count N (``[sum B, sum a a^T / N]`` per weight), so
    the text head's input sum is rescaled by ``(N + n) / N``: its factors, and its posterior,
    do not change.

    Parameters
    ----------
    la : DualEncoderLaplace
        a fitted posterior, updated in place.
    B, A : torch.Tensor
        summed output GGNs `(D, D)` and input outer products of the image head.
    n : int
        examples they sum over.
    loss : torch.Tensor
        their summed negative log-likelihood.
    """
    if la.H_facs is None:
        raise ValueError("la must be fitted (la.fit) before labelled images are added.")
    total = la.factor_sums()
    keep = (la.n_data + n) / la.n_data
    total.B_image += B
    total.A_image += A
    total.A_text *= keep
    total.loss += loss
    total.n += n
    la.set_factor_sums(total)


@fill_doc
def update_posterior(
    la,
    projection: nn.Linear,
    new: Labelled | None,
    class_text: torch.Tensor,
) -> None:
    """Move the posterior mean to ``projection`` and add the C-way curvature of ``new``.

    Parameters
    ----------
    la : DualEncoderLaplace
        fitted posterior; its image head takes the weights of ``projection``.
    projection : nn.Linear
        the fine-tuned image projection (not modified).
    new : tuple of torch.Tensor, optional
        ``(activations (M, d_img), labels (M,))`` to add (:func:`classification_factor_sums`
        at the new weights). None or empty: only the mean moves.
    %(class_text)s
    """
    target = la.heads.image_projection
    if projection.weight.shape != target.weight.shape or (projection.bias is None) != (
        target.bias is None
    ):
        raise ValueError(
            f"projection must be a Linear of weight {tuple(target.weight.shape)} "
            f"(bias: {target.bias is not None}), got {tuple(projection.weight.shape)}."
        )
    with torch.no_grad():
        target.weight.copy_(projection.weight)
        if target.bias is not None:
            target.bias.copy_(projection.bias)
    la.refresh_mean()
    if new is None or len(new[1]) == 0:
        return
    check_labelled("new", new, la.heads.in_features("image"), class_text.shape[0])
    B, A, loss = classification_factor_sums(la, new, class_text)
    add_image_curvature(la, B, A, len(new[1]), loss)
