"""scikit-learn's 1,797 8x8 handwritten digits as normalised 3x32x32 images, in seeded splits."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from laplace_vlm.datasets.images import Split, grey_to_images

SPLIT_FRACTIONS = {"train": 0.6, "val": 0.2, "test": 0.2}


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
    """Stratified, seeded train/val/test splits of the 1,797 digits (60/20/20).

    Parameters
    ----------
    seed : int
        seed of the split; the same seed always gives the same split.

    Returns
    -------
    splits : dict
        ``{"train": (images, labels), "val": ..., "test": ...}`` with images `(N, 3, 32, 32)`
        float32 and labels `(N,)` int64.
    """
    digits = load_digits()
    index = np.arange(len(digits.target))
    train, rest = train_test_split(
        index, train_size=SPLIT_FRACTIONS["train"], stratify=digits.target, random_state=seed
    )
    val, test = train_test_split(
        rest, test_size=0.5, stratify=digits.target[rest], random_state=seed
    )
    images = digits_to_images(digits.data)
    labels = torch.as_tensor(digits.target, dtype=torch.long)
    return {
        name: (images[idx], labels[idx])
        for name, idx in (("train", train), ("val", val), ("test", test))
    }
