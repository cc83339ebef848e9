"""
The pseudo-count decides the posterior's width
==============================================

The paper's pseudo-data count ``n`` (laplace's ``temperature = 1 / n``) multiplies the data
term of the posterior precision: small ``n``, wide posterior, predictions pulled towards
uniform; large ``n``, a posterior close to the MAP model. Here ECE and NLPD on the digits
test set, clean and under strong rotation, at every ``n`` of a grid, with the prior precision
re-tuned by the marginal likelihood at each ``n``. The vertical line marks the ``n`` chosen
on clean validation NLPD. Clean data favour large ``n``, shifted data smaller ones: a choice
on clean validation data favours clean data.
"""

import torch

from laplace_vlm.evaluation.metrics import classification_metrics
from laplace_vlm.evaluation.plots import pseudo_count_plot
from laplace_vlm.evaluation.pseudo_count import select_pseudo_count, tune_prior_at
from laplace_vlm.experiments import recipe

torch.set_num_threads(1)

model, tokenizer = recipe.load_clip("digits")
splits = recipe.load_splits("digits", seed=0)
la = recipe.fit_zero_shot_posterior(model, tokenizer, *splits["curvature"], seed=0)
la.set_classes(recipe.class_text_activations(model, tokenizer, "digits"))
test_x, test_y = splits["test"]
conditions = {
    "clean": recipe.encode_images(model, test_x),
    "rotation 1.0": recipe.encode_images(
        model, recipe.SHIFTS["rotation"](test_x, 1.0, torch.Generator().manual_seed(0))
    ),
}

# %%
# The sweep: one posterior, re-tuned at each ``n``; MAP for reference.

grid = (0.1, 1, 10, 100, 1_000, 10_000, 100_000)
sweep = {"laplace (probcosine)": {c: {} for c in conditions}}
for n in grid:
    tune_prior_at(la, n)  # the marginal likelihood's optimisation, outside no_grad
    with torch.no_grad():
        for condition, acts in conditions.items():
            sweep["laplace (probcosine)"][condition][n] = classification_metrics(la(acts), test_y)
for condition, acts in conditions.items():
    m = classification_metrics(la(acts, pred_type="map"), test_y)
    print(f"MAP, {condition}: ECE15 {m['ece15']:.3f}, NLPD {m['nlpd']:.3f}")

val = recipe.encode_images(model, splits["val"][0])
choice = select_pseudo_count(la, val, splits["val"][1], {"laplace (probcosine)": {}}, grid)
chosen = {name: c.setting.pseudo_count for name, c in choice.items()}
print(f"chosen on clean validation NLPD: n = {chosen['laplace (probcosine)']:g}")

# %%
# ECE and NLPD against ``n``

pseudo_count_plot(sweep, ("ece15", "nlpd"), "pseudo_count.png", chosen=chosen)
