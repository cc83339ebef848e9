"""Running an experiment: every strategy on every seed, with the protocol of the config."""

from __future__ import annotations

from collections.abc import Callable

from tqdm.auto import tqdm

from laplace_vlm.active.acquisition import Strategy
from laplace_vlm.active.config import ActiveLearningConfig, ActiveLearningProblem
from laplace_vlm.active.loop import run_rounds
from laplace_vlm.active.reference import run_reference
from laplace_vlm.docstrings import fill_doc

Results = dict[str, dict[int, list[dict[str, float]]]]
"""``{strategy: {budget: [metrics of each seed, in seed order]}}``."""


@fill_doc
def run_strategy(la_init, problem, strategy: str, seed: int, config) -> dict[int, dict[str, float]]:
    """One run of ``config.protocol``: ``{budget: metrics}``, 0 = zero-shot.

    Parameters
    ----------
    %(zero_shot_posterior)s
    %(active_problem)s
    strategy : str
        a strategy name (:class:`laplace_vlm.active.acquisition.Strategy`).
    seed : int
        the run's seed.
    config : ActiveLearningConfig
        the experiment; ``protocol`` picks :func:`laplace_vlm.active.loop.run_rounds` or
        :func:`laplace_vlm.active.reference.run_reference`.

    Returns
    -------
    %(budget_metrics)s
    """
    parsed = Strategy.parse(strategy)
    run = run_reference if config.protocol == "reference" else run_rounds
    return run(la_init, problem, parsed, seed, config)


def run_experiment(
    la_init,
    problem: ActiveLearningProblem | Callable[[int], ActiveLearningProblem],
    config: ActiveLearningConfig,
    progress_bar: bool = False,
) -> Results:
    """All strategies x seeds, paired: every strategy sees the same problem for a seed.

    Parameters
    ----------
    la_init : DualEncoderLaplace
        the zero-shot posterior (copied for every run).
    problem : ActiveLearningProblem or callable
        the problem, or ``seed -> problem`` (e.g. a freshly drawn shifted pool per seed).
    config : ActiveLearningConfig
        the experiment.
    progress_bar : bool
        show a progress bar over the runs.

    Returns
    -------
    Results
        ``{strategy: {budget: [metrics of each seed]}}``.
    """
    results: Results = {s: {} for s in config.strategies}
    runs = [(seed, s) for seed in config.seeds for s in config.strategies]
    current: tuple[int, ActiveLearningProblem] | None = None
    for seed, strategy in tqdm(runs, desc="[active learning]", disable=not progress_bar):
        if current is None or current[0] != seed:
            current = (seed, problem(seed) if callable(problem) else problem)
        for budget, metrics in run_strategy(la_init, current[1], strategy, seed, config).items():
            results[strategy].setdefault(budget, []).append(metrics)
    return results
