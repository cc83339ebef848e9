"""Evidence maximisation: laplace's default Adam loop vs ``maximize_marglik``.

For optima of the prior precision from 1e-2 to 1e5 (moved by scaling the heads: the
embeddings are normalised, so the GGN scales like ``1 / c^2`` and the scatter like ``c^2``),
exact and damped priors, per head, prints the relative error of each method to the optimum of
``la.log_marginal_likelihood`` found by a derivative-free bracketing search (log grid, then
golden section, in float64), with the number of evidence evaluations and the wall time.
Last, the cost of one evaluation (value, gradient and curvature in ``log lambda``): the closed
form of :mod:`laplace_vlm.posterior.kron_evidence` against autograd through laplace's evidence.

Then the case of the issue: the released BayesVLM ViT-B/32 factors (if
``../shared/reference/bayesvlm-clip-vit-b-32`` exists) with random heads of the real heads'
squared norms, 63.66 (image) and 42.14 (text): only the scatter depends on the heads, so the
evidence is the one the issue quotes.

Run: python benchmarks/bench_marglik.py
"""

from __future__ import annotations

import math
import os
import sys
import time
import warnings

import torch
from laplace import KronLaplace

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from _common import setup, threads_from_argv  # noqa: E402
from brute_force import bracketed_argmax  # noqa: E402  (the test's reference search)

from laplace_vlm import DualEncoderLaplace  # noqa: E402
from laplace_vlm.posterior import marglik  # noqa: E402
from laplace_vlm.posterior.kron_evidence import kron_evidence, kron_evidence_parts  # noqa: E402
from laplace_vlm.posterior.marglik import maximize_marglik  # noqa: E402

D_IMG, D_TXT, D, N = 96, 64, 32, 1024
SCALES = {"1e-2": 10.0, "1e0": 1.0, "1e3": 0.03, "1e5": 0.003}
REFERENCE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "reference")
BAYESVLM = os.path.join(REFERENCE, "bayesvlm-clip-vit-b-32")
SQUARED_NORMS = (63.66, 42.14)  # the real ViT-B/32 laion2b heads, image and text


def synthetic(c: float, damping: bool, dtype: torch.dtype) -> DualEncoderLaplace:
    """Random heads of scale ``c`` fitted on N random activation pairs (class batches of 256)."""
    g = torch.Generator().manual_seed(0)
    W_i = c * torch.randn(D, D_IMG, generator=g, dtype=torch.float64)
    W_t = c * torch.randn(D, D_TXT, generator=g, dtype=torch.float64)
    la = DualEncoderLaplace(None, image_projection=W_i.to(dtype), text_projection=W_t.to(dtype),
                            logit_scale=3.0, damping=damping)  # fmt: skip
    a_i = torch.randn(N, D_IMG, generator=g, dtype=torch.float64).to(dtype)
    a_t = torch.randn(N, D_TXT, generator=g, dtype=torch.float64).to(dtype)
    la.fit([(a_i[i : i + 256], a_t[i : i + 256]) for i in range(0, N, 256)])
    return la


def released(damping: bool, dtype: torch.dtype) -> DualEncoderLaplace:
    g = torch.Generator().manual_seed(0)
    heads = []
    for d, sq in zip((768, 512), SQUARED_NORMS):
        W = torch.randn(512, d, generator=g, dtype=torch.float64)
        heads.append((W * math.sqrt(sq) / W.norm()).to(dtype))
    return DualEncoderLaplace.from_bayesvlm(BAYESVLM, image_projection=heads[0],
                                            text_projection=heads[1], logit_scale=math.log(100.0),
                                            damping=damping)  # fmt: skip


def bracketed_optimum(la: DualEncoderLaplace, k: int) -> torch.Tensor:
    """Coordinate-wise log10 grid (1e-5 .. 1e8, step 0.25) then golden section to 1e-9."""

    def evidence(log_prior: torch.Tensor) -> float:
        with torch.no_grad():
            return la.log_marginal_likelihood(prior_precision=log_prior.exp()).item()

    return bracketed_argmax(evidence, k)[0].exp()


def counted(la: DualEncoderLaplace, fn) -> tuple[torch.Tensor, int, float]:
    """``fn()``'s prior precision, the evidence evaluations it made and its wall time."""
    calls = [0]
    evidence, closed_form = la.log_marginal_likelihood, marglik.kron_evidence

    def wrapper(*args, **kwargs):
        calls[0] += 1
        return evidence(*args, **kwargs)

    def closed_wrapper(*args, **kwargs):
        calls[0] += 1
        return closed_form(*args, **kwargs)

    la.log_marginal_likelihood, marglik.kron_evidence = wrapper, closed_wrapper
    try:
        start = time.perf_counter()
        fn()
        seconds = time.perf_counter() - start
    finally:
        del la.log_marginal_likelihood
        marglik.kron_evidence = closed_form
    return la.prior_precision.double().clone(), calls[0], seconds


def old_default(la: DualEncoderLaplace) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        KronLaplace.optimize_prior_precision(la, method="marglik", prior_structure="layerwise")


def row(name: str, reference: torch.Tensor, la: DualEncoderLaplace) -> None:
    old, old_n, old_s = counted(la, lambda: old_default(la))
    new, new_n, new_s = counted(la, lambda: maximize_marglik(la, "layerwise"))

    def err(x: torch.Tensor) -> str:
        return f"{float(((x - reference).abs() / reference).max()):9.2e}"

    print(f"{name:<24} {fmt(reference):>22} | {fmt(old):>22} {err(old)} {old_n:4d} "
          f"{old_s * 1e3:7.1f} ms | {fmt(new):>22} {err(new)} {new_n:4d} {new_s * 1e3:7.1f} ms")  # fmt: skip


def fmt(x: torch.Tensor) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in x.tolist()) + ")"


def header(title: str) -> None:
    print(f"\n{title}")
    print(f"{'case':<24} {'bracketed optimum':>22} | {'old: lambda':>22} {'rel.err':>9} "
          f"{'eval':>4} {'time':>10} | {'new: lambda':>22} {'rel.err':>9} {'eval':>4} "
          f"{'time':>10}")  # fmt: skip


def evaluation_cost(name: str, la: DualEncoderLaplace, k: int, repeats: int = 50) -> None:
    """Microseconds of one evaluation, closed form vs autograd, and their agreement."""
    parts = kron_evidence_parts(la, k)
    t = torch.zeros(k, dtype=torch.float64)
    timings, results = {}, {}
    for label, fn in (("closed form", lambda: kron_evidence(parts, t)),
                      ("autograd", lambda: marglik._gradient_and_curvature(la, t))):  # fmt: skip
        results[label] = fn()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        timings[label] = (time.perf_counter() - start) / repeats
    grad_diff = float((results["closed form"][0] - results["autograd"][0]).abs().max())
    scale = float(results["autograd"][0].abs().max())
    print(f"{name:<40} closed form {timings['closed form'] * 1e6:8.0f} us, autograd "
          f"{timings['autograd'] * 1e6:8.0f} us: {timings['autograd'] / timings['closed form']:5.1f}x "
          f"faster; gradients differ by {grad_diff / scale:.1e} (relative)")  # fmt: skip


def main() -> None:
    setup(threads_from_argv())
    print("one evidence evaluation (value, gradient, curvature in log lambda), per head:")
    for dtype in (torch.float64, torch.float32):
        for damping in (False, True, "symmetric"):
            evaluation_cost(f"synthetic, damping={damping}, {dtype}",
                            synthetic(1.0, damping, dtype), 2)  # fmt: skip
    if os.path.isdir(BAYESVLM):
        evaluation_cost("released ViT-B/32, symmetric, float32",
                        released("symmetric", torch.float32), 2)  # fmt: skip
    for dtype in (torch.float64, torch.float32):
        header(f"synthetic heads (D={D}, d={D_IMG}/{D_TXT}, N={N}), per head, {dtype}")
        for where, c in SCALES.items():
            for damping in (False, True):
                reference = bracketed_optimum(synthetic(c, damping, torch.float64), 2)
                la = synthetic(c, damping, dtype)
                row(f"opt ~{where} {'damped' if damping else 'exact'}", reference, la)
    if not os.path.isdir(BAYESVLM):
        print(f"\n{BAYESVLM} not found: the released-factor case is skipped.")
        return
    for damping in (False, True):
        header(f"released ViT-B/32 factors, heads |W|^2 = {SQUARED_NORMS}, pseudo-count 10")
        reference = bracketed_optimum(released(damping, torch.float64), 2)
        row(
            f"{'damped' if damping else 'exact'} float32",
            reference,
            released(damping, torch.float32),
        )


if __name__ == "__main__":
    main()
