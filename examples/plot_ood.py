"""
Out-of-distribution scores
==========================

How well do the posterior's uncertainty scores tell the digits the model knows from images
it has never seen? In-distribution: the digits test set. Out-of-distribution: uniform grey
noise (and Fashion-MNIST where Debian's ``dataset-fashion-mnist`` is installed). Scores,
higher = more likely OOD: one minus the maximum softmax probability (MSP) of the MAP model,
the predictive entropy and the mutual information (BALD) of the Laplace predictive, and the
expected logit variance (the mean over classes of ``Var[logit]``), which only a posterior has.
"""

import torch

from laplace_vlm.evaluation.detection import detection_auroc, expected_logit_variance, msp
from laplace_vlm.evaluation.plots import score_histograms
from laplace_vlm.experiments import recipe
from laplace_vlm.tasks.zeroshot import ZeroShotClassifier

torch.set_num_threads(1)

model, tokenizer = recipe.load_clip("digits")
splits = recipe.load_splits("digits", seed=0)
la = recipe.fit_zero_shot_posterior(model, tokenizer, *splits["curvature"], seed=0)
la.temperature = 1 / 10  # the paper's pseudo-count
la.optimize_prior_precision(method="marglik", prior_structure="layerwise")
classifier = ZeroShotClassifier(la, recipe.class_text_activations(model, tokenizer, "digits"))

test_x = splits["test"][0]
ood, skipped = recipe.ood_images("digits", len(test_x), seed=0)
print("\n".join(skipped))

# %%
# The scores of each set and their AUROC (in-distribution vs OOD)


def scores(images):
    """OOD score name -> `(N,)` scores, higher = more likely OOD."""
    acts = recipe.encode_images(model, images)
    map_probs = classifier.predict(acts, pred_type="map").probs
    laplace = classifier.predict(acts)
    return {
        "1 - MSP (MAP)": 1 - msp(map_probs),
        "entropy (Laplace)": laplace.entropy,
        "mutual information (Laplace)": laplace.mutual_information,
        "expected logit variance (Laplace)": expected_logit_variance(laplace.logit_var),
    }


in_dist = scores(test_x)
for name, images in ood.items():
    out = scores(images)
    print(f"\ndigits vs {name}:")
    for score in in_dist:
        print(f"  {score:<36} AUROC {detection_auroc(out[score], in_dist[score]):.3f}")
    score_histograms({s: (in_dist[s], out[s]) for s in in_dist},
                     f"ood_{name}.png", labels=("digits", name), title=f"digits vs {name}")  # fmt: skip
