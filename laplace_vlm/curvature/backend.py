"""The curvature-backend interface: the KFAC factors ``(B, A)`` of one head on one class batch.

Every backend is a :class:`HeadCurvature` whose subclasses differ in one thing, how the library
(or the closed form) computes the sums; the arguments, their checks and the symmetrisation of
``B`` live here once, as in curvlinops' ``KFACLinearOperator`` family.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import torch

from laplace_vlm.curvature.likelihoods import check_contrastive


@dataclass(frozen=True)
class HeadBatch:
    """The checked inputs of one head on one class batch: what a backend computes on.

    Attributes
    ----------
    weight : torch.Tensor
        `(D, d)` head weight, detached, in the dtype of ``activations``.
    bias : torch.Tensor or None
        `(D,)` head bias.
    activations : torch.Tensor
        `(M, d)` inputs of the head, detached.
    residual : torch.Tensor or None
        `(M, D)` per-row offset added after the head, detached, in the dtype of ``activations``.
    targets : torch.Tensor
        `(K, D)` normalised embeddings of the other tower, detached, in that dtype too.
    scale : torch.Tensor
        the linear logit scale.
    logit_bias : torch.Tensor or None
        SigLIP's logit bias.
    contrastive : {'clip', 'siglip'}
        the checked contrastive type.
    labels : torch.Tensor
        `(M,)` matching class per row.
    step : int
        rows per chunk (all ``M`` rows without ``chunk_size``).
    """

    weight: torch.Tensor
    bias: torch.Tensor | None
    activations: torch.Tensor
    residual: torch.Tensor | None
    targets: torch.Tensor
    scale: torch.Tensor
    logit_bias: torch.Tensor | None
    contrastive: str
    labels: torch.Tensor
    step: int


class HeadCurvature(abc.ABC):
    """Base class of the curvature backends; an instance is the backend's ``head_factors``.

    A backend overrides :meth:`factors`; calling the instance checks the arguments, gathers
    them in a :class:`HeadBatch` and symmetrises ``B``.
    """

    def __call__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        activations: torch.Tensor,
        residual: torch.Tensor | None,
        targets: torch.Tensor,
        scale: torch.Tensor,
        logit_bias: torch.Tensor | None,
        contrastive: str,
        labels: torch.Tensor | None = None,
        chunk_size: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """KFAC factors ``(B, A)`` of one head on one class batch, unscaled.

        Parameters
        ----------
        weight : torch.Tensor
            `(D, d)` head weight.
        bias : torch.Tensor, optional
            `(D,)` head bias.
        activations : torch.Tensor
            `(M, d)` inputs of the head.
        residual : torch.Tensor, optional
            `(M, D)` per-row offset added after the head (SigLIP's image tower).
        targets : torch.Tensor
            `(K, D)` normalised embeddings of the other tower: the classes of each row.
        scale : torch.Tensor
            the linear logit scale.
        logit_bias : torch.Tensor, optional
            SigLIP's logit bias.
        contrastive : {'clip', 'siglip'}
            softmax over the K classes, or independent sigmoids per pair.
        labels : torch.Tensor, optional
            `(M,)` matching class per row, default ``arange(M) % K``; the GGN does not depend on
            them (libraries that need targets for their loss get them).
        chunk_size : int, optional
            rows per chunk; the factors are summed over chunks (memory bound, same result).

        Returns
        -------
        B : torch.Tensor
            `(D, D)` sum of the per-row GGNs of the embedding, symmetrised.
        A : torch.Tensor
            `(d, d)` sum of the input outer products ``a a^T``.
        """
        contrastive = check_contrastive(contrastive)
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}.")
        M, K = len(activations), len(targets)
        if labels is None:
            labels = torch.arange(M, device=activations.device) % K
        dtype = activations.dtype
        residual = None if residual is None else residual.detach().to(dtype)
        batch = HeadBatch(weight.detach().to(dtype), bias, activations.detach(), residual,
                          targets.detach().to(dtype), scale, logit_bias, contrastive, labels,
                          chunk_size or M)  # fmt: skip
        B, A = self.factors(batch)
        return 0.5 * (B + B.T), A

    @abc.abstractmethod
    def factors(self, batch: HeadBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """The backend's own computation of ``(B, A)``, before ``B`` is symmetrised.

        Parameters
        ----------
        batch : HeadBatch
            the head and its class batch, checked and detached by :meth:`__call__`.

        Returns
        -------
        B : torch.Tensor
            `(D, D)` sum of the per-row GGNs of the embedding; :meth:`__call__` symmetrises it.
        A : torch.Tensor
            `(d, d)` ``sum_i a_i a_i^T`` over the rows of ``batch.activations``.
        """
