"""Active few-shot adaptation of a dual encoder with Laplace uncertainty (paper section 2.2).

One experiment: a **pool** of unlabelled images (source and shifted domains), a **target**
domain whose unlabelled test inputs are the queries (and whose labels are used only for
evaluation), and a labelled target **validation** split for early stopping. Every round:

1. restrict the pool to the unique nearest neighbours of the target inputs (expected cosine
   or 2-Wasserstein between the Gaussian image embeddings; :mod:`laplace_vlm.active.targeting`),
2. score the candidates with an acquisition function (:mod:`laplace_vlm.active.acquisition`) and
   label the top ``budget``,
3. fine-tune the image projection on everything labelled so far, from the pretrained weights
   (:func:`laplace_vlm.active.adaptation.finetune_image_projection`), and move the posterior there,
   adding the new pairs to its curvature (:func:`laplace_vlm.active.adaptation.update_posterior`);
4. re-choose the pseudo-count ``n`` on the validation split (optional, default on: the
   posterior's scale should track the labelled data), and
5. evaluate accuracy, ECE (20 bins) and NLPD of the Laplace predictive (ProbCosine, probit)
   on the target test set.

The target test inputs double as the unlabelled queries (transductive, as in the paper's
reference code); their labels are only used for evaluation.

Strategies: the acquisition functions of :data:`laplace_vlm.active.acquisition.STRATEGIES`, applied
to the targeted candidates, plus ``"random_untargeted"`` (uniform over the whole pool, the
reference's ``random_on_train``). BALD and EPIG use joint logit samples from the posterior over
the weights (``la.functional_samples``, linearised), so that pool and target predictions are
correlated as EPIG requires; entropy and logit variance use the ProbCosine moments.

``laplace-vlm active`` runs this on the embedded digits demo (:mod:`laplace_vlm.demo.active`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from laplace_vlm.active import acquisition, targeting
from laplace_vlm.active.adaptation import (
    finetune_image_projection,
    update_posterior,
)

RANDOM_UNTARGETED = "random_untargeted"
STRATEGIES: tuple[str, ...] = (RANDOM_UNTARGETED, *acquisition.STRATEGIES)
DEFAULT_STRATEGIES: tuple[str, ...] = (
    RANDOM_UNTARGETED,
    "random",
    "map_entropy",
    "entropy",
    "bald",
    "epig",
)
TARGETING: tuple[str, ...] = ("wasserstein", "cosine", "none")
PSEUDO_COUNTS: tuple[float, ...] = (1, 3, 10, 30, 100, 300, 1000, 3000)


@dataclass
class ActiveLearningProblem:
    """Pre-projection features of one active-learning problem.

    Attributes
    ----------
    pool, pool_labels : torch.Tensor
        `(N, d_img)` activations and `(N,)` labels (revealed only when a point is picked).
    val, val_labels : torch.Tensor
        `(M, d_img)`, `(M,)`: labelled target-domain split for early stopping.
    test, test_labels : torch.Tensor
        `(T, d_img)`, `(T,)`: target-domain inputs (the unlabelled queries) and the labels
        used for evaluation only.
    class_text : torch.Tensor
        `(C, d_txt)` class text activations.
    """

    pool: torch.Tensor
    pool_labels: torch.Tensor
    val: torch.Tensor
    val_labels: torch.Tensor
    test: torch.Tensor
    test_labels: torch.Tensor
    class_text: torch.Tensor

    def __post_init__(self) -> None:
        for name in ("pool", "val", "test"):
            x, y = getattr(self, name), getattr(self, f"{name}_labels")
            if x.dim() != 2:
                raise ValueError(f"{name} must be (N, d_img), got shape {tuple(x.shape)}.")
            if y.shape != x.shape[:1]:
                raise ValueError(f"{name}_labels must be ({len(x)},), got {tuple(y.shape)}.")
        if self.class_text.dim() != 2:
            raise ValueError(f"class_text must be (C, d_txt), got {tuple(self.class_text.shape)}.")


@dataclass
class ActiveLearningConfig:
    """Settings of :func:`run_experiment`.

    Attributes
    ----------
    strategies : sequence of str
        from :data:`STRATEGIES`.
    rounds : int
        acquisition rounds; the labelled budget after round r is ``r * budget``.
    budget : int
        labels acquired per round.
    seeds : sequence of int
    targeting : {'wasserstein', 'cosine', 'none'}
        kNN restriction of the pool to the target neighbourhood ('none': whole pool).
    k : int
        neighbours per target input.
    class_balanced : bool
        balance each batch over the predicted classes.
    n_samples : int
        joint logit samples for BALD and EPIG.
    n_epig_targets : int
        target inputs (random, per round) whose predictions EPIG is about.
    predictive : {'probcosine', 'probcosine_diag', 'glm'}
        logit moments for entropy, logit variance and evaluation.
    lr, weight_decay, epochs, patience, batch_size
        fine-tuning (AdamW, early stopping on the validation loss).
    recalibrate : bool
        after every posterior update, re-choose the pseudo-count on the validation split
        (:func:`select_pseudo_count` over the grid values >= a third of the current one: the
        labelled data only grow, so the best ``n`` does not fall by much).
    pseudo_counts : sequence of float
        the grid for ``recalibrate``.
    """

    strategies: Sequence[str] = DEFAULT_STRATEGIES
    rounds: int = 5
    budget: int = 20
    seeds: Sequence[int] = tuple(range(10))
    targeting: str = "wasserstein"
    k: int = 1
    class_balanced: bool = False
    n_samples: int = 200
    n_epig_targets: int = 100
    predictive: str = "probcosine"
    lr: float = 3e-3
    weight_decay: float = 5e-2
    epochs: int = 300
    patience: int = 30
    batch_size: int = 256
    recalibrate: bool = True
    pseudo_counts: Sequence[float] = PSEUDO_COUNTS

    def __post_init__(self) -> None:
        unknown = [s for s in self.strategies if s not in STRATEGIES]
        if unknown or not self.strategies:
            raise ValueError(
                f"strategies must be a non-empty subset of {STRATEGIES}, got {unknown}."
            )
        if self.targeting not in TARGETING:
            raise ValueError(f"targeting must be one of {TARGETING}, got {self.targeting!r}.")
        for name in ("rounds", "budget", "k", "n_samples", "n_epig_targets"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if not self.seeds:
            raise ValueError("seeds must not be empty.")


# --------------------------------------------------------------------------- one round


def _probs(la, x: dict, predictive: str) -> torch.Tensor:
    from laplace_vlm.predictive.links import probit_softmax

    mean, var = la.predictive_moments(x, pred_type=predictive)
    return probit_softmax(mean, var)


def evaluate(
    la, problem: ActiveLearningProblem, predictive: str = "probcosine"
) -> dict[str, float]:
    """Accuracy, ECE, NLPD (Laplace predictive, probit) and MAP accuracy on the target test set."""
    from laplace_vlm.evaluation.metrics import accuracy, ece, nlpd

    x = {"image": problem.test, "text": problem.class_text}
    probs = _probs(la, x, predictive)
    y = problem.test_labels
    map_probs = la(x, pred_type="map")
    return {
        "acc": accuracy(probs, y),
        "ece": ece(probs, y),
        "nlpd": nlpd(probs, y),
        "map_acc": accuracy(map_probs, y),
    }


def candidates(
    la, problem: ActiveLearningProblem, labelled: torch.Tensor, config: ActiveLearningConfig
) -> torch.Tensor:
    """Unlabelled pool indices in the target neighbourhood (all unlabelled ones without targeting)."""
    unlabelled = torch.ones(len(problem.pool), dtype=torch.bool)
    unlabelled[labelled] = False
    if config.targeting == "none":
        return unlabelled.nonzero().squeeze(1)
    pool = la.embedding_moments({"image": problem.pool, "text": problem.class_text})["image"]
    targets = la.embedding_moments({"image": problem.test, "text": problem.class_text})["image"]
    return targeting.nearest_neighbours(
        targets, pool, k=config.k, metric=config.targeting, exclude=~unlabelled
    )


def select_batch(
    la,
    problem: ActiveLearningProblem,
    strategy: str,
    labelled: torch.Tensor,
    config: ActiveLearningConfig,
    generator: torch.Generator,
) -> torch.Tensor:
    """Pool indices `(budget,)` to label next with ``strategy``."""
    if strategy == RANDOM_UNTARGETED:
        free = torch.ones(len(problem.pool), dtype=torch.bool)
        free[labelled] = False
        idx = free.nonzero().squeeze(1)
        return idx[torch.randperm(len(idx), generator=generator)[: config.budget]]
    cand = candidates(la, problem, labelled, config)
    x = {"image": problem.pool[cand], "text": problem.class_text}
    mean, var = la.predictive_moments(x, pred_type=config.predictive)
    kwargs: dict[str, Any] = {}
    with torch.no_grad():
        if strategy == "map_entropy":
            kwargs["map_logits"] = la.model(x)
        elif strategy == "bald":
            kwargs["samples"] = la.functional_samples(
                x, "glm", config.n_samples, generator=generator
            )
        elif strategy == "epig":
            # one weight draw shared by candidates and targets: their predictions are correlated
            pick = torch.randperm(len(problem.test), generator=generator)[: config.n_epig_targets]
            joint = {
                "image": torch.cat([x["image"], problem.test[pick]]),
                "text": problem.class_text,
            }
            f = la.functional_samples(joint, "glm", config.n_samples, generator=generator)
            kwargs.update(samples=f[:, : len(cand)], target_samples=f[:, len(cand) :])
        scores = acquisition.acquisition_scores(
            strategy, mean, var, n_samples=config.n_samples, generator=generator, **kwargs
        )
    chosen = acquisition.select_top(
        scores,
        config.budget,
        class_balanced=config.class_balanced,
        predicted_class=mean.argmax(-1),
        generator=generator,
    )
    return cand[chosen]


def run_strategy(
    la_init,
    problem: ActiveLearningProblem,
    strategy: str,
    seed: int,
    config: ActiveLearningConfig,
) -> dict[int, dict[str, float]]:
    """One active-learning run; ``{budget: metrics}`` with budget 0 the zero-shot model.

    ``la_init`` is not modified (the run works on a deep copy).
    """
    la = copy.deepcopy(la_init)
    init = copy.deepcopy(la.model.image_projection)
    generator = torch.Generator().manual_seed(int(seed))
    labelled = torch.empty(0, dtype=torch.long)
    results = {0: evaluate(la, problem, config.predictive)}
    for _ in range(config.rounds):
        new = select_batch(la, problem, strategy, labelled, config, generator)
        if len(new) == 0:
            break
        labelled = torch.cat([labelled, new])
        fit = finetune_image_projection(
            la.model,
            (problem.pool[labelled], problem.pool_labels[labelled]),
            (problem.val, problem.val_labels),
            problem.class_text,
            init=init,
            lr=config.lr,
            weight_decay=config.weight_decay,
            epochs=config.epochs,
            batch_size=config.batch_size,
            patience=config.patience,
            generator=generator,
        )
        new_pairs = (problem.pool[new], problem.pool_labels[new])
        update_posterior(la, fit.projection, new_pairs, problem.class_text, generator)
        if config.recalibrate:
            grid = [n for n in config.pseudo_counts if n >= 1.0 / (3.0 * la.temperature)]
            val = (problem.val, problem.val_labels)
            select_pseudo_count(la, val, problem.class_text, grid or [1.0 / la.temperature])
        results[len(labelled)] = evaluate(la, problem, config.predictive)
    return results


Results = dict[str, dict[int, list[dict[str, float]]]]


def run_experiment(
    la_init,
    problem: ActiveLearningProblem | Callable[[int], ActiveLearningProblem],
    config: ActiveLearningConfig,
    progress_bar: bool = False,
) -> Results:
    """All strategies x seeds.

    Parameters
    ----------
    la_init : DualEncoderLaplace
        the fitted zero-shot posterior (copied for every run).
    problem : ActiveLearningProblem or callable
        the problem, or ``seed -> problem`` (e.g. a freshly drawn shifted pool per seed).
    config : ActiveLearningConfig
    progress_bar : bool

    Returns
    -------
    results : dict
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


def summarize(results: Results) -> dict[str, dict[str, dict[str, float]]]:
    """``{strategy: {budget: {acc_mean, acc_std, ece_mean, nlpd_mean, map_acc_mean, n_seeds,
    acc_per_seed}}}``.

    Budgets become strings (JSON keys); the std is the sample std over seeds (0 for one seed);
    ``acc_per_seed`` (in seed order) allows paired comparisons between strategies.
    """
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for strategy, by_budget in results.items():
        summary[strategy] = {}
        for budget in sorted(by_budget):
            runs = by_budget[budget]
            acc = torch.tensor([r["acc"] for r in runs], dtype=torch.float64)
            row = {
                "acc_mean": acc.mean().item(),
                "acc_std": acc.std().item() if len(acc) > 1 else 0.0,
            }
            for key in ("ece", "nlpd", "map_acc"):
                row[f"{key}_mean"] = sum(r[key] for r in runs) / len(runs)
            row["n_seeds"] = len(runs)
            row["acc_per_seed"] = acc.tolist()
            summary[strategy][str(budget)] = row
    return summary


def plot_learning_curves(
    summary: Mapping[str, Mapping[str, Mapping[str, float]]],
    path: str | Path,
    metric: str = "acc",
    title: str | None = None,
) -> Path:
    """Accuracy (or another ``metric``) vs labelled budget, one line per strategy, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    for strategy, by_budget in summary.items():
        budgets = sorted(by_budget, key=int)
        mean = [by_budget[b][f"{metric}_mean"] for b in budgets]
        xs = [int(b) for b in budgets]
        line = ax.plot(xs, mean, marker="o", label=strategy)[0]
        if f"{metric}_std" in by_budget[budgets[0]]:
            std = [by_budget[b][f"{metric}_std"] for b in budgets]
            lo = [m - s for m, s in zip(mean, std)]
            hi = [m + s for m, s in zip(mean, std)]
            ax.fill_between(xs, lo, hi, alpha=0.15, color=line.get_color())
    ax.set_xlabel("labelled budget")
    ax.set_ylabel(metric)
    ax.set_title(title or f"{metric} on the target test set")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def format_table(summary: Mapping[str, Mapping[str, Mapping[str, float]]]) -> str:
    """Plain-text table of ``acc mean±std (ECE, NLPD)`` per strategy and budget."""
    budgets = sorted({b for rows in summary.values() for b in rows}, key=int)
    width = max(len(s) for s in summary) + 2
    lines = ["strategy".ljust(width) + "".join(f"{'n=' + b:>22}" for b in budgets)]
    for strategy, rows in summary.items():
        cells = []
        for b in budgets:
            r = rows.get(b)
            cells.append(
                f"{r['acc_mean']:.3f}±{r['acc_std']:.3f} ({r['ece_mean']:.3f})" if r else "-"
            )
        lines.append(strategy.ljust(width) + "".join(f"{c:>22}" for c in cells))
    return "\n".join(lines) + "\n(acc mean±std over seeds, ECE in brackets)"


def select_pseudo_count(
    la,
    val: tuple[torch.Tensor, torch.Tensor],
    class_text: torch.Tensor,
    pseudo_counts: Sequence[float] = PSEUDO_COUNTS,
    predictive: str = "probcosine",
) -> tuple[float, dict[float, float]]:
    """Set the pseudo-count ``n`` (``temperature = 1/n``) of lowest validation NLPD.

    At every ``n`` the prior precision is re-optimised by the marginal likelihood; ``la``
    is left at the best ``n`` and its prior precision.

    Parameters
    ----------
    la : DualEncoderLaplace
        fitted posterior (modified in place).
    val : tuple of torch.Tensor
        ``(activations (M, d_img), labels (M,))``: labelled target-domain split.
    class_text : torch.Tensor
        `(C, d_txt)`.
    pseudo_counts : sequence of float
        the grid.
    predictive : str
        logit moments of the probit predictive.

    Returns
    -------
    best : float
        the chosen ``n``.
    nlpd_by_n : dict
        validation NLPD at every ``n``.
    """
    from laplace_vlm.evaluation.metrics import nlpd

    if not pseudo_counts or min(pseudo_counts) <= 0:
        raise ValueError(f"pseudo_counts must be positive numbers, got {pseudo_counts}.")
    x = {"image": val[0], "text": class_text}
    scores, priors = {}, {}
    for n in pseudo_counts:
        la.temperature, la.prior_precision = 1.0 / n, 1.0
        la.optimize_prior_precision(method="marglik", prior_structure="layerwise")
        scores[float(n)] = nlpd(_probs(la, x, predictive), val[1])
        priors[float(n)] = la.prior_precision.detach().clone()
    best = min(scores, key=scores.get)
    la.temperature, la.prior_precision = 1.0 / best, priors[best]
    return best, scores
