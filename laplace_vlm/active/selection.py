"""Choosing what to label with the posterior: targeting, scores, batches.

The functions here read the posterior (``DualEncoderLaplace``) and the problem's inputs, never
a label. BALD and EPIG take joint logit samples from ``la.functional_samples`` with
``sample_pred_type`` (default ``"nn"``: weight samples of both heads through the exact
normalisation, the faithful predictive); EPIG's targets are query inputs of the target domain,
drawn afresh for every batch.
"""

from __future__ import annotations

from typing import Any

import torch

from laplace_vlm.active import acquisition, targeting
from laplace_vlm.active.acquisition import Strategy
from laplace_vlm.active.config import ActiveLearningConfig, ActiveLearningProblem
from laplace_vlm.active.report import rank_agreement
from laplace_vlm.docstrings import fill_doc

Moments = tuple[torch.Tensor, torch.Tensor]

# what scoring draws from
_fill_doc = fill_doc.extend(
    score_generator="""
        generator : torch.Generator
            randomness of the samples, EPIG's targets and ``random``.
        """
)


def image_moments(la, images: torch.Tensor, class_text: torch.Tensor) -> Moments:
    """Mean and variance `(N, D)` of the image embeddings under the posterior.

    Parameters
    ----------
    la : DualEncoderLaplace
        the posterior.
    images : torch.Tensor
        `(N, d_img)` activations.
    class_text : torch.Tensor
        `(C, d_txt)` (the moments need a text input; only the image side is returned).

    Returns
    -------
    tuple of torch.Tensor
        ``(mean, var)``, `(N, D)` each.
    """
    return la.embedding_moments({"image": images, "text": class_text})["image"]


def unlabelled_mask(n: int, labelled: torch.Tensor) -> torch.Tensor:
    """`(n,)` bool, False at ``labelled``.

    Parameters
    ----------
    n : int
        the pool size.
    labelled : torch.Tensor
        pool indices already labelled.

    Returns
    -------
    torch.Tensor
        `(n,)` bool, True where a point may still be labelled.
    """
    free = torch.ones(n, dtype=torch.bool)
    free[labelled] = False
    return free


def candidates(
    la, problem: ActiveLearningProblem, labelled: torch.Tensor, config: ActiveLearningConfig
) -> torch.Tensor:
    """Unlabelled pool indices in the target neighbourhood (all unlabelled without targeting).

    Parameters
    ----------
    la : DualEncoderLaplace
        the posterior whose embedding moments the distances use.
    problem : ActiveLearningProblem
        pool and test inputs.
    labelled : torch.Tensor
        pool indices already labelled (never candidates).
    config : ActiveLearningConfig
        ``targeting`` and ``k``.

    Returns
    -------
    torch.Tensor
        long pool indices: ``k`` unique neighbours per target in collection order (fewer if
        the unlabelled pool runs out), or every unlabelled index in order.
    """
    free = unlabelled_mask(len(problem.pool), labelled)
    if config.targeting == "none":
        return free.nonzero().squeeze(1)
    pool = image_moments(la, problem.pool, problem.class_text)
    targets = image_moments(la, problem.test, problem.class_text)
    return targeting.nearest_neighbours(
        targets, pool, k=config.k, metric=config.targeting, exclude=~free
    )


@_fill_doc
def score_inputs(
    la,
    images: torch.Tensor,
    problem: ActiveLearningProblem,
    score: str,
    config: ActiveLearningConfig,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores `(N,)` of ``images`` and their MAP classes `(N,)`.

    Parameters
    ----------
    la : DualEncoderLaplace
        the current posterior.
    images : torch.Tensor
        `(N, d_img)` activations to score (pool candidates or test targets).
    problem : ActiveLearningProblem
        its class texts, and its test inputs as EPIG's targets.
    score : str
        one of :data:`laplace_vlm.active.acquisition.SCORES`.
    config : ActiveLearningConfig
        samples, predictives and EPIG's target count.
    %(score_generator)s

    Returns
    -------
    scores : torch.Tensor
        `(N,)` acquisition scores, higher first.
    predicted : torch.Tensor
        `(N,)` MAP classes.
    """
    x = {"image": images, "text": problem.class_text}
    kwargs: dict[str, Any] = {}
    with torch.no_grad():
        map_logits = la.predictive_moments(x, pred_type="map")[0]
        if score in ("entropy", "logit_variance"):
            kwargs["mean"], kwargs["var"] = la.predictive_moments(x, pred_type=config.pred_type)
        elif score == "bald":
            kwargs["samples"] = la.functional_samples(
                x, config.sample_pred_type, config.n_samples, generator=generator
            )
        elif score == "epig":
            kwargs.update(_epig_samples(la, images, problem, config, generator))
        mean = kwargs.pop("mean", map_logits)  # random reads N from it
        scores = acquisition.acquisition_scores(
            score, mean, map_logits=map_logits, generator=generator, **kwargs
        )
    return scores, map_logits.argmax(-1)


def _epig_samples(la, images, problem, config, generator) -> dict[str, torch.Tensor]:
    # one weight draw shared by the inputs and the targets: their predictions are correlated
    # a fresh subset per batch when the queries outnumber n_epig_targets, else all of them
    pick = torch.randperm(len(problem.test), generator=generator)[: config.n_epig_targets]
    joint = {"image": torch.cat([images, problem.test[pick]]), "text": problem.class_text}
    f = la.functional_samples(joint, config.sample_pred_type, config.n_samples,
                              generator=generator)  # fmt: skip
    return {"samples": f[:, : len(images)], "target_samples": f[:, len(images) :]}


@_fill_doc
def weighted_scores(
    la,
    images: torch.Tensor,
    problem: ActiveLearningProblem,
    strategy: Strategy,
    config: ActiveLearningConfig,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`score_inputs`, times the information density for ``*_density`` strategies.

    The density is that of ``images`` against all test inputs of ``problem``, raised to
    ``config.density_beta``.

    Parameters
    ----------
    la : DualEncoderLaplace
        the current posterior.
    images : torch.Tensor
        `(N, d_img)` activations to score.
    problem : ActiveLearningProblem
        its class texts, and its test inputs (EPIG's targets, the density's reference).
    strategy : Strategy
        its ``score`` and whether it is density-weighted.
    config : ActiveLearningConfig
        samples, predictives, EPIG's target count and ``density_beta``.
    %(score_generator)s

    Returns
    -------
    scores : torch.Tensor
        `(N,)` scores, density-weighted for ``*_density`` strategies.
    predicted : torch.Tensor
        `(N,)` MAP classes.
    """
    scores, predicted = score_inputs(la, images, problem, strategy.score, config, generator)
    if strategy.density:
        density = acquisition.information_density(
            image_moments(la, images, problem.class_text),
            image_moments(la, problem.test, problem.class_text),
        )
        scores = scores * density**config.density_beta
    return scores, predicted


def class_counts(labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """`(n_classes,)` long: how many of ``labels`` fall in each class.

    Parameters
    ----------
    labels : torch.Tensor
        `(M,)` int labels in ``[0, n_classes)``.
    n_classes : int
        C.

    Returns
    -------
    torch.Tensor
        the histogram.
    """
    return torch.bincount(labels.cpu().long(), minlength=n_classes)


def select_batch(
    la,
    problem: ActiveLearningProblem,
    strategy: Strategy,
    labelled: torch.Tensor,
    n_new: int,
    config: ActiveLearningConfig,
    generator: torch.Generator,
    labelled_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pool indices `(n_new,)` to label next with ``strategy`` (the rounds protocol).

    Parameters
    ----------
    la : DualEncoderLaplace
        the current posterior.
    problem : ActiveLearningProblem
        pool, queries, class texts.
    strategy : Strategy
        scores, density weighting and selection rule.
    labelled : torch.Tensor
        pool indices already labelled.
    n_new : int
        batch size.
    config : ActiveLearningConfig
        targeting, samples, ``beta``.
    generator : torch.Generator
        randomness of the batch.
    labelled_labels : torch.Tensor, optional
        `(len(labelled),)` their revealed labels: a ``balanced`` strategy's quotas count them.

    Returns
    -------
    torch.Tensor
        `(min(n_new, N_candidates),)` long pool indices, none of them in ``labelled``.
    """
    if not strategy.targeted:
        free = unlabelled_mask(len(problem.pool), labelled).nonzero().squeeze(1)
        return free[torch.randperm(len(free), generator=generator)[:n_new]]
    cand = candidates(la, problem, labelled, config)
    scores, predicted = weighted_scores(la, problem.pool[cand], problem, strategy, config,
                                        generator)  # fmt: skip
    counts = (None if labelled_labels is None
              else class_counts(labelled_labels, len(problem.class_text)))  # fmt: skip
    chosen = acquisition.select(scores, n_new, strategy, config.beta, predicted_class=predicted,
                                counts=counts, generator=generator)  # fmt: skip
    return cand[chosen]


def selection_order(
    scores: torch.Tensor,
    strategy: Strategy,
    config: ActiveLearningConfig,
    predicted: torch.Tensor,
    generator: torch.Generator,
) -> torch.Tensor:
    """Every index of ``scores`` in the order ``strategy`` would pick them (nested budgets).

    Parameters
    ----------
    scores : torch.Tensor
        `(N,)`.
    strategy : Strategy
        its selection rule.
    config : ActiveLearningConfig
        ``beta``.
    predicted : torch.Tensor
        `(N,)` MAP classes (for a ``balanced`` strategy).
    generator : torch.Generator
        randomness of the order.

    Returns
    -------
    torch.Tensor
        `(N,)` long, a permutation of ``0..N-1``: any budget's batch is a prefix.
    """
    return acquisition.select(scores, len(scores), strategy, config.beta,
                              predicted_class=predicted, generator=generator)  # fmt: skip


def mc_agreement(la, problem: ActiveLearningProblem, config: ActiveLearningConfig) -> dict:
    """Round 0's Monte Carlo check: two sample seeds of BALD and EPIG on the same candidates.

    Parameters
    ----------
    la : DualEncoderLaplace
        the zero-shot posterior.
    problem : ActiveLearningProblem
        whose pool the round-0 candidates come from.
    config : ActiveLearningConfig
        samples, queries, targeting; the top-k compared is one batch (``budget``).

    Returns
    -------
    dict
        ``{"bald": rank_agreement(...), "epig": ...}`` over the round-0 candidates, plus
        ``n_samples`` and ``candidates``.
    """
    cand = candidates(la, problem, torch.empty(0, dtype=torch.long), config)
    out: dict = {"n_samples": config.n_samples, "candidates": len(cand)}
    for score in ("bald", "epig"):
        a, b = (score_inputs(la, problem.pool[cand], problem, score, config,
                             torch.Generator().manual_seed(s))[0] for s in (1, 2))  # fmt: skip
        out[score] = rank_agreement(a, b, config.budget)
    return out
