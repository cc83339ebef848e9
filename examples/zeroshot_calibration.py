"""Zero-shot classification with calibrated uncertainty, step by step (offline, ~1 minute).

The Python version of ``laplace-vlm demo``: a small CLIP trained on scikit-learn's handwritten
digits stands in for a pretrained model. We fit the Laplace posterior of its two projection
heads on image-caption pairs, choose the pseudo-count on validation NLPD, then classify test
digits zero-shot from prompts, clean and with Gaussian pixel noise, against the deterministic
(MAP) model.

    python examples/zeroshot_calibration.py
"""

from __future__ import annotations

import torch

from laplace_vlm.evaluation.metrics import classification_metrics
from laplace_vlm.evaluation.plots import reliability_diagram
from laplace_vlm.evaluation.pseudo_count import select_pseudo_count
from laplace_vlm.evaluation.selective import failure_auroc
from laplace_vlm.experiments import recipe

torch.set_num_threads(1)  # the toy model gains nothing from threads

# 1. a CLIP model (trained once, then cached) and the digits
model, tokenizer = recipe.load_clip("digits")
splits = recipe.load_splits("digits", seed=0)
(train_x, train_y), (val_x, val_y), (test_x, test_y) = (
    splits[name] for name in ("train", "val", "test")
)

# 2. the posterior: KFAC curvature of both heads from matched pairs, classes = in-batch texts
la = recipe.fit_zero_shot_posterior(model, tokenizer, train_x, train_y, seed=0)

# 3. the zero-shot classes: class names in prompt templates, ensembled per class
la.set_classes(recipe.class_text_activations(model, tokenizer, "digits"))

# 4. the pseudo-count n (temperature 1/n) scales the posterior: pick it on validation NLPD,
#    with the prior precision of each head re-optimised by the marginal likelihood at each n
val = recipe.encode_images(model, val_x)
choice = select_pseudo_count(la, val, val_y, {"probcosine": {}}, (10, 100, 1_000, 10_000))
for n, val_nlpd in choice["probcosine"].nlpd_by_pseudo_count.items():
    print(f"n = {n:>8g}: validation NLPD {val_nlpd:.4f}")
choice["probcosine"].setting.apply(la)
print(f"chosen: n = {choice['probcosine'].setting.pseudo_count:g}")

# 5. predictions with uncertainty, clean and under pixel noise
for name, images in [
    ("clean", test_x),
    ("noise 0.8", recipe.SHIFTS["noise"](test_x, 0.8, torch.Generator().manual_seed(0))),
]:
    acts = recipe.encode_images(model, images)
    probs = {"MAP": la(acts, pred_type="map"), "Laplace (ProbCosine)": la(acts)}
    print(f"\n{name}:")
    for label, p in probs.items():
        m = classification_metrics(p, test_y)
        correct = p.argmax(-1) == test_y
        print(f"  {label:<22} acc {m['acc']:.3f}  NLPD {m['nlpd']:.3f}  ECE {m['ece20']:.3f}  "
              f"failure AUROC {failure_auroc(p.max(-1).values, correct):.3f}")  # fmt: skip
    path = reliability_diagram(probs, test_y, f"reliability_{name.replace(' ', '_')}.png",
                               title=name)  # fmt: skip
    print(f"  reliability diagram: {path}")
