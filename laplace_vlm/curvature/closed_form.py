"""Closed-form KFAC of the projection heads under a contrastive likelihood, built from GEMMs.

For rows ``z_i`` (un-normalised embeddings of the head), normalised targets ``T`` `(K, D)` and
logit scale ``s``, the per-sample GGN of ``z_i`` is ``H_i = s^2 P_i T^T Lambda_i T P_i`` with
``P_i = (I - u_i u_i^T) / n_i``, ``u_i = z_i / n_i``, ``n_i = ||z_i||`` and ``Lambda_i =
diag(w_i) - w_i w_i^T`` (CLIP, ``w_i`` the softmax of row ``i``'s logits) or ``diag(w_i)``
(SigLIP, ``w = sigma(l) sigma(-l)``). Expanding ``P_i X P_i`` gives ``sum_i H_i`` without any
per-sample `(D, D)` tensor:

    B / s^2 = T^T diag(c) T - (N + N^T),    N = X^T Y + Q^T Q / 2

with ``c_k = sum_i w_ik / n_i^2``, the rows ``x_i = u_i / n_i^2``, ``y_i = r_i - (g_i / 2) u_i``,
``r_i = sum_k w_ik cos_ik t_k``, ``g_i = u_i . r_i = sum_k w_ik cos_ik^2`` and (CLIP only)
``q_i = P_i T^T w_i``. (``N + N^T`` is ``U_w^T R + R^T U_w - U^T diag(g / n^2) U + Q^T Q``,
``U_w`` the rows ``x_i``.)

Cost per head of a class batch of ``M`` rows and ``K`` classes: the logits ``(s U) T^T`` and
one stacked `(2M, K) @ (K, D)` product ``[p * l; p] T`` (CLIP, ``p`` the row softmax) or
``(w * l) T`` (SigLIP): 3 (CLIP) or 2 (SigLIP) GEMMs of ``2 M K D`` FLOPs; then ``[X; Q]^T
[Y; Q/2]`` (``4 M D^2``; SigLIP ``X^T Y``, ``2 M D^2``) and ``T^T diag(c) T`` (``2 K D^2``).
Row chunks of ``chunk_size`` bound the working set at two `(chunk, K)` buffers, allocated
once and reused; the elementwise work runs in them in place, in row tiles that stay in
cache on CPU (:data:`_TILE`).

:func:`pair_factors` does both heads of a class batch (the texts are the classes of the
images and vice versa) and its loss, which comes from the softmax (CLIP) or log-sigmoid
(SigLIP) computed anyway: no logit matrix of its own. SigLIP's weights are one matrix for
both heads, so one logit matrix serves both (3 GEMMs of ``2 M K D`` in all). CLIP's text
head needs a softmax over the images, the columns of the image head's logits: each head
runs its own row chunks (6 GEMMs), which bounds memory by ``chunk_size`` and keeps every
reduction along contiguous rows (column passes cost more than the GEMM they would save).
"""

from __future__ import annotations

import torch

from laplace_vlm.curvature.backend import HeadBatch, HeadCurvature


def input_factor(activations: torch.Tensor) -> torch.Tensor:
    """Sum of outer products of the head's inputs, ``A = sum_i a_i a_i^T``.

    Parameters
    ----------
    activations : torch.Tensor
        `(M, d)` the head's inputs ``a_i``, one row per example.

    Returns
    -------
    A : torch.Tensor
        `(d, d)` symmetric positive semi-definite, in the dtype of ``activations``.
    """
    return activations.T @ activations


@torch.no_grad()
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
        softmax over the classes of each row, or independent sigmoids per pair.
    chunk_size : int, optional
        rows per chunk; bounds memory at two `(chunk_size, K)` buffers with the same result.

    Returns
    -------
    B : torch.Tensor
        `(D, D)`, symmetric positive semi-definite.
    """
    U, inv_n = _tower(z)
    step = _step(chunk_size, len(z))
    if contrastive == "clip":
        return _softmax_head(U, inv_n, targets, scale, step)[0]
    return _sigmoid_heads(U, inv_n, targets, scale, bias, step)[0]


@torch.no_grad()
def pair_factors(
    z: torch.Tensor,
    image_activations: torch.Tensor,
    t: torch.Tensor,
    text_activations: torch.Tensor,
    scale: torch.Tensor,
    logit_bias: torch.Tensor | None,
    contrastive: str,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """KFAC factors of both heads and the summed loss of one class batch of matched pairs.

    The same result as :func:`head_factors` for each head (the other tower normalised, at
    its MAP) plus :func:`laplace_vlm.curvature.likelihoods.pair_loss`, from fewer logit
    matrices (module docstring).

    Parameters
    ----------
    z, t : torch.Tensor
        `(M, D)` un-normalised image and text embeddings of matched pairs (pair ``i`` is row
        ``i`` of both), heads' biases and residuals included.
    image_activations, text_activations : torch.Tensor
        `(M, d_img)`, `(M, d_txt)` the heads' inputs.
    scale : torch.Tensor
        linear logit scale.
    logit_bias : torch.Tensor, optional
        SigLIP's logit bias.
    contrastive : {'clip', 'siglip'}
        InfoNCE in both directions (images over texts, texts over images), or the pairwise
        sigmoid of every image-text pair.
    chunk_size : int, optional
        rows per chunk; bounds memory at a few `(chunk_size, M)` buffers with the same result.

    Returns
    -------
    B_image, A_image, B_text, A_text, loss : torch.Tensor
        `(D, D)`, `(d_img, d_img)`, `(D, D)`, `(d_txt, d_txt)` and the summed NLL (CLIP: both
        directions; SigLIP: each pair once).
    """
    U, inv_n = _tower(z)
    V, inv_m = _tower(t)
    step = _step(chunk_size, len(z))
    if contrastive == "clip":
        work = U.new_empty(2 * step * max(len(U), len(V)))  # shared by the two heads
        B_i, loss_i = _softmax_head(U, inv_n, V, scale, step, work, loss=True)
        B_t, loss_t = _softmax_head(V, inv_m, U, scale, step, work, loss=True)
        loss = loss_i + loss_t
    else:
        B_i, B_t, loss = _sigmoid_heads(U, inv_n, V, scale, logit_bias, step, inv_m)
    return B_i, input_factor(image_activations), B_t, input_factor(text_activations), loss


class ClosedFormCurvature(HeadCurvature):
    """The GGN from GEMMs (the default backend); both heads at once with :meth:`pair_factors`."""

    @torch.no_grad()
    def factors(self, batch: HeadBatch) -> tuple[torch.Tensor, torch.Tensor]:
        z = batch.activations @ batch.weight.T
        if batch.bias is not None:
            z += batch.bias
        if batch.residual is not None:
            z += batch.residual
        B = output_factor(z, batch.targets, batch.scale, batch.logit_bias, batch.contrastive,
                          batch.step)  # fmt: skip
        return B, input_factor(batch.activations)

    # both heads' factors and the loss from shared logits (``DualEncoderLaplace.fit`` uses it)
    pair_factors = staticmethod(pair_factors)


head_factors = ClosedFormCurvature()


# ----------------------------------------------------------------------------- helpers
_TILE = 1 << 21  # elements per row tile of the elementwise passes on CPU (8 MiB in float32)


def _tower(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised rows `(M, D)` and inverse norms `(M, 1)`."""
    inv_n = torch.linalg.vector_norm(z, dim=1, keepdim=True).reciprocal_()
    return z * inv_n, inv_n


def _step(chunk_size: int | None, rows: int) -> int:
    return max(1, rows if chunk_size is None else min(chunk_size, rows))


def _tiles(rows: int, cols: int, device: torch.device) -> list[tuple[int, int]]:
    """Row ranges for the elementwise work on a `(rows, cols)` block: on CPU tiles of about
    ``_TILE`` elements, so that a tile's passes after its first one hit cache (a pass over a
    `(4096, 32768)` block from memory costs about a tenth of its GEMM) while each op stays
    large enough for its threads; one tile elsewhere."""
    step = rows if device.type != "cpu" else max(1, min(rows, _TILE // max(cols, 1)))
    return [(i, min(i + step, rows)) for i in range(0, rows, step)]


def _accumulator(n: int, like: torch.Tensor) -> torch.Tensor:
    """Zeros for sums over many tiles: float64, so that their order does not matter."""
    dtype = like.dtype if like.device.type == "mps" else torch.float64
    return torch.zeros(n, dtype=dtype, device=like.device)


def _assemble(P: torch.Tensor, N: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``s^2 (sym(P) - (N + N^T))`` with ``P = T^T diag(c) T``: exactly symmetric."""
    W = P.sub_(N, alpha=2.0)
    return (W + W.T).mul_(0.5 * scale.square())


def _diag_term(T: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``T^T diag(c) T``."""
    return torch.mm(T.T * c.to(T.dtype), T)


def _add_colsum(c: torch.Tensor, E: torch.Tensor, w: torch.Tensor, block: int = 64) -> None:
    """``c += E^T w``. Down the rows of a row-major ``E``, BLAS's GEMV adds one row at a time
    (float32 error growing with the rows); blocks of rows summed afterwards keep it at the
    level of a pairwise sum, at the GEMV's speed."""
    r = len(E)
    nb = r // block
    if nb:
        blocks = E[: nb * block].unflatten(0, (nb, block))
        c += torch.bmm(w[: nb * block].view(nb, 1, block), blocks).sum(0).squeeze(0)
    if nb * block < r:
        c += torch.mv(E[nb * block :].T, w[nb * block :])


def _softmax_head(U, inv_n, T, scale, step, work=None, loss=False):
    """CLIP factor ``B`` of rows ``U`` against classes ``T`` in row chunks; their NLL if
    ``loss`` (row ``i``'s class is ``i``)."""
    M, D = U.shape
    K = len(T)
    step = min(step, M)
    Us = U * scale
    if work is None or work.numel() < 2 * step * K:
        work = U.new_empty(2 * step * K)
    rows = U.new_empty(2, 2 * step, D)
    c, N = _accumulator(K, U), U.new_zeros(D, D)
    nll = _accumulator(1, U)
    for s in range(0, M, step):
        m = min(step, M - s)
        S = work[: 2 * m * K].view(2 * m, K)
        L = torch.mm(Us[s : s + m], T.T, out=S[:m])
        part = _softmax_block(L, S, U[s : s + m], inv_n[s : s + m], T, scale, c, N,
                              rows[0, : 2 * m], rows[1, : 2 * m], s if loss else None)  # fmt: skip
        if loss:
            nll += part
    return _assemble(_diag_term(T, c), N, scale), nll[0].to(U.dtype)


def _softmax_block(L, S, U, inv_n, T, scale, c, N, out, left, diag):
    """Add one block of rows to ``c`` (``sum_i p_ik / n_i^2``) and ``N``.

    ``L`` `(r, K)` logits of the rows ``U`` against ``T``, stored as ``S[:r]`` of the
    contiguous scratch ``S`` `(2r, K)` (overwritten); ``out``, ``left`` `(2r, D)` scratch.
    Returns the rows' NLL of class ``diag + i`` if ``diag`` is given.
    """
    r, K = L.shape
    P = S[r:]
    inv_n2 = inv_n.square()
    nll = None if diag is None else _accumulator(1, L)
    for i, j in _tiles(r, K, L.device):
        Lt, Pt = L[i:j], P[i:j]
        torch.ops.aten._softmax.out(Lt, 1, False, out=Pt)  # one fused pass per row
        if nll is not None:
            nll += _nll_rows(Lt, Pt, diag + i)
        _add_colsum(c, Pt, inv_n2[i:j].squeeze(1))
        Lt.mul_(Pt)  # p * l
    torch.mm(S, T, out=out)  # [sum_k p_ik l_ik t_k; sum_k p_ik t_k]
    R, Tp = out[:r], out[r:]
    R.div_(scale)  # r_i = sum_k p_ik cos_ik t_k; Tp_i = T^T p_i
    g = torch.linalg.vecdot(U, R, dim=1).unsqueeze(1)
    a = torch.linalg.vecdot(U, Tp, dim=1).unsqueeze(1)
    X, Q = left[:r], left[r:]
    torch.mul(U, inv_n2, out=X)
    R.addcmul_(U, g, value=-0.5)  # y_i
    torch.addcmul(Tp, U, a, value=-1.0, out=Q).mul_(inv_n)  # q_i = P_i T^T p_i
    torch.mul(Q, 0.5, out=Tp)
    N.addmm_(left.T, out)  # X^T Y + Q^T Q / 2
    return nll


def _nll_rows(L: torch.Tensor, P: torch.Tensor, offset: int) -> torch.Tensor:
    """``sum_i -log p_{i, offset + i}`` of softmax rows ``P`` of logits ``L``; rows whose
    ``p`` is below the normal range get ``logsumexp - l`` from their logits instead."""
    p = P.diagonal(offset)
    nll = -p.log()
    low = p < torch.finfo(p.dtype).tiny
    if low.any():
        rows = low.nonzero().squeeze(1)
        lr = L[rows]
        nll[rows] = torch.logsumexp(lr, 1) - lr.gather(1, (rows + offset)[:, None]).squeeze(1)
    return nll.sum()


def _sigmoid_heads(U, inv_n, T, scale, bias, step, inv_m=None):
    """SigLIP factor of rows ``U`` against classes ``T`` in row chunks. With ``inv_m`` (the
    inverse norms of the rows behind ``T``, a batch of matched pairs): also the factor of
    ``T``'s rows against ``U`` from the same logits, and the loss. Returns ``(B, B_T, loss)``."""
    M, D = U.shape
    K = len(T)
    step = min(step, M)
    pair = inv_m is not None
    Us = U * scale
    work = U.new_empty(2 * step * K)
    rows = U.new_empty(2, step, D)
    c, N = _accumulator(K, U), U.new_zeros(D, D)
    if pair:
        inv_m2 = inv_m.square().squeeze(1)
        R_T = U.new_zeros(K, D)  # s sum_i w_ik cos_ik u_i: s times the text head's r_k
        P_T = U.new_zeros(D, D)  # U^T diag(c_T) U, c_T,i = sum_k w_ik / m_k^2
        c_T = U.new_empty(step)
        loss = _accumulator(1, U)
    for s in range(0, M, step):
        m = min(step, M - s)
        S = work[: 2 * m * K].view(2 * m, K)
        L, W = S[:m], S[m:]
        torch.mm(Us[s : s + m], T.T, out=L)  # s cos = l - b
        Uc, inv_n2 = U[s : s + m], inv_n[s : s + m].square()
        if pair:  # loss = -sum log sigmoid(-l) - sum_i l_ii
            loss -= L.diagonal(s).sum() + (0.0 if bias is None else m * bias)
        for i, j in _tiles(m, K, L.device):
            Lt, Wt = L[i:j], W[i:j]
            if pair:  # the loss needs log sigmoid(-l); w = exp(l + 2 log sigmoid(-l))
                if bias is None:
                    torch.neg(Lt, out=Wt)
                else:
                    torch.sub(-bias, Lt, out=Wt)  # -l
                torch._C._nn.log_sigmoid(Wt, out=Wt)
                loss -= Wt.sum()
                torch.add(Lt, Wt, alpha=2.0, out=Wt)  # log w - b
                if bias is not None:
                    Wt.add_(bias)
                Wt.exp_()
            else:  # w = q (1 - q), q = sigmoid(-|l|) the smaller factor: exact on both tails
                if bias is None:
                    torch.abs(Lt, out=Wt)
                else:
                    torch.add(Lt, bias, out=Wt).abs_()
                Wt.neg_().sigmoid_()
                Wt.addcmul_(Wt, Wt, value=-1.0)
            _add_colsum(c, Wt, inv_n2[i:j].squeeze(1))
            if pair:
                torch.mv(Wt, inv_m2, out=c_T[i:j])
            Lt.mul_(Wt)  # s w cos
        R = torch.mm(L, T, out=rows[0, :m]).div_(scale)  # r_i
        if pair:
            R_T.addmm_(L.T, Uc)
            P_T.addmm_((Uc * c_T[:m, None]).T, Uc)
        g = torch.linalg.vecdot(Uc, R, dim=1).unsqueeze(1)
        R.addcmul_(Uc, g, value=-0.5)  # y_i
        X = torch.mul(Uc, inv_n2, out=rows[1, :m])
        N.addmm_(X.T, R)
    B = _assemble(_diag_term(T, c), N, scale)
    if not pair:
        return B, None, None
    R_T.div_(scale)
    g_T = torch.linalg.vecdot(T, R_T, dim=1).unsqueeze(1)
    R_T.addcmul_(T, g_T, value=-0.5)
    N_T = torch.mm((T * inv_m2[:, None]).T, R_T)
    return B, _assemble(P_T, N_T, scale), loss[0].to(U.dtype)
