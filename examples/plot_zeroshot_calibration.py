"""
Zero-shot calibration: reliability and risk-coverage
====================================================

The Python version of ``laplace-vlm demo``, step by step. A small CLIP trained on
scikit-learn's handwritten digits stands in for a pretrained model (trained once, under a
minute, then cached). We fit the Laplace posterior of its two projection heads on
image-caption pairs it never trained on, choose the pseudo-count on validation NLPD, and
classify test digits zero-shot from prompts, clean and under Gaussian pixel noise, against
the deterministic (MAP) model.

Run it as a script with ``python examples/plot_zeroshot_calibration.py``; the figures are
written to the working folder.
"""

# %%
# A CLIP model and the digits
# ---------------------------
# ``recipe`` is the one data-and-model recipe the demo, the benchmark and these examples share.

import torch

from laplace_vlm.evaluation.metrics import classification_metrics
from laplace_vlm.evaluation.plots import reliability_diagram, risk_coverage_plot
from laplace_vlm.evaluation.pseudo_count import select_pseudo_count
from laplace_vlm.evaluation.selective import aurc, failure_auroc, risk_coverage_curve
from laplace_vlm.experiments import recipe

torch.set_num_threads(1)  # the toy model gains nothing from threads

model, tokenizer = recipe.load_clip("digits")
splits = recipe.load_splits("digits", seed=0)
(pairs_x, pairs_y), (val_x, val_y), (test_x, test_y) = (
    splits[name] for name in ("curvature", "val", "test")
)

# %%
# The posterior
# -------------
# KFAC curvature of both heads from matched pairs (the classes of an image are the texts of
# its batch), then the zero-shot classes: class names in prompt templates, ensembled per class.

la = recipe.fit_zero_shot_posterior(model, tokenizer, pairs_x, pairs_y, seed=0)
la.set_classes(recipe.class_text_activations(model, tokenizer, "digits"))

# %%
# The pseudo-count
# ----------------
# The pseudo-count ``n`` (laplace's ``temperature = 1 / n``) scales the posterior. We pick it
# on validation NLPD, with the prior precision of each head re-optimised by the marginal
# likelihood at each ``n`` (:doc:`plot_pseudo_count` shows the whole curve).

val = recipe.encode_images(model, val_x)
choice = select_pseudo_count(la, val, val_y, {"probcosine": {}}, (1, 10, 100, 1_000, 10_000))
for n, val_nlpd in choice["probcosine"].nlpd_by_pseudo_count.items():
    print(f"n = {n:>8g}: validation NLPD {val_nlpd:.4f}")
choice["probcosine"].setting.apply(la)
print(f"chosen: n = {choice['probcosine'].setting.pseudo_count:g}")

# %%
# Predictions with uncertainty, clean and under pixel noise
# ---------------------------------------------------------
# ``la(x)`` is the probit of the ProbCosine moments; ``pred_type="map"`` the deterministic
# model. A reliability diagram per condition (the ECE is in each panel's title).

noisy = recipe.SHIFTS["noise"](test_x, 0.8, torch.Generator().manual_seed(0))
curves = {}
for name, images in [("clean", test_x), ("noise 0.8", noisy)]:
    acts = recipe.encode_images(model, images)
    probs = {"MAP": la(acts, pred_type="map"), "Laplace (ProbCosine)": la(acts)}
    print(f"\n{name}:")
    for label, p in probs.items():
        m = classification_metrics(p, test_y)
        confidence, correct = p.max(-1).values, p.argmax(-1) == test_y
        print(f"  {label:<22} acc {m['acc']:.3f}  NLPD {m['nlpd']:.3f}  ECE {m['ece20']:.3f}  "
              f"AURC {aurc(confidence, correct):.4f}  "
              f"failure AUROC {failure_auroc(confidence, correct):.3f}")  # fmt: skip
        curves[f"{label}, {name}"] = risk_coverage_curve(confidence, correct)
    reliability_diagram(probs, test_y, f"reliability_{name.replace(' ', '_')}.png", title=name)

# %%
# Selective prediction
# --------------------
# Keep only the most confident fraction of the inputs (coverage) and measure the error rate
# among them (risk): a lower curve ranks errors last.

risk_coverage_plot(curves, "risk_coverage.png", title="risk-coverage (MSP)")
