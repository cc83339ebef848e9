"""The predictive over chunks of images: peak memory independent of the number of images.

Every iterator takes the heads, the two heads' posteriors and the validated head inputs
``(a_img, r_img, a_txt, r_txt)``, computes what depends only on the classes once, and yields
one result per chunk of ``step`` images. Gradients flow wherever the caller records them
(``torch.enable_grad``); the caller decides (laplace's ``enable_backprop``).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from laplace_vlm.docstrings import fill_doc
from laplace_vlm.enums import PredType
from laplace_vlm.heads import DualHead
from laplace_vlm.posterior.head_posterior import HeadPosterior
from laplace_vlm.predictive.moments import chunk_moments, class_operands, glm_covariance
from laplace_vlm.validation import check_nonzero_norm

HeadInputs = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]


_fill_doc = fill_doc.extend(
    heads="""
        heads : DualHead
            the heads (embeddings, logit scale and bias).
        """,
    posteriors="""
        posteriors : tuple of HeadPosterior
            the posteriors of the image head and of the text head.
        """,
    inputs="""
        inputs : tuple
            validated ``(a_img, r_img, a_txt, r_txt)`` (:meth:`InputEncoder.predict`): `(N, ...)`
            images and `(C, ...)` classes.
        """,
    step="""
        step : int
            images per chunk.
        """,
    zero_norm="""
        ValueError
            if an image or class embedding has a zero or non-finite norm.
        """,
)


def _rows(r: torch.Tensor | None, rows: slice) -> torch.Tensor | None:
    return None if r is None else r[rows]


@_fill_doc
def moment_chunks(
    heads: DualHead,
    posteriors: tuple[HeadPosterior, HeadPosterior],
    inputs: HeadInputs,
    pred_type: PredType,
    step: int,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
):
    """Logit mean and variance `(n, C)` per chunk of images, class terms computed once.

    With ``out`` (two preallocated `(N, C)` tensors, no autograd) each chunk is written into
    its slice; without, each chunk is a new tensor (differentiable).

    Parameters
    ----------
    %(heads)s
    %(posteriors)s
    %(inputs)s
    pred_type : PredType
        ``PROBCOSINE``, ``PROBCOSINE_DIAG`` or ``GLM``.
    %(step)s
    out : tuple of torch.Tensor, optional
        `(N, C)` preallocated mean and variance to write into.

    Yields
    ------
    mean, var : torch.Tensor
        `(n, C)` logit mean (logit bias included) and variance of the next chunk; views of
        ``out`` when given.

    Raises
    ------
    %(zero_norm)s
    """
    a_i, r_i, a_t, r_t = inputs
    post_i, post_t = posteriors
    s = heads.scale
    t = check_nonzero_norm("text embeddings", heads.embed_text(a_t, r_t))
    ops = class_operands(pred_type, post_i, post_t, a_t, t, s)
    for start in range(0, len(a_i), step):
        rows = slice(start, start + step)
        z = check_nonzero_norm("image embeddings", heads.embed_image(a_i[rows], _rows(r_i, rows)))
        mean, var = chunk_moments(pred_type, z, a_i[rows], post_i, ops, s,
                                  out=None if out is None else (out[0][rows], out[1][rows]))  # fmt: skip
        if heads.logit_bias is not None:
            mean = mean + heads.logit_bias if out is None else mean.add_(heads.logit_bias)
        yield mean, var


@_fill_doc
def glm_covariance_chunks(
    heads: DualHead,
    posteriors: tuple[HeadPosterior, HeadPosterior],
    inputs: HeadInputs,
    step: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Linearised logit mean `(N, C)` and covariance over classes `(N, C, C)`.

    Parameters
    ----------
    %(heads)s
    %(posteriors)s
    %(inputs)s
    %(step)s

    Returns
    -------
    mean : torch.Tensor
        `(N, C)` MAP logits.
    cov : torch.Tensor
        `(N, C, C)` covariance of each image's logits over the classes.

    Raises
    ------
    %(zero_norm)s
    """
    a_i, r_i, a_t, r_t = inputs
    post_i, post_t = posteriors
    s = heads.scale
    t = check_nonzero_norm("text embeddings", heads.embed_text(a_t, r_t))
    cross_t = post_t.cross_terms(a_t)  # the classes share the text head
    means, covs = [], []
    for start in range(0, len(a_i), step):
        rows = slice(start, start + step)
        z = check_nonzero_norm("image embeddings", heads.embed_image(a_i[rows], _rows(r_i, rows)))
        means.append(heads.logits(z, t))
        covs.append(s.square() * glm_covariance(z, post_i.terms(a_i[rows]), t, cross_t))
    return torch.cat(means), torch.cat(covs)


@_fill_doc
def logit_sample_chunks(
    heads: DualHead,
    posteriors: tuple[HeadPosterior, HeadPosterior],
    inputs: HeadInputs,
    pred_type: PredType,
    n_samples: int,
    generator: torch.Generator | None,
    step: int,
):
    """Logit samples `(S, n, C)` per chunk of images; one weight draw serves all chunks.

    ``glm`` pushes the weight samples through the linearisation, ``nn`` through the exact
    normalisation.

    Parameters
    ----------
    %(heads)s
    %(posteriors)s
    %(inputs)s
    pred_type : PredType
        ``GLM`` or ``NN``.
    n_samples : int
        S, weight draws of both heads.
    generator : torch.Generator, optional
        randomness of the draws.
    %(step)s

    Yields
    ------
    torch.Tensor
        `(S, n, C)` logit samples of the next chunk (logit bias included).
    """
    a_i, r_i, a_t, r_t = inputs
    post_i, post_t = posteriors
    s = heads.scale
    t = heads.embed_text(a_t, r_t)
    dt = post_t.sample_perturbations(a_t, n_samples, generator)  # (S, C, D)
    dW, db = post_i.sample_weights(n_samples, generator)
    v, nt = F.normalize(t, dim=-1), t.norm(dim=-1)
    d_txt_v = (dt * v).sum(-1)[:, None]  # (S, 1, C)
    for start in range(0, len(a_i), step):
        rows = slice(start, start + step)
        a = a_i[rows]
        z = heads.embed_image(a, _rows(r_i, rows))
        dz = post_i.perturbations(a, dW, db)  # (S, n, D)
        if pred_type is PredType.NN:
            yield torch.stack([heads.logits(z + dz_s, t + dt_s) for dz_s, dt_s in zip(dz, dt)])
            continue
        u, nz = F.normalize(z, dim=-1), z.norm(dim=-1)[:, None]
        cos = u @ v.T
        d_img = (dz @ v.T - cos * (dz * u).sum(-1, keepdim=True)) / nz
        d_txt = (u @ dt.transpose(1, 2) - cos * d_txt_v) / nt
        yield heads.logits(z, t) + s * (d_img + d_txt)
