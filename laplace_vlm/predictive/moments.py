"""Analytic moments of similarity logits under Gaussian embeddings: glm and ProbCosine.

Three forms, all `(N, C)` and built from GEMMs (never an `(N, C, P)` Jacobian). For speed,
every normalisation and the logit scale are folded into the GEMM operands, what depends only
on the classes is computed once (:func:`class_operands`), and each image chunk writes into
preallocated outputs (:func:`chunk_moments`): no `(N, C)` temporaries besides GEMM results.

- ``glm``: laplace's linearised predictive. The logit ``s u_n^T v_k`` is linearised in the
  head weights; its variance is ``s^2 j^T Cov[z_n] j + s^2 w^T Cov[t_k] w`` with
  ``j = P(z_n) v_k``, ``w = P(t_k) u_n`` and ``P(x) = (I - x x^T / |x|^2) / |x|``.
- ``probcosine_diag``: the paper's ProbCosine, moment matching with diagonal embedding
  covariances (reproduces the reference implementation).
- ``probcosine``: the same moment matching with the full covariances,
  ``Var[z^T t] = mu_z^T C_t mu_z + mu_t^T C_z mu_t + tr(C_z C_t)``.
"""

from __future__ import annotations

import torch

from laplace_vlm.docstrings import fill_doc
from laplace_vlm.enums import PredType
from laplace_vlm.posterior.head_posterior import CovTerm, HeadPosterior
from laplace_vlm.validation import check_matrix

_fill_doc = fill_doc.extend(
    image_chunk="""
        z : torch.Tensor
            `(n, D)` un-normalised image embeddings.
        a : torch.Tensor
            `(n, d_img [+ 1])` their design inputs of the image head.
        post_i : HeadPosterior
            the image head's posterior.
        """,
)


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
        check_matrix(name, value)
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


def glm_covariance(
    z: torch.Tensor,
    terms_z: list[CovTerm],
    t: torch.Tensor,
    cross_terms_t: list[tuple[torch.Tensor, torch.Tensor]],
) -> torch.Tensor:
    """Covariance over classes of the linearised cosine, `(N, C, C)` (multiply by ``s^2``).

    ``cross_terms_t`` are :meth:`HeadPosterior.cross_terms` of the class texts: the classes
    share the text weights, so their logits are correlated through them.

    Parameters
    ----------
    z : torch.Tensor
        `(N, D)` un-normalised image embeddings.
    terms_z : list of tuple of torch.Tensor
        :meth:`HeadPosterior.terms` of the images, ``[(Q (D, D), c (N, D)), ...]``.
    t : torch.Tensor
        `(C, D)` un-normalised class text embeddings.
    cross_terms_t : list of tuple of torch.Tensor
        ``[(R (D, D), e (C, C, D)), ...]``.

    Returns
    -------
    torch.Tensor
        `(N, C, C)` covariance of the cosines, without the factor ``s^2``.
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


def _bases(post: HeadPosterior) -> list[torch.Tensor]:
    """Output-side eigenbases of a head's covariance terms (weight, [bias])."""
    return [post.out_basis] + ([post.bias_basis] if post.bias_basis is not None else [])


def class_operands(
    pred_type: PredType,
    post_i: HeadPosterior,
    post_t: HeadPosterior,
    a_t: torch.Tensor,
    t: torch.Tensor,
    s: torch.Tensor,
) -> dict:
    """Right-hand GEMM operands `(C, K)` shared by all image chunks, with ``s``/``s^2`` in.

    ``probcosine_diag``: ``mean = (z / sqrt(E|z|^2)) (s t / sqrt(E|t|^2))^T`` and
    ``var = [z^2 + v_z, v_z] [v_t, t^2]^T s^2 / (E|z|^2 E|t|^2)``. ``probcosine``: the three
    terms of ``Var[z^T t]`` as one GEMM ``[(z R)^2, c] [e, X]^T`` with
    ``X = (t Q)^2 + e ((Q^T R)^2)^T``. ``glm``: ``var = A + cos (cos (g + h) - 2 B)`` with
    ``A``, ``B`` GEMMs and ``g``, ``h`` the per-image and per-class diagonal parts.

    Parameters
    ----------
    pred_type : PredType
        ``PROBCOSINE``, ``PROBCOSINE_DIAG`` or ``GLM`` (any other is treated as ``GLM``).
    post_i, post_t : HeadPosterior
        the posteriors of the image head and of the text head.
    a_t : torch.Tensor
        `(C, d_txt [+ 1])` class text design inputs of the text head.
    t : torch.Tensor
        `(C, D)` un-normalised class text embeddings.
    s : torch.Tensor
        the linear logit scale.

    Returns
    -------
    dict
        the operands that :func:`chunk_moments` reads for ``pred_type``.
    """
    s2 = s.square()
    if pred_type is PredType.PROBCOSINE_DIAG:
        var_t = post_t.variance(a_t)
        w = s2 / (_sq_norm(t) + var_t.sum(-1))
        var_op = post_i.inv_eig.T @ post_i.out_basis.square().T  # diag Cov[z] = (a Q2)^2 var_op
        Y = (var_t + t.square()) * w[:, None]  # v_z pairs with v_t + t^2
        cols = [var_t * w[:, None], Y @ var_op.T]
        if post_i.bias_basis is not None:  # a constant v_z part: a column of ones on the left
            cols.append((Y @ (post_i.bias_basis.square() @ post_i.bias_inv_eig))[:, None])
        return dict(mean_r=t * w.sqrt()[:, None], var_r=torch.cat(cols, dim=1))
    terms_t = post_t.terms(a_t)
    if pred_type is PredType.PROBCOSINE:
        w = s2 / (_sq_norm(t) + sum(e.sum(-1) for _, e in terms_t))
        cols = [e for _, e in terms_t]  # with (mu_z R)^2: mu_z^T C_t mu_z
        X = []  # with c: mu_t^T C_z mu_t + tr(C_z C_t), per image basis
        for Q in _bases(post_i):
            X.append((t @ Q).square())
            for R, e in terms_t:
                X[-1] = X[-1] + e @ (Q.T @ R).square().T
        cols.append(X[0] @ post_i.inv_eig)  # c @ X^T = (a Q2)^2 (X inv_eig)^T: K = d, not D
        if post_i.bias_basis is not None:  # c_b is the same for every image: a column of ones
            cols.append((X[1] @ post_i.bias_inv_eig)[:, None])
        return dict(
            mean_r=t * w.sqrt()[:, None],
            var_r=torch.cat(cols, dim=1) * w[:, None],
            text_bases=[R for R, _ in terms_t],
        )
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


def _mm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """``a @ b``, into ``out`` when given (the preallocated, no-autograd fast path)."""
    return a @ b if out is None else torch.mm(a, b, out=out)


def _square(x: torch.Tensor, inplace: bool) -> torch.Tensor:
    """``x ** 2``; in place when ``inplace`` (``x`` is a temporary outside autograd)."""
    return x.square_() if inplace else x.square()


def _scale_rows(x: torch.Tensor, scale: torch.Tensor, inplace: bool) -> torch.Tensor:
    """``x * scale[:, None]``; in place when ``inplace`` (``x`` is a temporary)."""
    return x.mul_(scale[:, None]) if inplace else x * scale[:, None]


def _sq_norm(x: torch.Tensor) -> torch.Tensor:
    """Row-wise ``|x|^2`` in one pass (no squared copy of ``x``)."""
    return torch.linalg.vector_norm(x, dim=-1).square()


def expected_sq_norm(
    x: torch.Tensor, a: torch.Tensor, post: HeadPosterior, inplace: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``E|x|^2 = |x|^2 + tr Cov[x]`` of one head's embeddings, and their rotated inputs.

    ``tr Cov[x] = (a Q2)^2 @ inv_eig.sum(0)`` (+ the bias block's trace): the output basis is
    orthonormal, so the trace needs no `(N, D)` coefficients.

    Parameters
    ----------
    x : torch.Tensor
        `(n, D)` mean embeddings.
    a : torch.Tensor
        `(n, d [+ 1])` their design inputs of the head.
    post : HeadPosterior
        the head's posterior.
    inplace : bool, default=False
        square the rotated inputs in place (outside autograd).

    Returns
    -------
    sq_norm : torch.Tensor
        `(n,)` expected squared norms.
    rotated_sq : torch.Tensor
        `(n, d [+ 1])` ``(a Q2)^2``.
    """
    rot2 = _square(a @ post.in_basis, inplace)
    sq_norm = _sq_norm(x) + rot2 @ post.inv_eig.sum(0)
    if post.bias_inv_eig is not None:
        sq_norm = sq_norm + post.bias_inv_eig.sum()
    return sq_norm, rot2


@_fill_doc
def image_operands(
    pred_type: PredType,
    z: torch.Tensor,
    a: torch.Tensor,
    post_i: HeadPosterior,
    ops: dict,
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-hand GEMM operands of ProbCosine for images, against :func:`class_operands`.

    ``mean = scaled @ ops["mean_r"].T`` and ``var = left @ ops["var_r"].T``; the rows of
    ``scaled`` are ``z / sqrt(E|z|^2)``. The image head's rotated inputs ``(a Q2)^2`` give the
    variance terms with the class operands: ``c = (a Q2)^2 inv_eig^T`` is never formed.

    Parameters
    ----------
    pred_type : PredType
        ``PROBCOSINE`` or ``PROBCOSINE_DIAG``.
    %(image_chunk)s
    ops : dict
        :func:`class_operands` of the classes (``text_bases`` for ``PROBCOSINE``).
    inplace : bool, default=False
        reuse temporaries in place (outside autograd).

    Returns
    -------
    scaled : torch.Tensor
        `(n, D)` ``z / sqrt(E|z|^2)``.
    left : torch.Tensor
        `(n, K)` the variance operand.
    """
    sq_norm, rot2 = expected_sq_norm(z, a, post_i, inplace)
    inv = 1.0 / sq_norm
    scaled = _scale_rows(z, inv.sqrt(), False)
    if pred_type is PredType.PROBCOSINE_DIAG:
        cols = [z.square(), rot2]
    else:
        cols = [_square(z @ R, inplace) for R in ops["text_bases"]] + [rot2]
    if post_i.bias_basis is not None:
        cols.append(z.new_ones(len(z), 1))
    return scaled, _scale_rows(torch.cat(cols, 1), inv, inplace)


def pair_moments(
    scaled: torch.Tensor,
    left: torch.Tensor,
    ops: dict,
    rows: torch.Tensor | None = None,
    cols: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ProbCosine mean (without logit bias) and variance of chosen (image, class) pairs.

    The same contraction as :func:`chunk_moments`, one row of the grid per pair (retrieval
    hits) instead of the whole `(n, C)` grid.

    Parameters
    ----------
    scaled, left : torch.Tensor
        :func:`image_operands` of the images, `(n, D)` and `(n, K)`.
    ops : dict
        :func:`class_operands` of the classes.
    rows, cols : torch.Tensor, optional
        `(P,)` long indices of each pair's image and class; None: all images (classes) in
        order, one per pair.

    Returns
    -------
    mean, var : torch.Tensor
        `(P,)` each.
    """

    def pick(x: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
        return x if idx is None else x[idx]

    mean = (pick(scaled, rows) * pick(ops["mean_r"], cols)).sum(-1)
    return mean, (pick(left, rows) * pick(ops["var_r"], cols)).sum(-1)


@_fill_doc
def chunk_moments(
    pred_type: PredType,
    z: torch.Tensor,
    a: torch.Tensor,
    post_i: HeadPosterior,
    ops: dict,
    s: torch.Tensor,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The logit mean (without logit bias) and variance of one image chunk, `(n, C)` each.

    Parameters
    ----------
    pred_type : PredType
        ``probcosine``, ``probcosine_diag`` or ``glm``.
    %(image_chunk)s
    ops : dict
        :func:`class_operands` of the classes.
    s : torch.Tensor
        the linear logit scale.
    out : tuple of torch.Tensor, optional
        `(n, C)` views of preallocated outputs to write into.

    Returns
    -------
    mean, var : torch.Tensor
        `(n, C)` each; the tensors of ``out`` when given.
    """
    mean_out, var_out = (None, None) if out is None else out
    fast = out is not None  # no autograd: in-place squares and scalings, no extra copies
    if pred_type in (PredType.PROBCOSINE_DIAG, PredType.PROBCOSINE):
        scaled, left = image_operands(pred_type, z, a, post_i, ops, fast)
        return _mm(scaled, ops["mean_r"].T, mean_out), _mm(left, ops["var_r"].T, var_out)
    nz = z.norm(dim=-1)
    U = z / nz[:, None]
    inv2 = (1.0 / nz.square())[:, None]
    A_cols, B_cols, g = [], [], 0.0
    for Q, c in post_i.terms(a):
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
    var = _mm(torch.cat(A_cols, 1), ops["A_r"].T, var_out)
    B.mul_(-2.0).addcmul_(cos, (g * s.square())[:, None]).addcmul_(cos, ops["h"][None])
    var.addcmul_(cos, B)
    mean = cos * s if mean_out is None else torch.mul(cos, s, out=mean_out)
    return mean, var
