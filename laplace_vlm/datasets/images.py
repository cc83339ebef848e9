"""The image convention of the stand-in data sets: grey images as normalised 3x32x32 tensors.

Images are model inputs normalised with ``MEAN`` / ``STD``; the shifts
(:mod:`laplace_vlm.datasets.shifts`) work in pixel space (``[0, 1]``) through
:func:`to_pixels` and :func:`normalize`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.model_selection import train_test_split

IMAGE_SIZE = 32
MEAN = 0.5
STD = 0.5

Split = tuple[torch.Tensor, torch.Tensor]


def grey_to_images(grey: torch.Tensor) -> torch.Tensor:
    """`(N, 1, h, w)` grey values in ``[0, 1]`` -> `(N, 3, 32, 32)` normalised model inputs.

    Parameters
    ----------
    grey : torch.Tensor
        `(N, 1, h, w)` float grey values in ``[0, 1]``.

    Returns
    -------
    torch.Tensor
        `(N, 3, 32, 32)` float32, bilinearly resized, replicated to three channels and
        normalised with ``MEAN`` / ``STD``.
    """
    grey = F.interpolate(grey, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    return normalize(grey.clamp(0.0, 1.0).expand(-1, 3, -1, -1).contiguous())


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    """`(N, 3, H, W)` pixels in ``[0, 1]`` -> model inputs.

    Parameters
    ----------
    pixels : torch.Tensor
        `(N, 3, H, W)` pixels in ``[0, 1]``.

    Returns
    -------
    torch.Tensor
        `(N, 3, H, W)` ``(pixels - MEAN) / STD``.
    """
    return (pixels - MEAN) / STD


def to_pixels(images: torch.Tensor) -> torch.Tensor:
    """Model inputs -> `(N, 3, H, W)` pixels in ``[0, 1]`` (inverse of :func:`normalize`).

    Parameters
    ----------
    images : torch.Tensor
        `(N, 3, H, W)` normalised model inputs.

    Returns
    -------
    torch.Tensor
        `(N, 3, H, W)` ``images * STD + MEAN``.
    """
    return images * STD + MEAN


def stratified_subset(labels: torch.Tensor, size: int | None, seed: int) -> torch.Tensor:
    """Sorted indices of a seeded subset of ``size`` examples with the labels' class shares.

    Parameters
    ----------
    labels : torch.Tensor
        `(N,)` class labels.
    size : int or None
        how many to keep; None or ``size >= N`` keeps all.
    seed : int
        seed of the draw.

    Returns
    -------
    torch.Tensor
        `(min(size, N),)` int64 indices into ``labels``, increasing.
    """
    if size is None or size >= len(labels):
        return torch.arange(len(labels))
    if size < len(labels.unique()):
        raise ValueError(f"size must hold every class at least once, got {size}.")
    index, _ = train_test_split(
        np.arange(len(labels)), train_size=size, stratify=labels.numpy(), random_state=seed
    )
    return torch.as_tensor(np.sort(index))
