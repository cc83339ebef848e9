"""Analytic moments of similarity logits under Gaussian embeddings, and the probit links.

Three forms, all `(N, C)` and built from GEMMs (never an `(N, C, P)` Jacobian):

- ``glm``: laplace's linearised predictive. The logit ``s u_n^T v_k`` is linearised in the
  head weights; its variance is ``s^2 j^T Cov[z_n] j + s^2 w^T Cov[t_k] w`` with
  ``j = P(z_n) v_k``, ``w = P(t_k) u_n`` and ``P(x) = (I - x x^T / |x|^2) / |x|``.
- ``probcosine_diag``: the paper's ProbCosine, moment matching with diagonal embedding
  covariances (reproduces the reference implementation).
- ``probcosine``: the same moment matching with the full covariances,
  ``Var[z^T t] = mu_z^T C_t mu_z + mu_t^T C_z mu_t + tr(C_z C_t)``.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from laplace_vlm.head_posterior import CovTerm, HeadPosterior

PREDICTIVE_METHODS: tuple[str, ...] = ("glm", "probcosine", "probcosine_diag")


def probcosine(
    mean_a: torch.Tensor, var_a: torch.Tensor, mean_b: torch.Tensor, var_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of the cosine of independent diagonal Gaussians (ProbCosine).

    ``E[cos] = mu_a.mu_b / sqrt(E|a|^2 E|b|^2)`` and
    ``Var[cos] = sum_d [(mu_a^2 + v_a) v_b + v_a mu_b^2] / (E|a|^2 E|b|^2)``: the numerator is
    the exact ``Var[a^T b]``; the norms are replaced by their root mean squares.

    Parameters
    ----------
    mean_a, var_a : torch.Tensor
        `(N, D)` means and variances of the first set of embeddings.
    mean_b, var_b : torch.Tensor
        `(C, D)` means and variances of the second set.

    Returns
    -------
    mean, var : torch.Tensor
        `(N, C)` each.
    """
    for name, value in (("mean_a", mean_a), ("var_a", var_a), ("mean_b", mean_b), ("var_b", var_b)):
        if value.ndim != 2:
            raise ValueError(f"{name} must be 2-D (rows, D), got shape {tuple(value.shape)}.")
        if not torch.isfinite(value).all():
            raise ValueError(f"{name} contains NaN or inf.")
    if mean_a.shape != var_a.shape or mean_b.shape != var_b.shape:
        raise ValueError("each mean must have the shape of its variance.")
    if mean_a.shape[1] != mean_b.shape[1]:
        raise ValueError(f"embedding dims differ: {mean_a.shape[1]} vs {mean_b.shape[1]}.")
    if (var_a < 0).any() or (var_b < 0).any():
        raise ValueError("variances must be non-negative.")
    norm2 = _expected_sq_norm(mean_a, var_a)[:, None] * _expected_sq_norm(mean_b, var_b)[None]
    if (norm2 == 0).any():
        raise ValueError("zero-norm embedding with zero variance: the cosine is undefined.")
    numer = (mean_a.square() + var_a) @ var_b.T + var_a @ mean_b.square().T
    return (mean_a @ mean_b.T) / norm2.sqrt(), numer / norm2


def _expected_sq_norm(mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    return mean.square().sum(-1) + var.sum(-1)


def probcosine_full(
    mean_z: torch.Tensor,
    terms_z: list[CovTerm],
    mean_t: torch.Tensor,
    terms_t: list[CovTerm],
) -> tuple[torch.Tensor, torch.Tensor]:
    """ProbCosine with full embedding covariances ``C = sum_terms Q diag(c) Q^T``.

    Parameters
    ----------
    mean_z : torch.Tensor
        `(N, D)` image embedding means.
    terms_z : list of (torch.Tensor, torch.Tensor)
        image covariance terms ``(Q (D, D), c (N, D))``.
    mean_t : torch.Tensor
        `(C, D)` text embedding means.
    terms_t : list of (torch.Tensor, torch.Tensor)
        text covariance terms ``(R (D, D), e (C, D))``.

    Returns
    -------
    mean, var : torch.Tensor
        `(N, C)` mean and variance of the cosine.
    """
    trace_z = mean_z.square().sum(-1) + sum(c.sum(-1) for _, c in terms_z)
    trace_t = mean_t.square().sum(-1) + sum(e.sum(-1) for _, e in terms_t)
    norm2 = trace_z[:, None] * trace_t[None]
    var = 0.0
    for R, e in terms_t:  # mu_z^T C_t mu_z
        var = var + (mean_z @ R).square() @ e.T
    for Q, c in terms_z:  # mu_t^T C_z mu_t and tr(C_z C_t)
        var = var + c @ (mean_t @ Q).square().T
        for R, e in terms_t:
            var = var + c @ ((Q.T @ R).square() @ e.T)
    return (mean_z @ mean_t.T) / norm2.sqrt(), var / norm2


def glm_variance(
    z: torch.Tensor, terms_z: list[CovTerm], t: torch.Tensor, terms_t: list[CovTerm]
) -> torch.Tensor:
    """Variance of the linearised cosine ``u_n^T v_k``, `(N, C)` (multiply by ``s^2``).

    Parameters
    ----------
    z : torch.Tensor
        `(N, D)` un-normalised image embeddings at the MAP.
    terms_z : list of (torch.Tensor, torch.Tensor)
        image covariance terms ``(Q, c (N, D))``.
    t : torch.Tensor
        `(C, D)` un-normalised text embeddings at the MAP.
    terms_t : list of (torch.Tensor, torch.Tensor)
        text covariance terms ``(R, e (C, D))``.
    """
    nz, nt = z.norm(dim=-1), t.norm(dim=-1)
    U, V = z / nz[:, None], t / nt[:, None]
    cos = U @ V.T
    return (
        _side_variance(U, V, cos, terms_z) / nz[:, None].square()
        + _side_variance(V, U, cos.T, terms_t).T / nt[None].square()
    )


def _side_variance(U, V, cos, terms) -> torch.Tensor:
    """``sum_i c_ni ((Q^T v_k)_i - (Q^T u_n)_i cos_nk)^2`` for all n, k: `(N, K)`."""
    out = 0.0
    for Q, c in terms:
        Ur, Vr = U @ Q, V @ Q
        out = out + (
            c @ Vr.square().T
            - 2 * cos * ((c * Ur) @ Vr.T)
            + cos.square() * (c * Ur.square()).sum(-1, keepdim=True)
        )
    return out


def glm_covariance(
    z: torch.Tensor,
    terms_z: list[CovTerm],
    t: torch.Tensor,
    cross_terms_t: list[tuple[torch.Tensor, torch.Tensor]],
) -> torch.Tensor:
    """Covariance over classes of the linearised cosine, `(N, C, C)` (multiply by ``s^2``).

    ``cross_terms_t`` are :meth:`HeadPosterior.cross_terms` of the class texts: the classes
    share the text weights, so their logits are correlated through them.
    """
    nz, nt = z.norm(dim=-1), t.norm(dim=-1)
    U, V = z / nz[:, None], t / nt[:, None]
    cos = U @ V.T
    cov = 0.0
    for Q, c in terms_z:
        J = (V @ Q)[None] - (U @ Q)[:, None] * cos[..., None]  # (N, C, D)
        cov = cov + torch.einsum("nki,ni,nli->nkl", J, c, J) / nz[:, None, None].square()
    for R, e in cross_terms_t:
        W = ((U @ R)[:, None] - (V @ R)[None] * cos[..., None]) / nt[None, :, None]
        cov = cov + torch.einsum("nki,kli,nli->nkl", W, e, W)
    return cov


def probit_scale(var: torch.Tensor) -> torch.Tensor:
    """MacKay's probit factor ``1 / sqrt(1 + pi/8 var)``."""
    return torch.rsqrt(1.0 + math.pi / 8.0 * var)


def probit_softmax(mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """Probit approximation of ``E[softmax(f)]`` per row, `(N, C)`."""
    return torch.softmax(mean * probit_scale(var), dim=-1)


def probit_sigmoid(mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """Probit approximation of ``E[sigmoid(f)]`` per pair (SigLIP), `(N, C)`."""
    return torch.sigmoid(mean * probit_scale(var))


def link_function(link: str):
    """``softmax`` over classes or SigLIP's per-pair ``sigmoid``, applied to logits."""
    if link == "softmax":
        return lambda f: torch.softmax(f, dim=-1)
    if link == "sigmoid":
        return torch.sigmoid
    raise ValueError(f"link must be 'softmax' or 'sigmoid', got {link!r}.")


def text_spread(method: str, diagonal_output: bool, post: HeadPosterior, a_t: torch.Tensor):
    """What ``logit_moments`` needs of the class texts: variances, terms or cross terms."""
    if method == "probcosine_diag":
        return post.variance(a_t)
    if method == "glm" and not diagonal_output:
        return post.cross_terms(a_t)
    return post.terms(a_t)


def logit_moments(method, diagonal_output, z, post_i, a_i, t, spread_t):
    """Cosine mean and variance `(N, C)` (or covariance `(N, C, C)`) for one image chunk."""
    if method == "probcosine_diag":
        return probcosine(z, post_i.variance(a_i), t, spread_t)
    if method == "probcosine":
        return probcosine_full(z, post_i.terms(a_i), t, spread_t)
    mean = F.normalize(z, dim=-1) @ F.normalize(t, dim=-1).T
    if diagonal_output:
        return mean, glm_variance(z, post_i.terms(a_i), t, spread_t)
    return mean, glm_covariance(z, post_i.terms(a_i), t, spread_t)
