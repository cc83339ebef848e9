"""Dense reference computations for tests: per-sample einsums, full Jacobians, dense posteriors."""

from __future__ import annotations

import torch
from torch.func import functional_call, jacrev
from torch.nn import functional as F

from laplace_vlm.curvature.likelihoods import hessian_weights


def logit_hessian(logits: torch.Tensor, contrastive: str) -> torch.Tensor:
    """`(M, K, K)` Hessian of the NLL of each row w.r.t. its logits."""
    w = hessian_weights(logits, contrastive)
    lam = torch.diag_embed(w)
    return lam - w[:, :, None] * w[:, None, :] if contrastive == "clip" else lam


def per_sample_ggn(z, targets, scale, bias, contrastive) -> torch.Tensor:
    """sum_i J_i^T Lambda_i J_i with J_i = d logits_i / d z_i by autodiff, `(D, D)`."""

    def row_logits(zi):
        out = scale * F.normalize(zi, dim=-1) @ targets.T
        return out if bias is None else out + bias

    J = torch.stack([jacrev(row_logits)(zi) for zi in z])  # (M, K, D)
    logits = torch.stack([row_logits(zi) for zi in z])
    return torch.einsum("mkd,mkl,mle->de", J, logit_hessian(logits, contrastive), J)


def param_vector_logits(la, x: dict) -> callable:
    """theta -> logits `(N, C)` through the heads, for Jacobians over all head parameters."""
    names = [n for n, p in la.heads.named_parameters()]
    shapes = [p.shape for p in la.heads.parameters()]

    def f(theta):
        params, i = {}, 0
        for name, shape in zip(names, shapes):
            n = shape.numel()
            params[name] = theta[i : i + n].reshape(shape)
            i += n
        return functional_call(la.heads, params, (x,))

    return f


def dense_posterior_covariance(la) -> torch.Tensor:
    """`(P, P)` inverse of laplace's dense posterior precision."""
    return torch.linalg.inv(la.posterior_precision.to_matrix())


def dense_glm_moments(la, x: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Linearised logit mean `(N, C)` and covariance `(N, C, C)`: J Sigma J^T by autodiff."""
    f = param_vector_logits(la, x)
    J = jacrev(f)(la.mean)  # (N, C, P)
    Sigma = dense_posterior_covariance(la)
    return f(la.mean), torch.einsum("ncp,pq,ndq->ncd", J, Sigma, J)
