"""
The paper's set-up: CLIP ViT-B/32 on Food-101 (not run here)
=============================================================

The paper's zero-shot set-up: CLIP ViT-B/32 (laion2b_s34b_b79k) on the Food-101 test split.
This page is not executed when the documentation is built: it needs downloaded weights and
data.

As in the reference implementation: the curvature released with BayesVLM (10 class batches of
32,768 LAION-400M pairs), pseudo-count n = 10 with the prior precisions the reference uses at
n = 10, one prompt "An image of a {class}", the probit predictive, ECE with 20 bins. Its
published numbers: Laplace acc 0.80317 / NLPD 0.68084 / ECE 0.00829, MAP 0.80083 / 0.70533 /
0.03872.

Needs the open_clip weights (downloaded on first use) and Food-101 through torchvision
(``--download`` fetches 5 GB); without them it prints what is missing and exits with 2.

    python examples/paper_food101.py --data-root ~/data --hessians ../shared/reference/bayesvlm-clip-vit-b-32
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from laplace_vlm import DualEncoderLaplace
from laplace_vlm.adapters.features import FeatureSet, extract_features
from laplace_vlm.cli.errors import CliError
from laplace_vlm.cli.models import load_open_clip
from laplace_vlm.evaluation.metrics import classification_metrics
from laplace_vlm.tasks.zeroshot import ZeroShotClassifier

MODEL, PRETRAINED = "ViT-B-32", "laion2b_s34b_b79k"
TEMPLATE = "An image of a {}"
PSEUDO_COUNT = 10
PRIOR_PRECISION = (2997.875, 2538.091)  # (image, text) at n = 10, from the reference's notebook
REFERENCE = {"map": (0.80083, 0.70533, 0.03872), "laplace": (0.80317, 0.68084, 0.00829)}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", type=Path, default=Path("data"), help="torchvision root")
    p.add_argument("--download", action="store_true", help="let torchvision download Food-101")
    p.add_argument(
        "--hessians",
        type=Path,
        default=Path(__file__).resolve().parents[1] / "../shared/reference/bayesvlm-clip-vit-b-32",
        help="folder with the released {A,B}_{img,txt}_analytic.pt",
    )
    p.add_argument(
        "--features",
        type=Path,
        default=Path("food101_test_features.safetensors"),
        help="cache of the encoded test images",
    )
    p.add_argument("--pretrained", default=PRETRAINED, help="open_clip tag or a local checkpoint")
    p.add_argument("--device", default=None)
    p.add_argument("--batch-size", type=int, default=128)
    return p.parse_args()


def food101_test(root: Path, download: bool, preprocess):
    from torchvision.datasets import Food101

    try:
        return Food101(root, split="test", transform=preprocess, download=download)
    except RuntimeError as err:  # torchvision: "Dataset not found or corrupted"
        raise CliError(
            f"Food-101 is not under {root} ({err}); pass --download or --data-root"
        ) from None


def main() -> int:
    args = parse_args()
    try:
        if not (args.hessians / "A_img_analytic.pt").is_file():
            raise CliError(f"no BayesVLM curvature in {args.hessians} (pass --hessians)")
        model, preprocess, tokenizer = load_open_clip(MODEL, args.pretrained, args.device)
        dataset = food101_test(args.data_root, args.download, preprocess)
    except CliError as err:
        print(f"paper_food101: {err}", file=sys.stderr)
        return 2
    classnames = [c.replace("_", " ") for c in dataset.classes]

    if args.features.is_file():
        features = FeatureSet.load(args.features)
    else:
        loader = DataLoader(
            dataset, batch_size=args.batch_size, num_workers=min(4, os.cpu_count() or 1)
        )
        features = extract_features(model, loader, progress_bar=True)
        features.save(args.features)

    la = DualEncoderLaplace.from_bayesvlm(
        args.hessians,
        model,
        pseudo_count=PSEUDO_COUNT,
        prior_precision=torch.tensor(PRIOR_PRECISION),
    )
    clf = ZeroShotClassifier.from_prompts(la, la.adapter, tokenizer, classnames, [TEMPLATE])
    image = features.image
    rows = {
        "map": clf.predict(image.activations, image.residual, pred_type="map"),
        "laplace (probcosine_diag, as the reference)": clf.predict(
            image.activations, image.residual, pred_type="probcosine_diag"
        ),
        "laplace (probcosine, full covariance)": clf.predict(image.activations, image.residual),
        "laplace (glm)": clf.predict(image.activations, image.residual, pred_type="glm"),
    }
    print(f"{'method':<45}{'acc':>9}{'nlpd':>9}{'ece':>9}")
    for name, pred in rows.items():
        m = classification_metrics(pred.probs, features.labels)
        print(f"{name:<45}{m['acc']:>9.5f}{m['nlpd']:>9.5f}{m['ece20']:>9.5f}")
    for name, (acc, nlpd, ece) in REFERENCE.items():
        print(f"{'reference ' + name:<45}{acc:>9.5f}{nlpd:>9.5f}{ece:>9.5f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
