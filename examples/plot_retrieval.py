"""
Retrieval with uncertainty
==========================

Test digits are the image side and one caption per test digit ("a handwritten seven.") the
text side; a retrieved item is relevant when it shows / names the same digit. Items are ranked
by their expected similarity under the Laplace posterior (the ProbCosine mean), and each score
comes with a variance. Answering only the queries whose top score is most certain should
raise precision: the plot shows top-1 error against the fraction of queries answered, with
the queries ordered by the variance of their top score.
"""

import torch
from torch.utils.data import DataLoader, TensorDataset

from laplace_vlm.adapters.features import extract_features
from laplace_vlm.evaluation.plots import risk_coverage_plot
from laplace_vlm.evaluation.selective import risk_coverage_curve
from laplace_vlm.experiments import recipe
from laplace_vlm.tasks.retrieval import rank, recall_at_k

torch.set_num_threads(1)

model, tokenizer = recipe.load_clip("digits")
splits = recipe.load_splits("digits", seed=0)
test_x, test_y = splits["test"]
generator = torch.Generator().manual_seed(0)


def pair_activations(images: torch.Tensor, labels: torch.Tensor):
    """Image activations and those of one random caption per image."""
    tokens = tokenizer(recipe.captions("digits", labels, generator))
    features = extract_features(model, DataLoader(TensorDataset(images, tokens), 512))
    return features.image.activations, features.text.activations


# %%
# The posterior of both heads, from held-out pairs (classes = the other modality in the batch)

la = recipe.fit_zero_shot_posterior(model, tokenizer, *splits["curvature"], seed=0)
la.temperature = 1 / 1000
la.optimize_prior_precision(method="marglik", prior_structure="layerwise")

# %%
# Recall@k, and the precision of the certain and the uncertain half of the queries

noisy_x = recipe.SHIFTS["noise"](test_x, 0.8, torch.Generator().manual_seed(0))
same_digit = test_y[:, None] == test_y[None, :]  # relevant gallery items
curves = {}
for name, images in (("clean", test_x), ("noise 0.8", noisy_x)):
    image_acts, text_acts = pair_activations(images, test_y)
    print(f"\n{name} ({len(test_y)} images, {len(test_y)} captions)")
    for direction in ("image_to_text", "text_to_image"):
        ranking = rank(la, image_acts, text_acts, direction=direction)
        recall = recall_at_k(ranking, same_digit, ks=(1, 5))
        top, _, top_var = ranking.top(1)
        correct = same_digit.gather(1, top)[:, 0]
        certain = top_var[:, 0] <= top_var[:, 0].median()
        print(f"  {direction:<14} R@1 {recall[1]:.3f}  R@5 {recall[5]:.3f}  | top-1 precision: "
              f"certain half {correct[certain].float().mean():.3f}, "
              f"uncertain half {correct[~certain].float().mean():.3f}")  # fmt: skip
        # confidence = minus the variance: the most certain queries are answered first
        curves[f"{direction}, {name}"] = risk_coverage_curve(-top_var[:, 0], correct)

# %%
# Top-1 error against the fraction of queries answered (most certain first)

risk_coverage_plot(curves, "retrieval_risk_coverage.png", title="retrieval by top-score variance")
