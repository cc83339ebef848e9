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

DIRECTIONS: tuple[str, ...] = ("image_to_text", "text_to_image")


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
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}.")
    mean, var = la.predictive_moments({"image": image, "text": text}, pred_type=pred_type)
    if direction == "text_to_image":
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
    ValueError
        if ``mean`` is not 2-D or ``var`` has another shape.
    """
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
    ValueError
        for a bool matrix of the wrong shape, indices that are not `(Q,)`, or an empty or
        out-of-range list of targets.
    """
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
        if len(items) == 0 or min(items) < 0 or max(items) >= n_gallery:
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
    """
    indices = ranking.indices if isinstance(ranking, Ranking) else ranking
    relevant = relevance_matrix(targets, indices.shape[1])
    if len(relevant) != len(indices):
        raise ValueError(
            f"targets must have one entry per query ({len(indices)}), got {len(relevant)}."
        )
    hits = relevant.gather(1, indices)  # (Q, G): relevance in ranked order
    first_hit = torch.where(hits.any(1), hits.double().argmax(1), indices.shape[1])
    return {int(k): (first_hit < k).double().mean().item() for k in ks}
