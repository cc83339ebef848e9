"""Closed-form KFAC of one head vs the per-sample einsum, M = K = 1024 pairs, d = D = 512.

The per-sample baseline builds each row's Jacobian of the logits w.r.t. the embedding,
``J_i = s T P_i`` `(K, D)`, and sums ``J_i^T (diag p_i - p_i p_i^T) J_i`` (CLIP) or
``J_i^T diag(w_i) J_i`` (SigLIP) with einsums over chunks of rows. The logit Hessian is
applied in its structured form (never a `(K, K)` matrix per row), which makes it the
strongest per-sample baseline: O(M K D^2) against the closed form's O(K D^2 + M K D + M D^2).
Both compute ``A = sum a a^T`` the same way. Target: >= 50x at the same result.

Run: python benchmarks/bench_kfac.py
"""

from __future__ import annotations

import os
import sys

import torch
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(__file__))
from _common import compare, setup, threads_from_argv  # noqa: E402

from laplace_vlm.curvature.closed_form import head_factors  # noqa: E402
from laplace_vlm.curvature.likelihoods import hessian_weights  # noqa: E402

M = K = 1024
d = D = 512
ROWS_PER_CHUNK = 32  # J chunk (32, K, D) float32 = 64 MiB


def per_sample_factors(W, a, targets, scale, bias, contrastive):
    """``sum_i J_i^T Lambda_i J_i`` and ``sum_i a_i a_i^T`` row by row (batched einsums)."""
    z = a @ W.T
    B = z.new_zeros(D, D)
    for s in range(0, len(z), ROWS_PER_CHUNK):
        zc = z[s : s + ROWS_PER_CHUNK]
        n = zc.norm(dim=1, keepdim=True)
        u = zc / n
        logits = scale * u @ targets.T + (0.0 if bias is None else bias)
        w = hessian_weights(logits, contrastive)  # (m, K)
        # J_i = s T P_i with P_i = (I - u u^T) / n: (m, K, D)
        J = scale * (targets[None] - (targets @ u.T).T[..., None] * u[:, None]) / n[..., None]
        B += torch.einsum("mkd,mk,mke->de", J, w, J)
        if contrastive == "clip":
            Jp = torch.einsum("mkd,mk->md", J, w)
            B -= Jp.T @ Jp
    return 0.5 * (B + B.T), a.T @ a


def main() -> None:
    setup(threads_from_argv())
    g = torch.Generator().manual_seed(0)
    W = torch.randn(D, d, generator=g) / d**0.5
    a = torch.randn(M, d, generator=g)
    targets = F.normalize(torch.randn(K, D, generator=g), dim=-1)
    scale = torch.tensor(100.0)  # CLIP's exp(4.6)
    print(f"KFAC of one head: M = {M} rows, K = {K} classes, d = {d}, D = {D}, float32, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    for contrastive, bias in (("clip", None), ("siglip", torch.tensor(-10.0))):
        if contrastive == "siglip":
            scale = torch.tensor(10.0)

        def closed():
            return head_factors(W, None, a, None, targets, scale, bias, contrastive)

        def einsum():
            return per_sample_factors(W, a, targets, scale, bias, contrastive)

        t = compare({"closed": closed, "einsum": einsum}, rounds=3, inner={"closed": 10})
        t_closed, t_einsum = t["closed"], t["einsum"]
        (B0, A0), (B1, A1) = closed(), einsum()
        assert torch.equal(A0, A1)  # the same GEMM on both sides
        err = ((B0 - B1).norm() / B1.norm()).item()
        # same result in float64 (first 128 rows): agreement to rounding
        args64 = (W.double(), a[:128].double(), targets.double(), scale.double(),
                  None if bias is None else bias.double(), contrastive)  # fmt: skip
        B0d = head_factors(args64[0], None, args64[1], None, *args64[2:])[0]
        B1d = per_sample_factors(*args64)[0]
        err64 = ((B0d - B1d).norm() / B1d.norm()).item()
        ratio = t_einsum / t_closed
        print(f"  {contrastive:6s}: closed form {t_closed * 1e3:8.1f} ms | per-sample einsum "
              f"{t_einsum * 1e3:9.1f} ms | speed-up {ratio:7.1f}x (target >= 50x: "
              f"{'met' if ratio >= 50 else 'MISSED'}) | rel. diff of B: float32 {err:.1e}, "
              f"float64 {err64:.1e}")  # fmt: skip
        assert err < 1e-4 and err64 < 1e-10, (err, err64)


if __name__ == "__main__":
    main()
