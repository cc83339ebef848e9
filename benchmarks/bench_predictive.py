"""Analytic predictive vs the deterministic model, beside its FLOP floor; memory at C = 32,768.

1. Feature mode: ``predictive_moments`` for N = 4096 images x C = 1000 classes with ViT-B/32
   sizes (d_img = 768, d_txt = 512, D = 512) from cached activations, against the
   deterministic logits (projection + normalisation + matmul) on the same activations.
2. Model mode: ``la(x)`` (probit link over ``probcosine``) on images and tokens through a
   random ViT-B/32, against the deterministic zero-shot pass (``encode_image``,
   ``encode_text``, cosine logits, softmax). Goal: within 1.05x.
3. Peak memory of ``predictive_moments`` at C = 32,768 classes with ``chunk_size``: beyond the
   two `(N, C)` outputs, the class-side tensors every chunk reads (computed in class chunks)
   and one chunk's temporaries; independent of N and of ``chunk_size``.
4. ``glm`` against upstream laplace's generic path on the same posterior: Jacobians of the
   logits w.r.t. all head parameters by ``torch.func.jacrev`` `(N, C, P)`, then
   ``KronLaplace.functional_variance`` `(N, C, C)`. Target >= 100x.

The floor of a predictive is the ratio of floating-point operations, counted by
``torch.utils.flop_counter.FlopCounterMode`` on the very calls that are timed (every
matrix product: the projections, the eigenbasis rotations, the variance and mean GEMMs,
the encoders in model mode); element-wise work counts zero. A ratio at its floor means
that no time goes anywhere but into GEMMs the method needs. Goal: within 1.2x of the floor.

Run: python benchmarks/bench_predictive.py [--threads N] [--skip-model]
"""

from __future__ import annotations

import os
import sys

import torch
from laplace import KronLaplace
from torch.func import functional_call, jacrev
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(__file__))
from _common import (  # noqa: E402
    compare,
    fmt_bytes,
    peak_bytes,
    setup,
    threads_from_argv,
    vit_b32_posterior,
)

N, C = 4096, 1000
D_IMG, D_TXT, D = 768, 512, 512
METHODS = ("probcosine_diag", "probcosine", "glm")
FLOOR_GOAL = 1.2


def flops(fn) -> int:
    """Floating-point operations of one call of ``fn`` (matrix products; 2 per multiply-add)."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    return counter.get_total_flops()


def report(fns: dict, base: str, rounds: int, inner: dict | None = None) -> None:
    """Time ``fns`` interleaved; print each ratio to ``base`` beside its FLOP floor."""
    t = compare(fns, rounds=rounds, inner=inner)
    f = {name: flops(fn) for name, fn in fns.items()}
    print(f"   {base:28s}  {t[base] * 1e3:8.1f} ms  {f[base] / 1e9:7.1f} GFLOP")
    for name, seconds in t.items():
        if name == base:
            continue
        ratio, floor = seconds / t[base], f[name] / f[base]
        verdict = "met" if ratio <= FLOOR_GOAL * floor else "MISSED"
        print(f"   {name:28s}  {seconds * 1e3:8.1f} ms  {f[name] / 1e9:7.1f} GFLOP  "
              f"{ratio:5.2f}x  floor {floor:5.2f}x  at {ratio / floor:4.2f}x of it "
              f"(goal <= {FLOOR_GOAL}: {verdict})")  # fmt: skip


def feature_mode(la) -> None:
    g = torch.Generator().manual_seed(1)
    x = {"image": torch.randn(N, D_IMG, generator=g), "text": torch.randn(C, D_TXT, generator=g)}
    print(f"1. feature mode: N = {N} images x C = {C} classes, d_img = {D_IMG}, d_txt = {D_TXT}, "
          f"D = {D}, float32, {torch.get_num_threads()} threads")  # fmt: skip
    fns = {"deterministic logits": lambda: la.heads(x)}
    for method in METHODS:
        fns[method] = lambda m=method: la.predictive_moments(x, pred_type=m)
    fns["probcosine (chunk 1024)"] = lambda: la.predictive_moments(
        x, pred_type="probcosine", chunk_size=1024
    )
    with torch.no_grad():
        report(fns, "deterministic logits", rounds=7, inner={"deterministic logits": 3})


def model_mode(n_images: int = 64, n_classes: int = 100) -> None:
    import open_clip
    from torch.nn import functional as F

    from laplace_vlm import DualEncoderLaplace

    model = open_clip.create_model("ViT-B-32").eval()  # random weights: the sizes are what count
    g = torch.Generator().manual_seed(2)
    images = torch.randn(n_images, 3, 224, 224, generator=g)
    tokens = torch.randint(1, 49407, (n_classes, 77), generator=g)
    la = DualEncoderLaplace(model, contrastive="clip", prior_precision=10.0)
    fit_pairs = [(torch.randn(32, 3, 224, 224, generator=g), tokens[:32])]
    la.fit(fit_pairs)
    x = {"image": images, "text": tokens}

    def zero_shot():
        u = F.normalize(model.encode_image(images), dim=-1)
        v = F.normalize(model.encode_text(tokens), dim=-1)
        return torch.softmax(model.logit_scale.exp() * u @ v.T, -1)

    print(f"2. model mode: random ViT-B/32, N = {n_images} images x C = {n_classes} classes")
    fns = {"deterministic zero-shot": zero_shot, "la(x), probcosine + probit": lambda: la(x)}
    with torch.no_grad():
        report(fns, "deterministic zero-shot", rounds=3)


def class_memory(la, n: int = 1024, c: int = 32_768, chunk: int = 128) -> None:
    g = torch.Generator().manual_seed(3)
    x = {"image": torch.randn(n, D_IMG, generator=g), "text": torch.randn(c, D_TXT, generator=g)}
    outputs = 2 * 4 * n * c
    # what any chunking keeps for all C classes: inputs a_t, embeddings t, the mean operand
    # (D) and ProbCosine's variance operand (D + d_img): the class-side floor of the memory
    classes = 4 * c * (D_TXT + D + D + D + D_IMG)
    print(f"3. memory: N = {n} x C = {c:,} classes, chunk_size = {chunk}; the two outputs take "
          f"{fmt_bytes(outputs)}, one chunk's (chunk, C) block {fmt_bytes(4 * chunk * c)}")  # fmt: skip
    for method in METHODS:
        for step in (chunk, 4 * chunk):
            with torch.no_grad():
                peak, _ = peak_bytes(lambda m=method, s=step: la.predictive_moments(
                    x, pred_type=m, chunk_size=s))  # fmt: skip
            work = peak - outputs
            print(f"   {method:16s} chunk {step:4d}: peak {fmt_bytes(peak)}, beyond the outputs "
                  f"{fmt_bytes(work)} = {work / classes:4.2f}x the class-side tensors "
                  f"({fmt_bytes(classes)})")  # fmt: skip


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


def generic_comparison(la) -> None:
    g = torch.Generator().manual_seed(4)
    n, c = 4, 100
    xs = {"image": torch.randn(n, D_IMG, generator=g), "text": torch.randn(c, D_TXT, generator=g)}
    P = sum(p.numel() for p in la.heads.parameters())
    print(f"4. glm vs laplace's generic Jacobian path: N = {n}, C = {c}, P = {P:,} head parameters "
          f"(Jacobians {fmt_bytes(4 * n * c * P)})")  # fmt: skip
    cov_fn = lambda: la.predictive_moments(xs, pred_type="glm", class_covariance=True)  # noqa: E731
    t = compare(
        {
            "generic": lambda: generic_glm_covariance(la, xs),
            "glm_cov": cov_fn,
            "glm_var": lambda: la.predictive_moments(xs, pred_type="glm"),
        },
        rounds=3,
        inner={"glm_cov": 20, "glm_var": 20},
    )
    cov_ref = generic_glm_covariance(la, xs)
    _, cov = cov_fn()
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


def main() -> None:
    setup(threads_from_argv())
    la = vit_b32_posterior(D_IMG, D_TXT, D)
    feature_mode(la)
    if "--skip-model" not in sys.argv:
        model_mode()
    class_memory(la)
    generic_comparison(la)


if __name__ == "__main__":
    main()
