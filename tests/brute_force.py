"""Dense reference computations for tests: per-sample einsums, full Jacobians, dense posteriors."""

from __future__ import annotations

import math

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


def bracketed_argmax(
    objective, k: int, sweeps: int = 1, dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, float, bool]:
    """Coordinate-wise, derivative-free maximiser of ``objective(t)`` over ``t`` `(k,)`.

    Each coordinate: the best point of a log10 grid (1e-5 .. 1e8 in ``exp(t)``, step 0.25), then
    golden-section search inside its two neighbours to 1e-9 in ``t``; ``sweeps`` passes over
    the coordinates. The reference for evidence maximisation (``t`` = log prior precisions).

    Returns ``(t, moved, inside)``: the maximiser, the largest change of a coordinate in the
    last sweep (``inf`` after one), and whether every grid optimum was an interior point.
    """
    grid = torch.arange(-5.0, 8.0 + 1e-9, 0.25, dtype=dtype) * math.log(10.0)
    t = torch.zeros(k, dtype=dtype)
    invphi = (math.sqrt(5) - 1) / 2
    moved, inside = math.inf, True

    def f(i: int, ti: float) -> float:
        s = t.clone()
        s[i] = ti
        return objective(s)

    for _ in range(sweeps):
        before = t.clone()
        for i in range(k):
            values = [f(i, float(x)) for x in grid]
            j = max(range(len(grid)), key=values.__getitem__)
            inside &= 0 < j < len(grid) - 1
            a, b = float(grid[max(j - 1, 0)]), float(grid[min(j + 1, len(grid) - 1)])
            c, d = b - invphi * (b - a), a + invphi * (b - a)
            fc, fd = f(i, c), f(i, d)
            while b - a > 1e-9:
                if fc > fd:
                    b, d, fd = d, c, fc
                    c = b - invphi * (b - a)
                    fc = f(i, c)
                else:
                    a, c, fc = c, d, fd
                    d = a + invphi * (b - a)
                    fd = f(i, d)
            t[i] = (a + b) / 2
        moved = (t - before).abs().max().item() if sweeps > 1 else math.inf
    return t, moved, inside
