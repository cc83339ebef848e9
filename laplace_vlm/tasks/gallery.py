"""Retrieval with uncertainty over large galleries: top-k in chunks, each hit's variance.

A gallery of ``G`` items (10^6 and more) is never scored as one `(Q, G)` grid. Ranking by the
expected ProbCosine logit ``s z.t / sqrt(E|z|^2 E|t|^2)`` needs only each item's embedding
scaled by its expected norm, so :func:`gallery_index` computes those `(G, D)` rows once (in
chunks; save them like any embedding index) and :func:`top_k` streams them chunk by chunk
through one GEMM with the queries and a running top-k, the deterministic search's own cost.
The variances are computed afterwards for the ``Q k`` hits alone, from their activations.
Without an index the scaled rows are computed per chunk from the activations.

``pred_type="map"`` is the deterministic search over the same chunks (cosine of the MAP
embeddings, zero variance): the baseline the benchmark compares with.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from laplace_vlm.enums import Direction, PredType, parse_option
from laplace_vlm.predictive.moments import (
    class_operands,
    expected_sq_norm,
    image_operands,
    pair_moments,
)
from laplace_vlm.validation import check_int, check_nonzero_norm

GALLERY_PRED_TYPES = (PredType.PROBCOSINE, PredType.PROBCOSINE_DIAG, PredType.MAP)


@dataclass
class GalleryHits:
    """The ``k`` best gallery items of every query, best first.

    Attributes
    ----------
    indices : torch.Tensor
        `(Q, k)` long gallery indices, by decreasing expected similarity.
    mean : torch.Tensor
        `(Q, k)` their expected similarity logits (logit bias included).
    var : torch.Tensor
        `(Q, k)` their variances (zero for ``pred_type="map"``).
    """

    indices: torch.Tensor
    mean: torch.Tensor
    var: torch.Tensor


def _gallery_tower(direction: Direction) -> tuple[str, str]:
    """``(gallery tower, query tower)``."""
    if direction is Direction.TEXT_TO_IMAGE:
        return "image", "text"
    return "text", "image"


def _check_gallery(gallery: object) -> torch.Tensor:
    if not isinstance(gallery, torch.Tensor) or gallery.ndim != 2:
        raise TypeError(
            "gallery must be a 2-D tensor of activations (G, d), e.g. memory-mapped: "
            "torch.from_numpy(numpy.load(path, mmap_mode='r')); got "
            + (f"shape {tuple(gallery.shape)}" if isinstance(gallery, torch.Tensor)
               else type(gallery).__name__) + "."
        )  # fmt: skip
    if len(gallery) == 0:
        raise ValueError("gallery must hold at least one item.")
    return gallery


def _scaled_rows(la, tower: str, value: torch.Tensor, pred_type: PredType) -> torch.Tensor:
    """`(n, D)` embeddings of one tower divided by their (expected, for ProbCosine) norm."""
    a, r = la.inputs.features(tower, value, None)
    x = check_nonzero_norm(f"{tower} embeddings", getattr(la.heads, f"embed_{tower}")(a, r))
    if pred_type is PredType.MAP:
        return x / x.norm(dim=-1, keepdim=True)
    post = la.head_posteriors()[0 if tower == "image" else 1]
    return x * expected_sq_norm(x, a, post)[0].rsqrt()[:, None]


def _chunks(n: int, chunk_size: int, progress_bar: bool, what: str) -> Iterator[slice]:
    for start in tqdm(range(0, n, chunk_size), disable=not progress_bar, desc=what):
        yield slice(start, min(start + chunk_size, n))


def gallery_index(
    la,
    gallery: torch.Tensor,
    direction: str = "text_to_image",
    pred_type: str = "probcosine",
    chunk_size: int = 65_536,
    progress_bar: bool = False,
) -> torch.Tensor:
    """The ranking rows of a gallery: embeddings over their expected norm, `(G, D)`.

    Computed once, in chunks of ``chunk_size`` items; :func:`top_k` then searches them at the
    cost of a deterministic search. ``probcosine`` and ``probcosine_diag`` share one index
    (the same expected norm); ``map``'s rows are the unit embeddings.

    Parameters
    ----------
    la : DualEncoderLaplace
        a fitted posterior.
    gallery : torch.Tensor
        `(G, d)` activations of the gallery's tower (a memory-mapped tensor is read chunk by
        chunk).
    direction : {'text_to_image', 'image_to_text'}, default='text_to_image'
        ``text_to_image``: the gallery holds images; ``image_to_text``: texts.
    pred_type : {'probcosine', 'probcosine_diag', 'map'}, default='probcosine'
        which expected similarity the rows rank by.
    chunk_size : int, default=65536
        gallery items per chunk; the working memory is that of one chunk.
    progress_bar : bool, default=False
        show a tqdm bar over the chunks.

    Returns
    -------
    torch.Tensor
        `(G, D)` rows, on the heads' device and in their dtype.

    Raises
    ------
    TypeError
        if ``gallery`` is not a 2-D tensor.
    ValueError
        for another ``direction`` or ``pred_type``, or a ``chunk_size`` below 1.
    """
    tower, _ = _gallery_tower(parse_option(Direction, direction, "direction"))
    pred_type = _check_pred_type(pred_type)
    chunk_size = check_int("chunk_size", chunk_size)
    gallery = _check_gallery(gallery)
    with torch.no_grad():
        return torch.cat([_scaled_rows(la, tower, gallery[rows], pred_type)
                          for rows in _chunks(len(gallery), chunk_size, progress_bar,
                                              "[Indexing gallery]")])  # fmt: skip


def _check_pred_type(pred_type: str) -> PredType:
    pred_type = parse_option(PredType, pred_type, "pred_type")
    if pred_type not in GALLERY_PRED_TYPES:
        options = tuple(p.value for p in GALLERY_PRED_TYPES)
        raise ValueError(f"pred_type must be one of {options} for a gallery, got {pred_type!r}.")
    return pred_type


def top_k(
    la,
    queries: torch.Tensor,
    gallery: torch.Tensor,
    k: int = 10,
    direction: str = "text_to_image",
    pred_type: str = "probcosine",
    index: torch.Tensor | None = None,
    chunk_size: int = 65_536,
    progress_bar: bool = False,
) -> GalleryHits:
    """The ``k`` gallery items of highest expected similarity to each query, and their variance.

    Ranks chunk by chunk with a running top-k (the order of exact ties is unspecified);
    the peak memory is one `(Q, chunk_size)` score block plus the chunk. The mean and variance
    of the ``Q k`` hits are then computed exactly from their activations.

    Parameters
    ----------
    la : DualEncoderLaplace
        a fitted posterior.
    queries : torch.Tensor
        `(Q, d)` activations of the query tower (texts for ``text_to_image``).
    gallery : torch.Tensor
        `(G, d)` activations of the gallery tower; only the hits' rows are read when
        ``index`` is given.
    k : int, default=10
        hits per query (all G if ``k > G``).
    direction : {'text_to_image', 'image_to_text'}, default='text_to_image'
        ``text_to_image``: texts query a gallery of images; ``image_to_text``: the reverse.
    pred_type : {'probcosine', 'probcosine_diag', 'map'}, default='probcosine'
        the predictive; ``map`` is the deterministic search (cosine of the MAP embeddings).
    index : torch.Tensor, optional
        `(G, D)` :func:`gallery_index` of ``gallery`` for this ``la``, ``direction`` and
        ``pred_type``; default: computed chunk by chunk from ``gallery``.
    chunk_size : int, default=65536
        gallery items per chunk.
    progress_bar : bool, default=False
        show a tqdm bar over the chunks.

    Returns
    -------
    GalleryHits
        `(Q, min(k, G))` indices, means and variances.

    Raises
    ------
    TypeError
        if ``gallery`` is not a 2-D tensor.
    ValueError
        for another ``direction`` or ``pred_type``, ``k`` or ``chunk_size`` below 1, or an
        ``index`` whose shape does not match ``gallery``.
    """
    direction = parse_option(Direction, direction, "direction")
    gallery_tower, query_tower = _gallery_tower(direction)
    pred_type = _check_pred_type(pred_type)
    k, chunk_size = check_int("k", k), check_int("chunk_size", chunk_size)
    gallery = _check_gallery(gallery)
    if index is not None and (index.ndim != 2 or len(index) != len(gallery)):
        raise ValueError(f"index must be (G, D) with G = {len(gallery)} rows (gallery_index), "
                         f"got {tuple(index.shape)}.")  # fmt: skip
    with torch.no_grad():
        q = _scaled_rows(la, query_tower, queries, pred_type)
        best, best_idx = q.new_empty(len(q), 0), torch.empty(len(q), 0, dtype=torch.long)
        for rows in _chunks(len(gallery), chunk_size, progress_bar, "[Searching gallery]"):
            g = index[rows] if index is not None else None
            if g is None:
                g = _scaled_rows(la, gallery_tower, gallery[rows], pred_type)
            scores = q @ g.to(q.dtype).T  # (Q, n): the ranking, up to the positive factor s
            top = torch.topk(scores, min(k, scores.shape[1]), dim=1)
            merged = torch.cat([best, top.values], 1)
            merged_idx = torch.cat([best_idx, top.indices.cpu() + rows.start], 1)
            keep = torch.topk(merged, min(k, merged.shape[1]), dim=1, sorted=True).indices
            best, best_idx = merged.gather(1, keep), merged_idx.gather(1, keep.cpu())
        if pred_type is PredType.MAP:  # the scores are the cosines themselves
            mean = la.heads.scale * best
            mean = mean if la.heads.logit_bias is None else mean + la.heads.logit_bias
            return GalleryHits(best_idx, mean, torch.zeros_like(mean))
        mean, var = _hit_moments(la, queries, gallery, best_idx, direction, pred_type)
    return GalleryHits(best_idx, mean, var)


def _hit_moments(la, queries, gallery, hits: torch.Tensor, direction: Direction,
                 pred_type: PredType) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """`(Q, k)` exact mean and variance of each query's hits."""
    n_q, k = hits.shape
    items = gallery[hits.flatten()]
    if direction is Direction.TEXT_TO_IMAGE:
        images, texts = items, queries
        rows, cols = None, torch.arange(n_q).repeat_interleave(k)
    else:
        images, texts = queries, items
        rows, cols = torch.arange(n_q).repeat_interleave(k), None
    a_i, r_i, a_t, r_t = la.inputs.predict({"image": images, "text": texts})
    post_i, post_t = la.head_posteriors()
    z, t = la.heads.embed_image(a_i, r_i), la.heads.embed_text(a_t, r_t)
    ops = class_operands(pred_type, post_i, post_t, a_t, t, la.heads.scale)
    scaled, left = image_operands(pred_type, z, a_i, post_i, ops)
    rows, cols = (None if i is None else i.to(scaled.device) for i in (rows, cols))
    mean, var = pair_moments(scaled, left, ops, rows, cols)
    if la.heads.logit_bias is not None:
        mean = mean + la.heads.logit_bias
    return mean.reshape(n_q, k), var.reshape(n_q, k)
