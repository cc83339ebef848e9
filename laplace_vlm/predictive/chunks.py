"""The predictive over chunks of images: peak memory independent of the number of images.

Every iterator takes the heads, the two heads' posteriors and the validated head inputs
``(a_img, r_img, a_txt, r_txt)``, computes what depends only on the classes once, and yields
one result per chunk of ``step`` images. Gradients flow wherever the caller records them
(``torch.enable_grad``); the caller decides (laplace's ``enable_backprop``).
"""

from __future__ import annotations

from collections.abc import Iterator

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
    chunk_parameters="""
        Parameters
        ----------
        heads : DualHead
            the heads (embeddings, logit scale and bias).
        posteriors : tuple of HeadPosterior
            the posteriors of the image head and of the text head.
        inputs : tuple
            validated ``(a_img, r_img, a_txt, r_txt)`` (:meth:`InputEncoder.predict`): `(N, ...)`
            images and `(C, ...)` classes.
        """,
    step="""
        step : int
            images per chunk.
        """,
    zero_norm_raises="""
        Raises
        ------
        ValueError
            if an image or class embedding has a zero or non-finite norm.
        """,
)


def _text_embeddings(heads: DualHead, inputs: HeadInputs, checked: bool = True) -> torch.Tensor:
    """`(C, D)` class text embeddings, their norms checked unless ``checked`` is False."""
    t = heads.embed_text(inputs[2], inputs[3])
    return check_nonzero_norm("text embeddings", t) if checked else t


def _image_chunks(
    heads: DualHead, inputs: HeadInputs, step: int, checked: bool = True
) -> Iterator[tuple[slice, torch.Tensor]]:
    """``(rows, z)`` per chunk of ``step`` images: its slice and `(n, D)` image embeddings."""
    a_i, r_i = inputs[0], inputs[1]
    for start in range(0, len(a_i), step):
        rows = slice(start, start + step)
        z = heads.embed_image(a_i[rows], None if r_i is None else r_i[rows])
        yield rows, check_nonzero_norm("image embeddings", z) if checked else z


CLASS_CHUNK = 4096  # classes per class_operands call: bounds its temporaries at large C
_SAMPLE_BLOCK = 32  # weight samples per batched logit GEMM of the nn sampler


def class_operands_in_chunks(
    pred_type: PredType,
    post_i: HeadPosterior,
    post_t: HeadPosterior,
    a_t: torch.Tensor,
    t: torch.Tensor,
    s: torch.Tensor,
    preallocated: bool,
) -> dict:
    """:func:`class_operands` of all classes, computed ``CLASS_CHUNK`` classes at a time.

    The operands are per class (rows) except the head bases; computing them in class chunks
    keeps the temporaries of one chunk, so that at C = 32,768 classes the working memory is
    the operands themselves. ``preallocated`` writes the rows into one tensor per operand
    (no autograd); otherwise the chunks are concatenated.

    Parameters
    ----------
    pred_type : PredType
        ``PROBCOSINE``, ``PROBCOSINE_DIAG`` or ``GLM``.
    post_i, post_t : HeadPosterior
        the posteriors of the image head and of the text head.
    a_t : torch.Tensor
        `(C, d_txt [+ 1])` class design inputs.
    t : torch.Tensor
        `(C, D)` class text embeddings.
    s : torch.Tensor
        the linear logit scale.
    preallocated : bool
        write into preallocated operands (outside autograd).

    Returns
    -------
    dict
        the operands, as :func:`class_operands` returns them for all C classes.
    """
    n = len(t)
    if n <= CLASS_CHUNK:
        return class_operands(pred_type, post_i, post_t, a_t, t, s)
    ops, parts = {}, []
    for start in range(0, n, CLASS_CHUNK):
        rows = slice(start, start + CLASS_CHUNK)
        part = class_operands(pred_type, post_i, post_t, a_t[rows], t[rows], s)
        if not preallocated:
            parts.append(part)
            continue
        for key, value in part.items():  # tensors are per class; lists (bases) are shared
            if not isinstance(value, torch.Tensor):
                ops[key] = value
                continue
            if key not in ops:
                ops[key] = value.new_empty(n, *value.shape[1:])
            ops[key][rows] = value
    if preallocated:
        return ops
    return {key: torch.cat([p[key] for p in parts]) if isinstance(value, torch.Tensor) else value
            for key, value in parts[0].items()}  # fmt: skip


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

    %(chunk_parameters)s
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

    %(zero_norm_raises)s
    """
    a_i, a_t = inputs[0], inputs[2]
    post_i, post_t = posteriors
    s = heads.scale
    t = _text_embeddings(heads, inputs)
    ops = class_operands_in_chunks(pred_type, post_i, post_t, a_t, t, s, out is not None)
    for rows, z in _image_chunks(heads, inputs, step):
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

    %(chunk_parameters)s
    %(step)s

    Returns
    -------
    mean : torch.Tensor
        `(N, C)` MAP logits.
    cov : torch.Tensor
        `(N, C, C)` covariance of each image's logits over the classes.

    %(zero_norm_raises)s
    """
    a_i, a_t = inputs[0], inputs[2]
    post_i, post_t = posteriors
    t = _text_embeddings(heads, inputs)
    cross_t = post_t.cross_terms(a_t)  # the classes share the text head
    means, covs = [], []
    for rows, z in _image_chunks(heads, inputs, step):
        means.append(heads.logits(z, t))
        covs.append(heads.scale.square() * glm_covariance(z, post_i.terms(a_i[rows]), t, cross_t))
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

    %(chunk_parameters)s
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
    a_i, a_t = inputs[0], inputs[2]
    post_i, post_t = posteriors
    s = heads.scale
    t = _text_embeddings(heads, inputs, checked=False)
    dt = post_t.sample_perturbations(a_t, n_samples, generator)  # (S, C, D)
    dW, db = post_i.sample_weights(n_samples, generator)
    v, nt = F.normalize(t, dim=-1), t.norm(dim=-1)
    d_txt_v = (dt * v).sum(-1)[:, None]  # (S, 1, C)
    for rows, z in _image_chunks(heads, inputs, step, checked=False):
        dz = post_i.perturbations(a_i[rows], dW, db)  # (S, n, D)
        if pred_type is PredType.NN:
            # blocks of samples as batched GEMMs: faster than one per sample, and than all at
            # once, whose (S, n, D) temporaries leave the cache (1000 samples: 52 vs 69, 110 ms)
            blocks = [slice(i, i + _SAMPLE_BLOCK) for i in range(0, len(dz), _SAMPLE_BLOCK)]
            yield torch.cat([heads.logits(z + dz[b], t + dt[b]) for b in blocks])
            continue
        u, nz = F.normalize(z, dim=-1), z.norm(dim=-1)[:, None]
        cos = u @ v.T
        d_img = (dz @ v.T - cos * (dz * u).sum(-1, keepdim=True)) / nz
        d_txt = (u @ dt.transpose(1, 2) - cos * d_txt_v) / nt
        yield heads.logits(z, t) + s * (d_img + d_txt)
