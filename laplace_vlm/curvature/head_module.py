"""One head as a small module for the library backends: ``a, r -> s normalize(W a + b + r) T^T``.

ASDL and curvlinops compute curvature by hooking modules; they get a fresh copy of the head
(never the user's modules) with the other tower's normalised embeddings ``T`` and the logit
scale and bias as buffers. The logits are the package's one cosine logit,
:func:`laplace_vlm.heads.similarity_logits`.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from laplace_vlm.heads import linear_copy, similarity_logits


class CosineLogitHead(nn.Module):
    """Similarity logits `(M, K)` of one head against fixed normalised targets `(K, D)`.

    Parameters
    ----------
    weight : torch.Tensor
        `(D, d)` head weight (copied).
    bias : torch.Tensor, optional
        `(D,)` head bias (copied).
    targets : torch.Tensor
        `(K, D)` normalised embeddings of the other tower.
    scale : torch.Tensor
        the linear logit scale.
    logit_bias : torch.Tensor, optional
        SigLIP's logit bias.
    """

    def __init__(self, weight, bias, targets, scale, logit_bias) -> None:
        super().__init__()
        dtype, device = weight.dtype, weight.device
        self.proj = linear_copy(weight, bias)

        def buffer(x):
            return None if x is None else torch.as_tensor(x).detach().to(device, dtype)

        self.register_buffer("targets", buffer(targets))
        self.register_buffer("scale", buffer(scale))
        self.register_buffer("logit_bias", buffer(logit_bias))

    def logits(self, a: torch.Tensor, r: torch.Tensor | None = None) -> torch.Tensor:
        """Similarity logits of the head's inputs against the targets.

        Parameters
        ----------
        a : torch.Tensor
            `(M, d)` activations.
        r : torch.Tensor, optional
            `(M, D)` residual added after the projection.

        Returns
        -------
        torch.Tensor
            `(M, K)` logits ``scale * normalize(W a + b + r) @ targets.T (+ logit_bias)``.
        """
        z = self.proj(a)
        if r is not None:
            z = z + r
        return similarity_logits(F.normalize(z, dim=-1), self.targets, self.scale, self.logit_bias)

    # the module's forward is its logits; the backends' subclasses override forward alone
    forward = logits
