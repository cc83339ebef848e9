"""The reference scripts' protocol (``protocol="reference"``): one-shot selection per budget.

As in the paper's ``scripts/activelearning.py``: with the zero-shot posterior, score the
target-domain test inputs, take the best ``ceil(L / k)`` of them and label their ``k`` nearest
unique pool neighbours (``random_on_test``, ``entropy_map``, ``bald_test`` + kNN); uniform
pool points for ``random_untargeted`` (``random_on_train``). EPIG scores the pool restricted
to the 1-nearest neighbours of the test inputs and labels its best ``L`` (the reference's
``epig_knn`` is greedy and online, with an SGD step and a rank-one curvature update after
every pick; here it is one-shot, like the others). The image projection is then fine-tuned
from the pretrained weights with the reference's AdamW lr 1e-5 for 100 epochs (batch 30),
keeping the best validation epoch. Every budget ``L`` is an independent selection from the
zero-shot posterior; the orders are computed once, so the supports are nested.

The adaptation after the selection (validation on the labelled support set, posterior update,
pseudo-count) is that of :func:`laplace_vlm.active.loop.adapt`, so that the two protocols
differ only in selection and fine-tuning.
"""

from __future__ import annotations

import math

import torch

from laplace_vlm.active import targeting
from laplace_vlm.active.acquisition import Strategy
from laplace_vlm.active.config import ActiveLearningConfig, ActiveLearningProblem
from laplace_vlm.active.loop import LabelOracle, adapt, result_row, zero_shot_row
from laplace_vlm.active.selection import image_moments, selection_order, weighted_scores
from laplace_vlm.docstrings import fill_doc


def knn_support(
    target_order: torch.Tensor,
    n_labels: int,
    targets: tuple[torch.Tensor, torch.Tensor],
    pool: tuple[torch.Tensor, torch.Tensor],
    config: ActiveLearningConfig,
) -> torch.Tensor:
    """Pool indices `(n_labels,)`: the ``k`` nearest unique neighbours of the first targets.

    Parameters
    ----------
    target_order : torch.Tensor
        test indices in selection order.
    n_labels : int
        L; the first ``ceil(L / k)`` targets are used.
    targets, pool : tuple of torch.Tensor
        ``(mean, var)`` image-embedding moments of all test inputs and of the pool.
    config : ActiveLearningConfig
        ``k`` and the distance (``targeting``; 'none' falls back to 2-Wasserstein).

    Returns
    -------
    torch.Tensor
        `(min(n_labels, N_pool),)` long pool indices, in collection order.
    """
    chosen = target_order[: math.ceil(n_labels / config.k)]
    metric = "wasserstein" if config.targeting == "none" else config.targeting
    sub = (targets[0][chosen], targets[1][chosen])
    return targeting.nearest_neighbours(sub, pool, k=config.k, metric=metric)[:n_labels]


def reference_supports(
    la, problem: ActiveLearningProblem, strategy: Strategy, config, generator
) -> dict[int, torch.Tensor]:
    """``{L: pool indices}`` for every budget ``L`` of ``config``, from one scoring.

    Parameters
    ----------
    la : DualEncoderLaplace
        the zero-shot posterior that scores.
    problem : ActiveLearningProblem
        pool, test targets, class texts.
    strategy : Strategy
        what to score and how to order.
    config : ActiveLearningConfig
        budgets, ``k``, the distance, samples.
    generator : torch.Generator
        randomness of the scores and orders.

    Returns
    -------
    dict of int to torch.Tensor
        budget -> its pool indices to label; a smaller budget's are a prefix of a larger's.
    """
    budgets = config.budgets
    if not strategy.targeted:
        order = torch.randperm(len(problem.pool), generator=generator)
        return {n: order[:n] for n in budgets}
    pool = image_moments(la, problem.pool, problem.class_text)
    tests = image_moments(la, problem.test, problem.class_text)
    if strategy.score == "epig":
        metric = "wasserstein" if config.targeting == "none" else config.targeting
        region = targeting.nearest_neighbours(tests, pool, k=1, metric=metric)
        scores, predicted = weighted_scores(la, problem.pool[region], problem, strategy,
                                            config, generator)  # fmt: skip
        order = region[selection_order(scores, strategy, config, predicted, generator)]
        return {n: order[:n] for n in budgets}
    scores, predicted = weighted_scores(la, problem.test, problem, strategy, config, generator)
    order = selection_order(scores, strategy, config, predicted, generator)
    return {n: knn_support(order, n, tests, pool, config) for n in budgets}


@fill_doc
def run_reference(
    la_init, problem: ActiveLearningProblem, strategy: Strategy, seed: int, config
) -> dict[int, dict[str, float]]:
    """The reference protocol for one strategy and seed: ``{budget: metrics}``, 0 = zero-shot.

    Every budget's support is chosen at once from the zero-shot posterior's scores
    (:func:`reference_supports`), and its adaptation starts from the zero-shot posterior.

    %(protocol_run)s
    """
    generator = torch.Generator().manual_seed(int(seed))
    results = {0: zero_shot_row(la_init, problem, config)}
    for n, picked in reference_supports(la_init, problem, strategy, config, generator).items():
        oracle = LabelOracle(problem.pool_labels)  # every budget is a selection of its own
        support = (problem.pool[picked], oracle(picked))
        la, info = adapt(la_init, support, problem, config, generator)
        results[len(picked)] = result_row(la, problem, config, oracle, info)
    return results
