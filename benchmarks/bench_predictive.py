"""Analytic predictive vs the deterministic model and vs laplace's generic Jacobian path.

1. ``predictive_moments`` (diagonal output) for N = 4096 images x C = 1000 classes with
   ViT-B/32 sizes (d_img = 768, d_txt = 512, D = 512) from cached activations, against the
   deterministic logits (projection + normalisation + matmul) on the same activations.
   Targets: probcosine_diag <= 4x, probcosine <= 6x.
2. ``glm`` against upstream laplace's generic path on the same posterior: Jacobians of the
   logits w.r.t. all head parameters by ``torch.func.jacrev`` `(N, C, P)`, then
   ``KronLaplace.functional_variance`` `(N, C, C)`, at a size where the `(N, C, P)` tensor fits
   in memory. Target >= 100x.

Run: python benchmarks/bench_predictive.py [--threads N]
"""

from __future__ import annotations

import os
import sys

import torch
from laplace import KronLaplace
from torch.func import functional_call, jacrev

sys.path.insert(0, os.path.dirname(__file__))
from _common import compare, fmt_bytes, setup, threads_from_argv, vit_b32_posterior  # noqa: E402

N, C = 4096, 1000
D_IMG, D_TXT, D = 768, 512, 512
TARGETS = {"probcosine_diag": 4.0, "probcosine": 6.0}


def deterministic(la, x):
    with torch.no_grad():
        return la.heads(x)  # projection + normalisation + scaled matmul


def generic_glm_covariance(la, x):
    """laplace's generic glm path: dense Jacobians, then the Kronecker inverse square form."""
    names = [name for name, _ in la.heads.named_parameters()]
    shapes = [p.shape for p in la.heads.parameters()]

    def logits(theta):
        params, i = {}, 0
        for name, shape in zip(names, shapes):
            params[name] = theta[i : i + shape.numel()].reshape(shape)
            i += shape.numel()
        return functional_call(la.heads, params, (x,))

    Js = jacrev(logits)(la.mean)  # (N, C, P)
    return KronLaplace.functional_variance(la, Js)


def main() -> None:
    setup(threads_from_argv())
    la = vit_b32_posterior(D_IMG, D_TXT, D)
    g = torch.Generator().manual_seed(1)
    x = {"image": torch.randn(N, D_IMG, generator=g), "text": torch.randn(C, D_TXT, generator=g)}
    print(f"1. N = {N} images x C = {C} classes, d_img = {D_IMG}, d_txt = {D_TXT}, D = {D}, "
          f"float32, {torch.get_num_threads()} threads")  # fmt: skip
    fns = {"deterministic": lambda: deterministic(la, x)}
    for method in ("probcosine_diag", "probcosine", "glm"):
        fns[method] = lambda m=method: la.predictive_moments(x, pred_type=m)
    for method in ("probcosine", "glm"):
        fns[f"{method} (chunk 1024)"] = lambda m=method: la.predictive_moments(
            x, pred_type=m, chunk_size=1024
        )
    t = compare(fns, rounds=7, inner={"deterministic": 3})
    base = t["deterministic"]
    print(f"   deterministic logits          {base * 1e3:8.1f} ms")
    for name, seconds in t.items():
        if name == "deterministic":
            continue
        target = TARGETS.get(name)
        verdict = ""
        if target is not None:
            met = "met" if seconds / base <= target else "MISSED"
            verdict = f"  (target <= {target:.0f}x: {met})"
        print(f"   {name:28s}  {seconds * 1e3:8.1f} ms  {seconds / base:6.2f}x{verdict}")

    n, c = 4, 100
    xs = {"image": x["image"][:n], "text": x["text"][:c]}
    P = sum(p.numel() for p in la.heads.parameters())
    print(f"2. glm vs laplace's generic Jacobian path: N = {n}, C = {c}, P = {P:,} head parameters "
          f"(Jacobians {fmt_bytes(4 * n * c * P)})")  # fmt: skip
    t = compare(
        {
            "generic": lambda: generic_glm_covariance(la, xs),
            "glm_cov": lambda: la.predictive_moments(xs, pred_type="glm", diagonal_output=False),
            "glm_var": lambda: la.predictive_moments(xs, pred_type="glm"),
        },
        rounds=3,
        inner={"glm_cov": 20, "glm_var": 20},
    )
    cov_ref = generic_glm_covariance(la, xs)
    _, cov = la.predictive_moments(xs, pred_type="glm", diagonal_output=False)
    _, var = la.predictive_moments(xs, pred_type="glm")
    err_cov = ((cov - cov_ref).norm() / cov_ref.norm()).item()
    err_var = ((var - cov_ref.diagonal(dim1=1, dim2=2)).abs() / var).max().item()
    assert err_cov < 1e-3 and err_var < 1e-3, (err_cov, err_var)
    for name, label in (
        ("glm_cov", "glm, (N, C, C) covariance"),
        ("glm_var", "glm, (N, C) variance"),
    ):
        ratio = t["generic"] / t[name]
        print(f"   {label:28s}  {t[name] * 1e3:8.2f} ms vs generic {t['generic'] * 1e3:9.1f} ms: "
              f"{ratio:8.1f}x (target >= 100x: {'met' if ratio >= 100 else 'MISSED'})")  # fmt: skip
    print(f"   same result: rel. diff covariance {err_cov:.1e}, variance {err_var:.1e}")


if __name__ == "__main__":
    main()
