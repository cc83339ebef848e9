"""
Active few-shot adaptation
==========================

Label a few images of a shifted target domain, chosen with the posterior, and adapt. The
pool holds clean and rotated training digits; the target domain is the rotated test set
(severity 0.2: zero-shot accuracy about 0.6, the paper's regime). Every round labels
``budget`` pool points chosen among the nearest pool neighbours of the target inputs,
fine-tunes the image projection on everything labelled so far (epochs chosen by
cross-validation on the labels) and adds the labelled images' C-way curvature to the
posterior.

This page runs a small version (2 seeds, 3 rounds of 20 labels, 100 posterior samples, 2
cross-validation folds) so that it builds in under a minute (about 20 s of CPU); its
differences are within noise. The full experiment is ``laplace-vlm active`` (10 seeds;
results in the README), the sweep over shifts ``laplace-vlm active --sweep``.
"""

import copy

import torch

from laplace_vlm.active import acquisition, batch_rules, targeting
from laplace_vlm.active.adaptation import cv_folds, finetune_image_projection
from laplace_vlm.active.config import ActiveLearningConfig
from laplace_vlm.active.experiment import run_experiment
from laplace_vlm.active.figures import learning_curves_figure, save_figure
from laplace_vlm.active.posterior_update import update_posterior
from laplace_vlm.active.report import format_table, summarize
from laplace_vlm.experiments.active import DemoSetting, prepare


def one_round_by_hand(la, problem, budget: int = 20, seed: int = 0) -> None:
    """What the runner does in one round, spelled out with the building blocks."""
    la = copy.deepcopy(la)  # the runner starts from the zero-shot posterior
    g = torch.Generator().manual_seed(seed)
    x_pool = {"image": problem.pool, "text": problem.class_text}
    x_test = {"image": problem.test, "text": problem.class_text}
    # 1. targeting: pool points nearest (2-Wasserstein between Gaussian embeddings) to the targets
    pool_emb = la.embedding_moments(x_pool)["image"]
    test_emb = la.embedding_moments(x_test)["image"]
    cand = targeting.nearest_neighbours(test_emb, pool_emb, k=1, metric="wasserstein")
    # 2. EPIG from joint weight samples through the exact normalisation (pred_type="nn"),
    #    one draw shared by candidates and query targets; a batch sampled with p ~ EPIG
    targets = problem.test[torch.randperm(len(problem.test), generator=g)[:100]]
    joint = {"image": torch.cat([problem.pool[cand], targets]), "text": problem.class_text}
    f = la.functional_samples(joint, n_samples=200, generator=g)
    scores = acquisition.epig_from_samples(f[:, : len(cand)], f[:, len(cand) :])
    picked = cand[batch_rules.select_stochastic(scores, budget, "power", generator=g)]
    # 3. adapt: fine-tune with the epoch of lowest cross-validated loss, then update the posterior
    labelled = (problem.pool[picked], problem.pool_labels[picked])
    folds = cv_folds(labelled[1], 4, generator=g)
    fit = finetune_image_projection(la.heads, labelled, problem.class_text, folds=folds)
    before = (la(x_test, pred_type="map").argmax(-1) == problem.test_labels).double().mean()
    update_posterior(la, fit.projection, labelled, problem.class_text)
    after = (la(x_test, pred_type="map").argmax(-1) == problem.test_labels).double().mean()
    print(f"one power-EPIG round of {budget} labels: target accuracy {before:.3f} -> {after:.3f}")


# %%
# One round by hand, then the runner
# ----------------------------------
# ``prepare`` builds the zero-shot posterior and the pool / target problem of every seed.

torch.set_num_threads(1)  # the heads are tiny matrices: threads only add overhead
config = ActiveLearningConfig(
    strategies=("random", "map_entropy", "epig_power"),
    seeds=(0, 1),
    rounds=3,
    n_samples=100,
    n_epig_targets=100,
    cv_folds=2,  # the full experiment's 4 folds double the fine-tuning time
)
prepared = prepare(DemoSetting(dataset="digits", shift="rotation", severity=0.2), config)
one_round_by_hand(prepared.la, prepared.problem(0))

# %%
# The experiment: every strategy on the same seeds, accuracy on the target after each round

summary = summarize(run_experiment(prepared.la, prepared.problem, config))
print(format_table(summary))
save_figure(learning_curves_figure(summary, title="digits, rotation 0.2"), "active_learning.png")
