"""Targeting: restrict the pool to the neighbourhood of the target-domain inputs.

Distances between Gaussian (diagonal) image embeddings ``N(mu, diag var)``:

- expected cosine (ProbCosine mean): ``mu_a . mu_b / sqrt(E||a||^2 E||b||^2)``,
  ``E||a||^2 = ||mu_a||^2 + sum var_a`` (higher = closer);
- squared 2-Wasserstein: ``||mu_a - mu_b||^2 + sum (s_a - s_b)^2``, ``s = sqrt(var)``
  (lower = closer).

:func:`nearest_neighbours` collects unique pool neighbours of the targets, rank by rank, until
``k * n_targets`` pool points are found.
"""

from __future__ import annotations

import torch

from laplace_vlm.docstrings import fill_doc

METRICS: tuple[str, ...] = ("wasserstein", "cosine")

# the two sets of Gaussians every distance compares
_fill_doc = fill_doc.extend(
    gaussian_sets="""
        Parameters
        ----------
        mu_a, var_a : torch.Tensor
            `(N_a, D)` means and variances.
        mu_b, var_b : torch.Tensor
            `(N_b, D)`.
        """
)


def _check_pairs(
    mu_a: torch.Tensor, var_a: torch.Tensor, mu_b: torch.Tensor, var_b: torch.Tensor
) -> None:
    """Each mean `(N, D)` and each variance of its mean's shape, for the sets ``a`` and ``b``."""
    for name, mu, var in (("a", mu_a, var_a), ("b", mu_b, var_b)):
        if mu.dim() != 2:
            raise ValueError(f"{name} mean must be (N, D), got shape {tuple(mu.shape)}.")
        if var.shape != mu.shape:
            raise ValueError(
                f"{name} var must have the shape of its mean {tuple(mu.shape)}, "
                f"got {tuple(var.shape)}."
            )


@_fill_doc
def expected_cosine(
    mu_a: torch.Tensor, var_a: torch.Tensor, mu_b: torch.Tensor, var_b: torch.Tensor
) -> torch.Tensor:
    """ProbCosine mean of independent diagonal Gaussians, `(N_a, N_b)`.

    %(gaussian_sets)s

    Returns
    -------
    torch.Tensor
        `(N_a, N_b)` expected cosines in ``[-1, 1]``; higher is closer.
    """
    _check_pairs(mu_a, var_a, mu_b, var_b)
    sq_a = (mu_a.square() + var_a).sum(-1)
    sq_b = (mu_b.square() + var_b).sum(-1)
    return (mu_a @ mu_b.T) / torch.sqrt(sq_a[:, None] * sq_b[None, :])


@_fill_doc
def wasserstein2_sq(
    mu_a: torch.Tensor, var_a: torch.Tensor, mu_b: torch.Tensor, var_b: torch.Tensor
) -> torch.Tensor:
    """Squared 2-Wasserstein distance of diagonal Gaussians, `(N_a, N_b)`.

    ``W2^2 = ||mu_a - mu_b||^2 + ||s_a - s_b||^2`` is a squared Euclidean distance in the
    stacked coordinates ``[mu, sqrt(var)]``, computed with one GEMM and clamped at 0.

    %(gaussian_sets)s

    Returns
    -------
    torch.Tensor
        `(N_a, N_b)` squared distances, ``>= 0``; lower is closer.
    """
    _check_pairs(mu_a, var_a, mu_b, var_b)
    xa = torch.cat([mu_a, var_a.sqrt()], -1)
    xb = torch.cat([mu_b, var_b.sqrt()], -1)
    d = xa.square().sum(-1)[:, None] + xb.square().sum(-1)[None, :] - 2.0 * xa @ xb.T
    return d.clamp_min(0.0)


def neighbour_ranking(
    targets: tuple[torch.Tensor, torch.Tensor],
    pool: tuple[torch.Tensor, torch.Tensor],
    metric: str = "wasserstein",
    chunk_size: int = 1024,
    ranks: int | None = None,
) -> torch.Tensor:
    """Pool indices sorted from nearest to farthest for every target, `(N_t, N_pool)`.

    Parameters
    ----------
    targets, pool : tuple of torch.Tensor
        ``(mean, var)`` pairs of `(N, D)` embedding moments.
    metric : {'wasserstein', 'cosine'}
        the distance: :func:`wasserstein2_sq` or the negated :func:`expected_cosine`.
    chunk_size : int
        targets per distance block (memory).
    ranks : int, optional
        only the first ``ranks`` columns (all if None or larger than the pool), found
        without sorting the whole row.

    Returns
    -------
    torch.Tensor
        `(N_t, min(ranks, N_pool))` long; row ``t`` ranks the pool by distance to target ``t``
        (ties in pool order).
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}.")
    if ranks is not None and (isinstance(ranks, bool) or not isinstance(ranks, int) or ranks < 1):
        raise ValueError(f"ranks must be a positive int or None, got {ranks!r}.")
    rows = []
    for start in range(0, targets[0].shape[0], chunk_size):
        t = (targets[0][start : start + chunk_size], targets[1][start : start + chunk_size])
        if metric == "wasserstein":
            dist = wasserstein2_sq(*t, *pool)
        else:
            dist = -expected_cosine(*t, *pool)
        rows.append(_first_ranks(dist, ranks))
    width = pool[0].shape[0] if ranks is None else min(ranks, pool[0].shape[0])
    return torch.cat(rows) if rows else torch.empty(0, width, dtype=torch.long)


def _first_ranks(dist: torch.Tensor, ranks: int | None) -> torch.Tensor:
    """The first ``ranks`` columns of ``dist``'s stable ascending argsort, `(N, ranks)`.

    ``topk`` finds the ``ranks`` nearest in linear time, in no defined order: sorted by pool
    index and then stably by distance they rank as the full sort does. A row whose
    ``ranks``-th distance ties with one outside the set is sorted in full, as only it knows
    which of the tied points come first.
    """
    if ranks is None or ranks >= dist.shape[1]:
        return torch.sort(dist, dim=-1, stable=True).indices
    values = dist.topk(ranks, dim=-1, largest=False, sorted=False).values
    edge = values.max(-1, keepdim=True).values
    within = dist <= edge
    # more than ranks: a tie at the edge; fewer, or an infinite edge: NaN or inf distances
    ambiguous = (within.sum(-1) != ranks) | ~torch.isfinite(edge[:, 0])
    index = within.nonzero()  # row-major: pool order within each row
    out = torch.empty(dist.shape[0], ranks, dtype=torch.long, device=dist.device)
    clear = ~ambiguous
    if bool(clear.any()):
        index = index[clear[index[:, 0]]][:, 1].view(-1, ranks)
        order = torch.sort(dist[clear].gather(-1, index), dim=-1, stable=True).indices
        out[clear] = index.gather(-1, order)
    if bool(ambiguous.any()):
        out[ambiguous] = torch.sort(dist[ambiguous], dim=-1, stable=True).indices[:, :ranks]
    return out


def nearest_neighbours(
    targets: tuple[torch.Tensor, torch.Tensor],
    pool: tuple[torch.Tensor, torch.Tensor],
    k: int = 1,
    metric: str = "wasserstein",
    exclude: torch.Tensor | None = None,
) -> torch.Tensor:
    """Unique pool neighbours of the targets, until ``k * N_t`` pool points are collected.

    Rank by rank: every target's nearest pool point (in target order, skipping points taken
    already), then every target's second nearest, and so on. Stops early when the eligible
    pool is exhausted.

    Parameters
    ----------
    targets : tuple of torch.Tensor
        ``(mean, var)`` of the target embeddings, `(N_t, D)` each.
    pool : tuple of torch.Tensor
        ``(mean, var)`` of the pool embeddings, `(N_pool, D)` each.
    k : int
        neighbours per target.
    metric : {'wasserstein', 'cosine'}
        the distance (see :func:`neighbour_ranking`).
    exclude : torch.Tensor, optional
        `(N_pool,)` bool mask or indices of pool points that may not be chosen.

    Returns
    -------
    indices : torch.Tensor
        `(min(k N_t, eligible),)` long pool indices, in collection order.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}.")
    n_pool = pool[0].shape[0]
    taken = torch.zeros(n_pool, dtype=torch.bool)
    if exclude is not None:
        taken[exclude.to(torch.long) if exclude.dtype != torch.bool else exclude] = True
    want = min(k * targets[0].shape[0], int((~taken).sum()))
    chosen: list[int] = []
    # column r of the ranking holds every target's r-th neighbour, in target order; the
    # collection rarely needs more than a few ranks, so they are found a few at a time
    done, ranks = 0, 4 * k
    while len(chosen) < want and done < n_pool:
        ranking = neighbour_ranking(targets, pool, metric, ranks=ranks).cpu()
        for r in range(done, ranking.shape[1]):
            for j in ranking[:, r].tolist():
                if not taken[j]:
                    taken[j] = True
                    chosen.append(j)
                    if len(chosen) == want:
                        return torch.tensor(chosen, dtype=torch.long)
        done, ranks = ranking.shape[1], 4 * ranks
    return torch.tensor(chosen, dtype=torch.long)
