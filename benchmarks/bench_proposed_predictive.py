"""The predictive as proposed for the core (issue 5), timed against the current one.

``proposed_predictive_moments(la, x, method, chunk_size)`` is a drop-in for
``DualEncoderLaplace.predictive_moments`` (diagonal output) with three changes; the script
checks it gives the same moments and prints both against the deterministic logits:

1. every normalisation (``1 / sqrt(E|z|^2 E|t|^2)``, ``1 / |z|^2``, ``1 / |t|^2``) and the
   logit scale ``s``, ``s^2`` is folded into the `(rows, D)` GEMM operands, so no `(N, C)`
   temporary is made besides the GEMM results (each costs a memory pass plus page faults);
2. what depends only on the classes (``inv_eig^T (Q1^2)^T``, ``(mu_t Q)^2 + e (Q^T R)^2``,
   ``V Q``, ``V R``, ...) is computed once, not once per image chunk; the GEMMs that share
   a left-hand side are concatenated (``[(mu_z R)^2, c] @ [e; X]^T``: one GEMM of width 2D
   instead of three of width D for full ProbCosine);
3. the outputs are allocated once and each chunk is written into its slice (``out=``): peak
   memory is the outputs plus one chunk's working set (no list of chunks + ``torch.cat``).

Run: python benchmarks/bench_proposed_predictive.py [--threads N] [--n N] [--chunk K]
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import (  # noqa: E402
    compare,
    fmt_bytes,
    peak_bytes,
    setup,
    threads_from_argv,
    vit_b32_posterior,
)

from laplace_vlm.validation import check_nonzero_norm  # noqa: E402


def _bases(post) -> list[torch.Tensor]:
    """The output-side eigenbases of a head posterior's covariance terms (weight, [bias])."""
    return [post.out_basis] + ([post.bias_basis] if post.bias_basis is not None else [])


def text_operands(method: str, post_i, post_t, a_t, t, s) -> dict[str, object]:
    """Right-hand GEMM operands `(C, K)` shared by all image chunks, with ``s``/``s^2`` in."""
    s2 = s.square()
    if method == "probcosine_diag":
        var_t = post_t.variance(a_t)
        tt = t.square().sum(-1) + var_t.sum(-1)
        return dict(
            mean_r=t * (s * tt.rsqrt())[:, None],
            var_r=torch.cat([var_t, t.square()], dim=1) * (s2 / tt)[:, None],
            # diagonal image variance = (a Q2)^2 @ var_op: var_op does not depend on a
            var_op=post_i.inv_eig.T @ post_i.out_basis.square().T,
        )
    terms_t = post_t.terms(a_t)
    if method == "probcosine":
        tt = t.square().sum(-1) + sum(e.sum(-1) for _, e in terms_t)
        cols = [e for _, e in terms_t]  # pairs with (mu_z R)^2: mu_z^T C_t mu_z
        for Q in _bases(post_i):  # X^T = (mu_t Q)^2 + e (Q^T R)^2^T: mu_t^T C_z mu_t + tr(C_z C_t)
            X = (t @ Q).square()
            for R, e in terms_t:
                X = X + e @ (Q.T @ R).square().T
            cols.append(X)
        return dict(
            mean_r=t * (s * tt.rsqrt())[:, None],
            var_r=torch.cat(cols, dim=1) * (s2 / tt)[:, None],
            text_bases=[R for R, _ in terms_t],
        )
    # glm: var = A + cos (cos (g + h) - 2 B) with A = [c/|z|^2, (U R)^2] @ [(V Q)^2, e/|t|^2]^T,
    # B = [c (U Q)/|z|^2, U R] @ [V Q, e (V R)/|t|^2]^T, g_n, h_k the diagonal parts
    nt = t.norm(dim=-1)
    V = t / nt[:, None]
    A_cols, B_cols, h = [], [], 0.0
    for Q in _bases(post_i):
        Vr = V @ Q
        A_cols.append(Vr.square())
        B_cols.append(Vr)
    for R, e in terms_t:
        Vr = V @ R
        w = e / nt[:, None].square()
        A_cols.append(w)
        B_cols.append(w * Vr)
        h = h + (w * Vr.square()).sum(-1)
    return dict(V=V, A_r=torch.cat(A_cols, 1) * s2, B_r=torch.cat(B_cols, 1) * s2, h=h * s2,
                text_bases=[R for R, _ in terms_t])  # fmt: skip


def chunk_moments(method, z, a, post_i, ops, mean_out, var_out, s) -> None:
    """Write the logit mean and variance of one image chunk into ``mean_out``/``var_out``."""
    if method == "probcosine_diag":
        var_z = (a @ post_i.in_basis).square() @ ops["var_op"]
        if post_i.bias_basis is not None:
            var_z = var_z + post_i.bias_basis.square() @ post_i.bias_inv_eig
        inv = 1.0 / (z.square().sum(-1) + var_z.sum(-1))
        torch.mm(z * inv.sqrt()[:, None], ops["mean_r"].T, out=mean_out)
        left = torch.cat([z.square() + var_z, var_z], dim=1) * inv[:, None]
        torch.mm(left, ops["var_r"].T, out=var_out)
    elif method == "probcosine":
        terms_z = post_i.terms(a)
        inv = 1.0 / (z.square().sum(-1) + sum(c.sum(-1) for _, c in terms_z))
        torch.mm(z * inv.sqrt()[:, None], ops["mean_r"].T, out=mean_out)
        cols = [(z @ R).square() for R in ops["text_bases"]] + [c for _, c in terms_z]
        torch.mm(torch.cat(cols, 1) * inv[:, None], ops["var_r"].T, out=var_out)
    else:
        terms_z = post_i.terms(a)
        nz = z.norm(dim=-1)
        U = z / nz[:, None]
        inv2 = (1.0 / nz.square())[:, None]
        A_cols, B_cols, g = [], [], 0.0
        for Q, c in terms_z:
            Ur = U @ Q
            A_cols.append(c * inv2)
            B_cols.append(c * Ur * inv2)
            g = g + (c * Ur.square()).sum(-1) * inv2[:, 0]
        for R in ops["text_bases"]:
            Ur = U @ R
            A_cols.append(Ur.square())
            B_cols.append(Ur)
        cos = U @ ops["V"].T
        B = torch.cat(B_cols, 1) @ ops["B_r"].T
        torch.mm(torch.cat(A_cols, 1), ops["A_r"].T, out=var_out)
        B.mul_(-2.0).addcmul_(cos, (g * s.square())[:, None]).addcmul_(cos, ops["h"][None])
        var_out.addcmul_(cos, B)
        torch.mul(cos, s, out=mean_out)


def proposed_predictive_moments(la, x, method="probcosine", chunk_size=None):
    """``la.predictive_moments(x, method, diagonal_output=True, chunk_size)``, restructured."""
    a_i, r_i, a_t, r_t = la.inputs.predict(x)
    post_i, post_t = la.head_posteriors()
    heads, s = la.heads, la.heads.scale
    step = chunk_size or la.chunk_size or len(a_i)
    with torch.no_grad():
        t = check_nonzero_norm("text embeddings", heads.embed_text(a_t, r_t))
        ops = text_operands(method, post_i, post_t, a_t, t, s)
        mean = t.new_empty(len(a_i), len(t))
        var = t.new_empty(len(a_i), len(t))
        for start in range(0, len(a_i), step):
            rows = slice(start, start + step)
            r = None if r_i is None else r_i[rows]
            z = check_nonzero_norm("image embeddings", heads.embed_image(a_i[rows], r))
            chunk_moments(method, z, a_i[rows], post_i, ops, mean[rows], var[rows], s)
            if heads.logit_bias is not None:
                mean[rows] += heads.logit_bias
    return mean, var


def _arg(name: str, default):
    return type(default)(sys.argv[sys.argv.index(name) + 1]) if name in sys.argv else default


def main() -> None:
    setup(threads_from_argv())
    n, chunk = _arg("--n", 4096), _arg("--chunk", 0) or None
    g = torch.Generator().manual_seed(1)
    x = {"image": torch.randn(n, 768, generator=g), "text": torch.randn(1000, 512, generator=g)}
    print(f"N = {n} x C = 1000, ViT-B/32 sizes, chunk_size = {chunk}, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    for contrastive, extra in (("siglip", {"logit_bias": -2.0}), ("clip", {})):
        # same moments in float64, with head biases (and SigLIP's logit bias)
        torch.set_default_dtype(torch.float64)
        small = vit_b32_posterior(48, 40, 32, contrastive, fit_batches=2, batch=64, bias=True,
                                  **extra)  # fmt: skip
        torch.set_default_dtype(torch.float32)
        xs = {"image": torch.randn(50, 48, dtype=torch.float64),
              "text": torch.randn(30, 40, dtype=torch.float64)}  # fmt: skip
        for method in ("probcosine_diag", "probcosine", "glm"):
            want = small.predictive_moments(xs, method=method, chunk_size=16)
            got = proposed_predictive_moments(small, xs, method, chunk_size=16)
            for w, o in zip(want, got):
                torch.testing.assert_close(o, w, rtol=1e-10, atol=1e-12)
    print("  same moments as the core (float64, rtol 1e-10; CLIP and SigLIP, head biases)")
    la = vit_b32_posterior()

    def det():
        with torch.no_grad():
            return la.heads(x)

    fns = {"det": det}
    for method in ("probcosine_diag", "probcosine", "glm"):
        fns[f"{method} current"] = lambda m=method: la.predictive_moments(x, m, chunk_size=chunk)
        fns[f"{method} proposed"] = lambda m=method: proposed_predictive_moments(la, x, m, chunk)
    t = compare(fns, rounds=7 if n <= 10_000 else 3, inner={"det": 3})
    peak_det, _ = peak_bytes(det)
    print(
        f"  deterministic logits        {t['det'] * 1e3:8.1f} ms          "
        f"peak {fmt_bytes(peak_det)}"
    )
    for name, seconds in t.items():
        if name != "det":
            peak, _ = peak_bytes(fns[name])
            print(f"  {name:26s}  {seconds * 1e3:8.1f} ms  {seconds / t['det']:5.2f}x  peak "
                  f"{fmt_bytes(peak)} ({peak / peak_det:.2f}x)")  # fmt: skip


if __name__ == "__main__":
    main()
