"""scikit-learn's 1,797 8x8 handwritten digits as normalised 3x32x32 images, in seeded splits."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from laplace_vlm.datasets.images import Split, grey_to_images

# 60% for the model and its curvature, 20% validation, 20% test; a quarter of the 60% is held
# out of training for the curvature fit
TRAIN_FRACTION = 0.6
CURVATURE_SHARE = 0.25


def digits_to_images(pixels: np.ndarray) -> torch.Tensor:
    """Turn scikit-learn's digit pixels into normalised RGB images.

    Parameters
    ----------
    pixels : np.ndarray
        `(N, 64)` or `(N, 8, 8)` grey values in ``[0, 16]``.

    Returns
    -------
    images : torch.Tensor
        `(N, 3, 32, 32)` float32, normalised with ``MEAN`` / ``STD``.
    """
    grey = torch.as_tensor(np.asarray(pixels, dtype=np.float32) / 16.0).reshape(-1, 1, 8, 8)
    return grey_to_images(grey)


def load_digits_splits(seed: int = 0) -> dict[str, Split]:
    """Stratified, seeded train/curvature/val/test splits of the 1,797 digits (45/15/20/20).

    ``"curvature"`` holds pairs of the training distribution that the stand-in CLIP never
    trains on: the posterior's curvature is fitted on them, as the paper fits its factors on
    LAION pairs on which CLIP's loss is far from zero, not on pairs a model has memorised.

    Parameters
    ----------
    seed : int
        seed of the split; the same seed always gives the same split.

    Returns
    -------
    splits : dict
        ``{"train": (images, labels), "curvature": ..., "val": ..., "test": ...}`` with images
        `(N, 3, 32, 32)` float32 and labels `(N,)` int64 (808 / 270 / 359 / 360 images).
    """
    digits = load_digits()
    index = np.arange(len(digits.target))
    fit, rest = train_test_split(
        index, train_size=TRAIN_FRACTION, stratify=digits.target, random_state=seed
    )
    train, curvature = train_test_split(
        fit, test_size=CURVATURE_SHARE, stratify=digits.target[fit], random_state=seed
    )
    val, test = train_test_split(
        rest, test_size=0.5, stratify=digits.target[rest], random_state=seed
    )
    images = digits_to_images(digits.data)
    labels = torch.as_tensor(digits.target, dtype=torch.long)
    parts = {"train": train, "curvature": curvature, "val": val, "test": test}
    return {name: (images[idx], labels[idx]) for name, idx in parts.items()}
