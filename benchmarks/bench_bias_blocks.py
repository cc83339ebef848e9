"""Joint ``[W | b]`` factor (the default) against laplace's separate bias block, measured.

SigLIP-like heads with bias and positive-mean activations (a GELU of Gaussians, as SigLIP's
image head ``fc2`` sees), random weights, SigLIP likelihood, pseudo-count 10, the prior
precision of each form tuned by its own marginal likelihood. Prints the per-input ratio of
``tr Cov[z]`` (separate / joint) of the image head on held-out activations.

    python benchmarks/bench_bias_blocks.py [--small]
"""

from __future__ import annotations

import sys

import torch
from _common import setup
from torch import nn

from laplace_vlm import DualEncoderLaplace


def problem(d_img: int, d_txt: int, D: int, n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    img, txt = nn.Linear(d_img, D), nn.Linear(d_txt, D)
    with torch.no_grad():
        for lin in (img, txt):
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) / lin.in_features**0.5)
            lin.bias.copy_(0.1 * torch.randn(D, generator=g))
    a_i = nn.functional.gelu(torch.randn(n, d_img, generator=g))
    a_t = torch.randn(n, d_txt, generator=g)
    return img, txt, a_i, a_t


def main() -> None:
    setup()
    small = "--small" in sys.argv
    d_img, d_txt, D, n = (256, 128, 64, 2048) if small else (3072, 768, 768, 4096)
    img, txt, a_i, a_t = problem(d_img, d_txt, D, n)
    held_out = nn.functional.gelu(
        torch.randn(512, d_img, generator=torch.Generator().manual_seed(9))
    )
    traces = {}
    for joint in (True, False):
        la = DualEncoderLaplace(None, image_projection=img, text_projection=txt, logit_scale=2.3,
                                logit_bias=-10.0, contrastive="siglip", joint_bias=joint,
                                temperature=0.1, chunk_size=1024)  # fmt: skip
        la.fit([(a_i[i : i + 512], a_t[i : i + 512]) for i in range(0, n, 512)])
        la.optimize_prior_precision(method="marglik", prior_structure="layerwise")
        x = {"image": held_out, "text": a_t[:8]}
        traces[joint] = la.embedding_moments(x)["image"][1].sum(-1)
        print(f"joint_bias={joint}: prior precision {la.prior_precision.flatten().tolist()}")
    ratio = traces[False] / traces[True]
    q = torch.quantile(ratio, torch.tensor([0.0, 0.5, 1.0]))
    print(f"sizes d_img={d_img} d_txt={d_txt} D={D}, {n} pairs")
    print(f"tr Cov[z] separate / joint over 512 held-out inputs: min {q[0]:.3f}, "
          f"median {q[1]:.3f}, max {q[2]:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
