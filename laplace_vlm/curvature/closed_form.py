"""Closed-form KFAC of the projection heads under a contrastive likelihood, built from GEMMs.

For rows ``z_i`` (un-normalised embeddings of the head), normalised targets ``T`` `(K, D)` and
logit scale ``s``, the per-sample GGN of ``z_i`` is ``H_i = s^2 P_i T^T Lambda_i T P_i`` with
``P_i = (I - u_i u_i^T) / n_i``, ``u_i = z_i / n_i``, ``n_i = ||z_i||`` and ``Lambda_i =
diag(w_i) - w_i w_i^T`` (CLIP, ``w_i`` the softmax of row ``i``'s logits) or ``diag(w_i)``
(SigLIP, ``w = sigma(l) sigma(-l)``). Expanding ``P_i X P_i`` gives ``sum_i H_i`` without any
per-sample `(D, D)` tensor (DESIGN.md):

    B / s^2 = T^T diag(c) T - (N + N^T),    N = X^T Y + Q^T Q / 2

with ``c_k = sum_i w_ik / n_i^2``, the rows ``x_i = u_i / n_i^2``, ``y_i = r_i - (g_i / 2) u_i``,
``r_i = sum_k w_ik cos_ik t_k``, ``g_i = u_i . r_i = sum_k w_ik cos_ik^2`` and (CLIP only)
``q_i = P_i T^T w_i``. (``N + N^T`` is ``U_w^T R + R^T U_w - U^T diag(g / n^2) U + Q^T Q``,
``U_w`` the rows ``x_i``.)

Cost per head of a class batch of ``M`` rows and ``K`` classes: the logits ``(s U) T^T`` and
one stacked `(2M, K) @ (K, D)` product ``[e * l; e] T`` (CLIP: ``e = exp(l - max_k l)``, the
softmax before its row normalisation, which is applied to the `(M, D)` results) or
``(w * l) T`` (SigLIP): 3 (CLIP) or 2 (SigLIP) GEMMs of ``2 M K D`` FLOPs; then ``[X; Q]^T
[Y; Q/2]`` (``4 M D^2``) and ``T^T diag(c) T`` (``2 K D^2``, once per batch). Row chunks of
``chunk_size`` bound the working set at two `(chunk, K)` buffers, reused across chunks;
elementwise work runs in place in them.

:func:`pair_factors` does both heads of a class batch (the texts are the classes of the
images and vice versa) and its loss. SigLIP's weights are one matrix for both heads, so one
logit matrix serves both, chunked or not (3 GEMMs of ``2 M K D`` in all). CLIP's text head
needs a softmax over the images (the columns): one logit matrix serves both heads when one
chunk holds the batch (5 GEMMs), otherwise each head runs its own row chunks (6). The loss
comes from the log-sum-exps (CLIP) or log-sigmoids (SigLIP) computed anyway.
"""

from __future__ import annotations

import torch


def input_factor(activations: torch.Tensor) -> torch.Tensor:
    """Sum of outer products of the head's inputs, ``A = sum_i a_i a_i^T``.

    Parameters
    ----------
    activations : torch.Tensor
        `(M, d)` pre-projection activations.

    Returns
    -------
    A : torch.Tensor
        `(d, d)`
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
def head_factors(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activations: torch.Tensor,
    residual: torch.Tensor | None,
    targets: torch.Tensor,
    scale: torch.Tensor,
    logit_bias: torch.Tensor | None,
    contrastive: str,
    labels: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """KFAC factors ``(B, A)`` of one head on one class batch (the curvature-backend interface).

    Parameters
    ----------
    weight : torch.Tensor
        `(D, d)` head weight.
    bias : torch.Tensor, optional
        `(D,)` head bias.
    activations : torch.Tensor
        `(M, d)` inputs of the head.
    residual : torch.Tensor, optional
        `(M, D)` per-row offset added after the head (SigLIP image tower).
    targets : torch.Tensor
        `(K, D)` normalised embeddings of the other tower, the classes.
    scale : torch.Tensor
        linear logit scale.
    logit_bias : torch.Tensor, optional
    contrastive : {'clip', 'siglip'}
    labels : torch.Tensor, optional
        `(M,)` matching class per row; unused here (the GGN does not depend on the labels).
    chunk_size : int, optional

    Returns
    -------
    B, A : torch.Tensor
        `(D, D)` sum of per-row GGNs, `(d, d)` sum of input outer products.
    """
    z = activations @ weight.T
    if bias is not None:
        z += bias
    if residual is not None:
        z += residual
    return output_factor(z, targets, scale, logit_bias, contrastive, chunk_size), input_factor(
        activations
    )


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
    contrastive : {'clip', 'siglip'}
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
        B_i, B_t, loss = _softmax_pair(U, inv_n, V, inv_m, scale, step)
    else:
        B_i, B_t, loss = _sigmoid_heads(U, inv_n, V, scale, logit_bias, step, inv_m)
    return B_i, input_factor(image_activations), B_t, input_factor(text_activations), loss


# ----------------------------------------------------------------------------- helpers
_TILE = 1 << 19  # elements per tile of the elementwise passes on CPU: 2 MiB in float32


def _tower(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised rows `(M, D)` and inverse norms `(M, 1)`."""
    inv_n = torch.linalg.vector_norm(z, dim=1, keepdim=True).reciprocal_()
    return z * inv_n, inv_n


def _step(chunk_size: int | None, rows: int) -> int:
    return max(1, rows if chunk_size is None else min(chunk_size, rows))


def _tiles(rows: int, cols: int, device: torch.device) -> list[tuple[int, int]]:
    """Row ranges for the elementwise work on a `(rows, cols)` block. On CPU, tiles small
    enough to stay in cache, so that the passes after the first one do not go to memory
    (one pass over a `(4096, 32768)` block from memory costs about a tenth of its GEMM)."""
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
    nll = U.new_zeros(())
    for s in range(0, M, step):
        m = min(step, M - s)
        S = work[: 2 * m * K].view(2 * m, K)
        L = torch.mm(Us[s : s + m], T.T, out=S[:m])
        part = _softmax_block(L, S, U[s : s + m], inv_n[s : s + m], T, scale, c, N,
                              rows[0, : 2 * m], rows[1, : 2 * m], s if loss else None)  # fmt: skip
        if loss:
            nll += part
    return _assemble(_diag_term(T, c), N, scale), nll


def _softmax_block(L, S, U, inv_n, T, scale, c, N, out, left, diag):
    """Add one block of rows to ``c`` (``sum_i p_ik / n_i^2``) and ``N``.

    ``L`` `(r, K)` logits of the rows ``U`` against ``T``; ``S`` `(2r, K)` scratch laid out
    like ``L`` (``S[:r]`` may be ``L``, which is then overwritten); ``out``, ``left`` `(2r, D)`
    scratch. Returns the rows' NLL of class ``diag + i`` if ``diag`` is given.
    """
    r, K = L.shape
    E = S[r:]
    mx, Z, col = L.new_empty(r, 1), L.new_empty(r, 1), L.new_empty(K)
    inv_n2 = inv_n.square()
    nll = None if diag is None else -L.diagonal(diag).sum()
    for i, j in _tiles(r, K, L.device):
        Lt, Et = L[i:j], E[i:j]
        torch.amax(Lt, 1, keepdim=True, out=mx[i:j])
        torch.sub(Lt, mx[i:j], out=Et).exp_()  # e = exp(l - max): the softmax unnormalised
        torch.sum(Et, 1, keepdim=True, out=Z[i:j])
        c += torch.mv(Et.T, (inv_n2[i:j] / Z[i:j]).squeeze(1), out=col)
        torch.mul(Et, Lt, out=S[i:j])
    if nll is not None:
        nll += (mx + Z.log()).sum()
    torch.mm(S, T, out=out)  # [sum_k e_ik l_ik t_k; sum_k e_ik t_k]
    inv_Z = Z.reciprocal_()
    R, Tp = out[:r], out[r:]
    R.mul_(inv_Z / scale)  # r_i = sum_k p_ik cos_ik t_k
    Tp.mul_(inv_Z)  # T^T p_i
    g = torch.linalg.vecdot(U, R, dim=1).unsqueeze(1)
    a = torch.linalg.vecdot(U, Tp, dim=1).unsqueeze(1)
    X, Q = left[:r], left[r:]
    torch.mul(U, inv_n2, out=X)
    R.addcmul_(U, g, value=-0.5)  # y_i
    torch.addcmul(Tp, U, a, value=-1.0, out=Q).mul_(inv_n)  # q_i = P_i T^T p_i
    torch.mul(Q, 0.5, out=Tp)
    N.addmm_(left.T, out)  # X^T Y + Q^T Q / 2
    return nll


def _softmax_pair(U, inv_n, V, inv_m, scale, step):
    """CLIP: both heads and the InfoNCE loss both ways of a batch of matched pairs."""
    M, D = U.shape
    K = len(V)
    if step < M:  # each head its own row chunks (the text head's softmax runs over images)
        work = U.new_empty(2 * step * max(M, K))
        B_i, loss_i = _softmax_head(U, inv_n, V, scale, step, work, loss=True)
        B_t, loss_t = _softmax_head(V, inv_m, U, scale, step, work, loss=True)
        return B_i, B_t, loss_i + loss_t
    # one logit matrix for both heads; the text head reads its columns
    L = torch.mm(U * scale, V.T)
    work = U.new_empty(2 * M * K)
    rows = U.new_empty(2, 2 * max(M, K), D)
    c_t, N_t = _accumulator(M, U), U.new_zeros(D, D)
    S_t = work.view(M, 2 * K).T  # (2K, M), laid out like L.T
    loss_t = _softmax_block(L.T, S_t, V, inv_m, U, scale, c_t, N_t,
                            rows[0, : 2 * K], rows[1, : 2 * K], 0)  # fmt: skip
    c_i, N_i = _accumulator(K, U), U.new_zeros(D, D)
    loss_i = _softmax_block(L, work.view(2 * M, K), U, inv_n, V, scale, c_i, N_i,
                            rows[0, : 2 * M], rows[1, : 2 * M], 0)  # fmt: skip
    B_i = _assemble(_diag_term(V, c_i), N_i, scale)
    B_t = _assemble(_diag_term(U, c_t), N_t, scale)
    return B_i, B_t, loss_i + loss_t


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
    c, N, col = _accumulator(K, U), U.new_zeros(D, D), U.new_empty(K)
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
            if bias is None:
                torch.neg(Lt, out=Wt)
            else:
                torch.sub(-bias, Lt, out=Wt)  # -l
            torch._C._nn.log_sigmoid(Wt, out=Wt)  # log sigmoid(-l)
            if pair:
                loss -= Wt.sum()
            torch.add(Lt, Wt, alpha=2.0, out=Wt)  # log w - b = l - b + 2 log sigmoid(-l)
            if bias is not None:
                Wt.add_(bias)
            Wt.exp_()  # w = sigmoid(l) sigmoid(-l), accurate on both tails
            c += torch.mv(Wt.T, inv_n2[i:j].squeeze(1), out=col)
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
