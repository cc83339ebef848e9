"""Image <-> text retrieval with uncertainty: rank by expected similarity, report its variance.

The score of an (image, text) pair is the mean of the ProbCosine logit (``s E[cos]``) under the
Laplace posterior, and its variance says how much to trust it. Both come from one call of
``DualEncoderLaplace.predictive_moments`` on the `(images, texts)` grid; text -> image
retrieval is the transpose of the same grid.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from laplace_vlm.enums import Direction, parse_option
from laplace_vlm.validation import check_finite, check_int

DIRECTIONS: tuple[str, ...] = tuple(d.value for d in Direction)


@dataclass
class Ranking:
    """Gallery items of every query, best first.

    Attributes
    ----------
    indices : torch.Tensor
        `(Q, G)` gallery indices sorted by decreasing expected similarity.
    mean : torch.Tensor
        `(Q, G)` expected similarity logit of each (query, gallery item), in gallery order.
    var : torch.Tensor
        `(Q, G)` its variance, in gallery order.
    """

    indices: torch.Tensor
    mean: torch.Tensor
    var: torch.Tensor

    def top(self, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The ``k`` best items of each query.

        Parameters
        ----------
        k : int
            items per query (all G if ``k > G``).

        Returns
        -------
        indices, mean, var : torch.Tensor
            `(Q, k)` each: gallery indices, best first, and their means and variances.
        """
        idx = self.indices[:, :k]
        return idx, self.mean.gather(1, idx), self.var.gather(1, idx)


def rank(
    la,
    image: torch.Tensor,
    text: torch.Tensor,
    direction: str = "image_to_text",
    pred_type: str = "probcosine",
) -> Ranking:
    """Rank texts for every image (or images for every text) by expected similarity.

    Parameters
    ----------
    la : DualEncoderLaplace
        a fitted posterior.
    image : torch.Tensor
        `(N, ...)` image inputs as ``la`` takes them (pre-projection activations in feature mode).
    text : torch.Tensor
        `(M, ...)` text inputs likewise.
    direction : {'image_to_text', 'text_to_image'}, default='image_to_text'
        queries are the images (gallery = texts) or the texts (gallery = images).
    pred_type : {'probcosine', 'probcosine_diag', 'glm'}, default='probcosine'
        the predictive moments; ``glm``'s mean is the MAP similarity.

    Returns
    -------
    ranking : Ranking
        `(N, M)` for ``image_to_text``, `(M, N)` for ``text_to_image``.

    Raises
    ------
    ValueError
        for another ``direction``.
    """
    direction = parse_option(Direction, direction, "direction")
    if not callable(getattr(la, "predictive_moments", None)):
        raise TypeError(f"la must be a fitted DualEncoderLaplace, got {type(la).__name__}.")
    mean, var = la.predictive_moments({"image": image, "text": text}, pred_type=pred_type)
    if direction is Direction.TEXT_TO_IMAGE:
        mean, var = mean.T, var.T
    return rank_scores(mean, var)


def rank_scores(mean: torch.Tensor, var: torch.Tensor) -> Ranking:
    """Sort a `(Q, G)` score grid per query (ties keep gallery order).

    Parameters
    ----------
    mean : torch.Tensor
        `(Q, G)` expected similarity of each (query, gallery item); sorted by it, descending.
    var : torch.Tensor
        `(Q, G)` its variance, kept alongside.

    Returns
    -------
    ranking : Ranking
        ``indices`` sorted per query; ``mean`` and ``var`` as given (gallery order).

    Raises
    ------
    TypeError
        if ``mean`` or ``var`` is not a tensor.
    ValueError
        if ``mean`` is not 2-D, ``var`` has another shape, or either is not finite.
    """
    for name, value in (("mean", mean), ("var", var)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}.")
        check_finite(name, value)
    if mean.ndim != 2 or var.shape != mean.shape:
        raise ValueError(
            f"mean and var must be (Q, G) of one shape, got {tuple(mean.shape)} and "
            f"{tuple(var.shape)}."
        )
    indices = torch.sort(mean, dim=1, descending=True, stable=True).indices
    return Ranking(indices, mean, var)


def relevance_matrix(
    targets: torch.Tensor | Sequence[Sequence[int]], n_gallery: int
) -> torch.Tensor:
    """Boolean `(Q, G)` relevance from one target per query or lists of targets.

    Parameters
    ----------
    targets : torch.Tensor or sequence of sequences of int
        `(Q,)` gallery index of each query's match, a `(Q, G)` bool matrix, or one list of
        matching gallery indices per query (e.g. the 5 captions of a COCO image).
    n_gallery : int
        G.

    Returns
    -------
    relevant : torch.Tensor
        `(Q, G)` bool, True where the gallery item matches the query.

    Raises
    ------
    TypeError
        for a non-integer ``n_gallery`` or float target indices.
    ValueError
        for a bool matrix of the wrong shape, indices that are not `(Q,)`, or an empty or
        out-of-range list of targets.
    """
    n_gallery = check_int("n_gallery", n_gallery)
    if isinstance(targets, torch.Tensor) and targets.is_floating_point():
        raise TypeError(f"targets must be integer gallery indices or bool, got {targets.dtype}.")
    if isinstance(targets, torch.Tensor) and targets.dtype == torch.bool:
        if targets.ndim != 2 or targets.shape[1] != n_gallery:
            raise ValueError(f"targets as a bool matrix must be (Q, {n_gallery}).")
        return targets
    if isinstance(targets, torch.Tensor):
        if targets.ndim != 1:
            raise ValueError(f"targets as indices must be (Q,), got {tuple(targets.shape)}.")
        targets = targets[:, None].tolist()
    relevant = torch.zeros(len(targets), n_gallery, dtype=torch.bool)
    for q, items in enumerate(targets):
        items = [check_int(f"targets[{q}] entries", item, minimum=0) for item in items]
        if len(items) == 0 or max(items) >= n_gallery:  # check_int refused negatives
            raise ValueError(f"targets of query {q} must be non-empty indices in [0, {n_gallery}).")
        relevant[q, list(items)] = True
    return relevant


def recall_at_k(
    ranking: Ranking | torch.Tensor,
    targets: torch.Tensor | Sequence[Sequence[int]],
    ks: Sequence[int] = (1, 5, 10),
) -> dict[int, float]:
    """Fraction of queries with at least one relevant item among their top ``k``.

    Parameters
    ----------
    ranking : Ranking or torch.Tensor
        a :class:`Ranking` or its `(Q, G)` sorted ``indices``.
    targets : torch.Tensor or sequence of sequences of int
        see :func:`relevance_matrix`.
    ks : sequence of int, default=(1, 5, 10)
        cut-offs; each is capped at G.

    Returns
    -------
    recall : dict
        ``{k: recall@k}``.

    Raises
    ------
    TypeError
        for a ``ranking`` that is neither a Ranking nor an integer tensor, or a cut-off that
        is not an integer.
    ValueError
        for no cut-offs, a cut-off below 1, or targets of another number of queries.
    """
    indices = ranking.indices if isinstance(ranking, Ranking) else ranking
    if not isinstance(indices, torch.Tensor) or indices.is_floating_point() or indices.ndim != 2:
        raise TypeError(
            "ranking must be a Ranking or its (Q, G) integer indices, got "
            f"{getattr(indices, 'dtype', type(indices).__name__)}."
        )
    ks = [check_int(f"ks[{i}]", k) for i, k in enumerate(ks)]
    if not ks:
        raise ValueError("ks must hold at least one cut-off.")
    relevant = relevance_matrix(targets, indices.shape[1])
    if len(relevant) != len(indices):
        raise ValueError(
            f"targets must have one entry per query ({len(indices)}), got {len(relevant)}."
        )
    hits = relevant.gather(1, indices)  # (Q, G): relevance in ranked order
    first_hit = torch.where(hits.any(1), hits.double().argmax(1), indices.shape[1])
    return {k: (first_hit < k).double().mean().item() for k in ks}
