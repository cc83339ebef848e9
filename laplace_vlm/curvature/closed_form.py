"""Closed-form KFAC of one projection head under a contrastive likelihood, built from GEMMs.

For rows ``z_i`` (un-normalised embeddings of the head), normalised targets ``T`` and logit
scale ``s``, the per-sample GGN of ``z_i`` is ``H_i = s^2 P_i T^T Lambda_i T P_i`` with
``P_i = (I - u_i u_i^T) / n_i``, ``u_i = z_i / n_i``, ``n_i = ||z_i||``. Expanding
``P_i X P_i`` gives ``sum_i H_i`` without any per-sample `(D, D)` tensor (DESIGN.md):

    B / s^2 = T^T diag(sum_i w_ik / n_i^2) T - (U_w^T R + R^T U_w) + U^T diag(g / n^2) U - Q^T Q

with ``R = (w * U T^T) T``, ``g_i = sum_k w_ik (t_k . u_i)^2``, ``U_w`` the rows ``u_i / n_i^2``
and (CLIP only) ``Q`` the rows ``P_i T^T p_i``. Cost ``O(K D^2 + M K D + M D^2)``.
"""

from __future__ import annotations

import torch

from laplace_vlm.curvature.likelihoods import hessian_weights, similarity_logits


def output_factor(
    z: torch.Tensor,
    targets: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    contrastive: str,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Sum over rows of the GGN of the un-normalised embeddings, ``B = sum_i H_i``.

    Parameters
    ----------
    z : torch.Tensor
        `(M, D)` un-normalised embeddings of the head being fitted (``W a + b + r``).
    targets : torch.Tensor
        `(K, D)` *normalised* embeddings of the other tower (the classes), held fixed.
    scale : torch.Tensor
        linear logit scale ``exp(logit_scale)``.
    bias : torch.Tensor, optional
        SigLIP logit bias.
    contrastive : {'clip', 'siglip'}
    chunk_size : int, optional
        rows per chunk; bounds memory at `(chunk_size, K)` with the same result.

    Returns
    -------
    B : torch.Tensor
        `(D, D)`, symmetric positive semi-definite.
    """
    D = z.shape[1]
    B = z.new_zeros(D, D)
    step = chunk_size or len(z)
    for start in range(0, len(z), step):
        B += _output_factor_chunk(z[start : start + step], targets, scale, bias, contrastive)
    return 0.5 * (B + B.T)


def _output_factor_chunk(
    z: torch.Tensor,
    T: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    contrastive: str,
) -> torch.Tensor:
    norms = z.norm(dim=1, keepdim=True)  # (M, 1)
    U = z / norms
    inv_n2 = 1.0 / norms.square()  # (M, 1)
    cos = U @ T.T  # (M, K)
    w = hessian_weights(similarity_logits(U, T, scale, bias), contrastive)  # (M, K)

    # T^T diag(sum_i w_ik / n_i^2) T
    B = (T * (w * inv_n2).sum(0)[:, None]).T @ T
    # -(U_w^T R + R^T U_w), R_i = u_i^T X_i = sum_k w_ik (u_i . t_k) t_k
    R = (w * cos) @ T
    cross = (U * inv_n2).T @ R
    B -= cross + cross.T
    # U^T diag(g / n^2) U with g_i = u_i^T X_i u_i
    g = (w * cos.square()).sum(1, keepdim=True)
    B += (U * (g * inv_n2)).T @ U
    if contrastive == "clip":
        # rank-one part of diag(p) - p p^T: q_i = P_i T^T p_i
        Tp = w @ T  # (M, D)
        Q = (Tp - U * (U * Tp).sum(1, keepdim=True)) * inv_n2.sqrt()
        B -= Q.T @ Q
    return scale.square() * B


def input_factor(activations: torch.Tensor) -> torch.Tensor:
    """Sum of outer products of the head's inputs, ``A = sum_i a_i a_i^T``.

    Parameters
    ----------
    activations : torch.Tensor
        `(M, d)` pre-projection activations.

    Returns
    -------
    A : torch.Tensor
        `(d, d)`
    """
    return activations.T @ activations


def head_factors(
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
    """KFAC factors ``(B, A)`` of one head on one class batch (the curvature-backend interface).

    Parameters
    ----------
    weight : torch.Tensor
        `(D, d)` head weight.
    bias : torch.Tensor, optional
        `(D,)` head bias.
    activations : torch.Tensor
        `(M, d)` inputs of the head.
    residual : torch.Tensor, optional
        `(M, D)` per-row offset added after the head (SigLIP image tower).
    targets : torch.Tensor
        `(K, D)` normalised embeddings of the other tower, the classes.
    scale : torch.Tensor
        linear logit scale.
    logit_bias : torch.Tensor, optional
    contrastive : {'clip', 'siglip'}
    labels : torch.Tensor, optional
        `(M,)` matching class per row; unused here (the GGN does not depend on the labels).
    chunk_size : int, optional

    Returns
    -------
    B, A : torch.Tensor
        `(D, D)` sum of per-row GGNs, `(d, d)` sum of input outer products.
    """
    z = activations @ weight.T
    if bias is not None:
        z = z + bias
    if residual is not None:
        z = z + residual
    return output_factor(z, targets, scale, logit_bias, contrastive, chunk_size), input_factor(
        activations
    )
