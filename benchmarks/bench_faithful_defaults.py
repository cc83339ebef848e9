"""What the defaults give, measured: the predictive of ``la(x)`` and the released posterior.

1. Mean L1 distance of class probabilities to exact Monte Carlo through the normalisation
   (``pred_type="nn", link_approx="mc"``) for the default ``la(x)`` (probit ProbCosine),
   laplace's linearised ``glm`` + probit, and MAP: random heads (D = 16) at pseudo-count 1, and
   the digits demo's zero-shot posterior (``--digits``, trains or loads the cached demo model).
2. The released ViT-B/32 factors (``../shared/reference``) at pseudo-count 10 with the released
   prior: per-input ``tr Cov[z]`` of the image head under the reference's symmetric form (the
   ``from_bayesvlm`` default) and the exact-prior form, on random activations.

    python benchmarks/bench_faithful_defaults.py [--digits]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from _common import setup
from torch import nn

from laplace_vlm import DualEncoderLaplace

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "bayesvlm-clip-vit-b-32"


def l1_to_exact_mc(la, x, labels=None, n_samples=20_000) -> dict[str, float]:
    exact = la(x, "nn", link_approx="mc", n_samples=n_samples,
               generator=torch.Generator().manual_seed(0))  # fmt: skip
    out = {}
    for name, kwargs in {"default la(x)": {}, "glm + probit": {"pred_type": "glm"},
                         "map": {"pred_type": "map"}}.items():  # fmt: skip
        probs = la(x, **kwargs)
        out[name] = (probs - exact).abs().sum(-1).mean().item()
        if labels is not None:
            out[f"{name} nlpd"] = -probs[torch.arange(len(labels)), labels].log().mean().item()
    if labels is not None:
        out["exact mc nlpd"] = -exact[torch.arange(len(labels)), labels].log().mean().item()
    return out


def random_heads() -> None:
    g = torch.Generator().manual_seed(0)
    D, d_img, d_txt, n = 16, 32, 24, 512
    img, txt = nn.Linear(d_img, D, bias=False), nn.Linear(d_txt, D, bias=False)
    with torch.no_grad():
        img.weight.copy_(torch.randn(D, d_img, generator=g) / d_img**0.5)
        txt.weight.copy_(torch.randn(D, d_txt, generator=g) / d_txt**0.5)
    la = DualEncoderLaplace(None, image_projection=img, text_projection=txt,
                            logit_scale=torch.tensor(20.0).log(), temperature=1.0)  # fmt: skip
    a_i, a_t = torch.randn(n, d_img, generator=g), torch.randn(n, d_txt, generator=g)
    la.fit([(a_i[i : i + 64], a_t[i : i + 64]) for i in range(0, n, 64)])
    la.optimize_prior_precision(method="marglik", prior_structure="layerwise")
    x = {"image": torch.randn(200, d_img, generator=g), "text": torch.randn(10, d_txt, generator=g)}
    print("random heads, D = 16, pseudo-count 1: mean L1 to exact MC (20,000 draws)")
    for name, value in l1_to_exact_mc(la, x).items():
        print(f"  {name:16s} {value:.3f}")


def digits() -> None:
    from laplace_vlm.experiments import recipe

    model, tokenizer = recipe.load_clip("digits")
    splits = recipe.load_splits("digits")
    la = recipe.fit_zero_shot_posterior(model, tokenizer, *splits["curvature"], seed=0)
    la.temperature = 1.0  # the paper's regime is n ~ 1-10: a wide posterior
    la.optimize_prior_precision(method="marglik", prior_structure="layerwise")
    images, labels = splits["test"]
    x = {"image": recipe.encode_images(model, images),
         "text": recipe.class_text_activations(model, tokenizer, "digits")}  # fmt: skip
    print(f"digits demo posterior, pseudo-count 1, {len(labels)} test images: L1 to exact MC")
    for name, value in l1_to_exact_mc(la, x, labels, n_samples=1000).items():
        print(f"  {name:22s} {value:.3f}")


def released_posterior() -> None:
    if not REFERENCE.is_dir():
        print(f"{REFERENCE} not found: skipping the released-factor comparison")
        return
    g = torch.Generator().manual_seed(0)
    heads = dict(image_projection=torch.randn(512, 768, generator=g) / 768**0.5,
                 text_projection=torch.randn(512, 512, generator=g) / 512**0.5,
                 logit_scale=torch.tensor(100.0).log())  # fmt: skip
    a = torch.randn(256, 768, generator=g)
    x = {"image": a, "text": torch.randn(4, 512, generator=g)}
    traces = {}
    for damping in ("symmetric", False):
        la = DualEncoderLaplace.from_bayesvlm(REFERENCE, **heads, pseudo_count=10, damping=damping)
        traces[damping] = la.embedding_moments(x)["image"][1].sum(-1)
    sym, exact = traces["symmetric"].median().item(), traces[False].median().item()
    print("released ViT-B/32 factors, n = 10, released prior; median per-input tr Cov[z]:")
    print(f"  symmetric (reference, from_bayesvlm default) {sym:.2f}")
    print(f"  exact prior (laplace's KronLaplace form)    {exact:.2f}  ({exact / sym:.2f}x)")


if __name__ == "__main__":
    setup()
    random_heads()
    released_posterior()
    if "--digits" in sys.argv:
        digits()
