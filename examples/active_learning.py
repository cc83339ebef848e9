"""Active few-shot adaptation with Laplace uncertainty on the offline digits demo.

The pool holds clean and rotated training digits, the target domain is the rotated test set.
Every round labels ``budget`` pool points chosen by an acquisition function among the nearest
pool neighbours of the target inputs, fine-tunes the image projection on everything labelled
so far and adds the new pairs to the posterior.

    python examples/active_learning.py --seeds 5 --plot active.png

First run: trains the small demo CLIP (a minute or two on a laptop CPU) and caches it.
The same experiment is ``laplace-vlm active``.
"""

from __future__ import annotations

import argparse
import copy

import torch

from laplace_vlm.active import acquisition, targeting
from laplace_vlm.active.loop import (
    ActiveLearningConfig,
    format_table,
    plot_learning_curves,
    run_experiment,
    summarize,
)
from laplace_vlm.active.adaptation import finetune_image_projection, update_posterior
from laplace_vlm.demo.active import DigitsSetting, digits_setup


def one_round_by_hand(la, problem, budget: int = 20, seed: int = 0) -> None:
    """What the runner does in one round, spelled out with the building blocks."""
    g = torch.Generator().manual_seed(seed)
    x_pool = {"image": problem.pool, "text": problem.class_text}
    x_test = {"image": problem.test, "text": problem.class_text}
    # 1. targeting: pool points nearest (2-Wasserstein between Gaussian embeddings) to the targets
    pool_emb = la.embedding_moments(x_pool)["image"]
    test_emb = la.embedding_moments(x_test)["image"]
    cand = targeting.nearest_neighbours(test_emb, pool_emb, k=1, metric="wasserstein")
    # 2. EPIG: joint logit samples of candidates and targets from one posterior weight draw
    targets = problem.test[torch.randperm(len(problem.test), generator=g)[:100]]
    joint = {"image": torch.cat([problem.pool[cand], targets]), "text": problem.class_text}
    f = la.functional_samples(joint, "glm", n_samples=200, generator=g)
    scores = acquisition.epig_from_samples(f[:, : len(cand)], f[:, len(cand) :])
    picked = cand[acquisition.select_top(scores, budget, generator=g)]
    # 3. adapt: fine-tune the image projection, then move and update the posterior
    labelled = (problem.pool[picked], problem.pool_labels[picked])
    fit = finetune_image_projection(
        la.model, labelled, (problem.val, problem.val_labels), problem.class_text, lr=3e-3
    )
    before = (la(x_test, pred_type="map").argmax(-1) == problem.test_labels).double().mean()
    update_posterior(la, fit.projection, labelled, problem.class_text)
    after = (la(x_test, pred_type="map").argmax(-1) == problem.test_labels).double().mean()
    print(f"one EPIG round of {budget} labels: target accuracy {before:.3f} -> {after:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--budget", type=int, default=20)
    parser.add_argument("--plot", default="active_learning.png")
    args = parser.parse_args()

    torch.set_num_threads(1)  # the heads are tiny matrices: threads only add overhead
    # pseudo_count=None: chosen on the labelled target validation split (lowest NLPD)
    la, problem = digits_setup(DigitsSetting(shift="rotation", severity=0.4, pseudo_count=None))
    one_round_by_hand(copy.deepcopy(la), problem(0))  # a copy: the runner starts from zero-shot

    config = ActiveLearningConfig(
        strategies=("random_untargeted", "random", "map_entropy", "entropy", "bald", "epig"),
        rounds=args.rounds,
        budget=args.budget,
        seeds=tuple(range(args.seeds)),
    )
    summary = summarize(run_experiment(la, problem, config, progress_bar=True))
    print(format_table(summary))
    print("plot:", plot_learning_curves(summary, args.plot))


if __name__ == "__main__":
    main()
