"""The demo's images: scikit-learn's 8x8 handwritten digits as 3x32x32 tensors, and the shifts.

Images are returned normalised with ``MEAN`` / ``STD``; every shift works in pixel space
(``[0, 1]``), so it first undoes the normalisation, transforms, clamps and normalises again.
Fashion-MNIST (:mod:`laplace_vlm.demo.fashion_mnist`) uses the same normalisation, so the same
shifts apply to it.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from laplace_vlm.docstrings import fill_doc

IMAGE_SIZE = 32
MEAN = 0.5
STD = 0.5
SPLIT_FRACTIONS = {"train": 0.6, "val": 0.2, "test": 0.2}
# one severity axis shared by all shifts: 0 is clean data, 1 the strongest shift
SEVERITIES: tuple[float, ...] = (0.2, 0.4, 0.6, 0.8, 1.0)

Split = tuple[torch.Tensor, torch.Tensor]
Shift = Callable[[torch.Tensor, float, torch.Generator], torch.Tensor]

# what every shift takes and returns (the signature of ``Shift``)
_fill_doc = fill_doc.extend(
    shift_images="""
        images : torch.Tensor
            `(N, 3, H, W)` normalised model inputs.
        """,
    shifted="""
        torch.Tensor
            `(N, 3, H, W)` shifted, normalised model inputs.
        """,
    shift_parameters="""
        Parameters
        ----------
        %(shift_images)s
        severity : float
            in ``[0, 1]``; 0 leaves the images unchanged.
        """,
)


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


@_fill_doc
def to_pixels(images: torch.Tensor) -> torch.Tensor:
    """Model inputs -> `(N, 3, H, W)` pixels in ``[0, 1]`` (inverse of :func:`normalize`).

    Parameters
    ----------
    %(shift_images)s

    Returns
    -------
    torch.Tensor
        `(N, 3, H, W)` ``images * STD + MEAN``.
    """
    return images * STD + MEAN


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


def _check_severity(severity: float) -> float:
    if not 0.0 <= severity <= 1.0:
        raise ValueError(f"severity must lie in [0, 1], got {severity}.")
    return float(severity)


@_fill_doc
def gaussian_noise(
    images: torch.Tensor, severity: float, generator: torch.Generator
) -> torch.Tensor:
    """Additive Gaussian pixel noise with standard deviation ``0.5 * severity``.

    The noisy pixels are clamped to ``[0, 1]``.

    %(shift_parameters)s
    generator : torch.Generator
        randomness of the noise.

    Returns
    -------
    %(shifted)s
    """
    std = 0.5 * _check_severity(severity)
    pixels = to_pixels(images)
    noise = torch.randn(pixels.shape, generator=generator, dtype=pixels.dtype)
    return normalize((pixels + std * noise).clamp(0.0, 1.0))


@_fill_doc
def rotation(images: torch.Tensor, severity: float, generator: torch.Generator) -> torch.Tensor:
    """Rotate each image by ``90 * severity`` degrees, clockwise or anticlockwise at random.

    %(shift_parameters)s
    generator : torch.Generator
        randomness of the directions.

    Returns
    -------
    %(shifted)s
    """
    angle = math.radians(90.0 * _check_severity(severity))
    pixels = to_pixels(images)
    sign = torch.randint(0, 2, (len(pixels),), generator=generator).to(pixels.dtype) * 2 - 1
    cos, sin = torch.full_like(sign, math.cos(angle)), sign * math.sin(angle)
    theta = torch.stack(
        [torch.stack([cos, -sin, 0 * cos], 1), torch.stack([sin, cos, 0 * cos], 1)], 1
    )
    grid = F.affine_grid(theta, list(pixels.shape), align_corners=False)
    # zeros padding: the background of the digits is black, so the corners stay background
    return normalize(F.grid_sample(pixels, grid, align_corners=False, padding_mode="zeros"))


@_fill_doc
def invert(images: torch.Tensor, severity: float, generator: torch.Generator) -> torch.Tensor:
    """Colour-invert a random fraction ``severity`` of the images (white background, dark strokes).

    %(shift_parameters)s
    generator : torch.Generator
        randomness of which images are inverted.

    Returns
    -------
    %(shifted)s
    """
    fraction = _check_severity(severity)
    pixels = to_pixels(images)
    chosen = torch.rand(len(pixels), generator=generator) < fraction
    pixels[chosen] = 1.0 - pixels[chosen]
    return normalize(pixels)


@_fill_doc
def blur(images: torch.Tensor, severity: float, generator: torch.Generator) -> torch.Tensor:
    """Gaussian blur with standard deviation ``3 * severity`` pixels (of the 32x32 image).

    %(shift_parameters)s
    generator : torch.Generator
        unused: the blur is deterministic (kept for the signature of ``Shift``).

    Returns
    -------
    %(shifted)s
    """
    sigma = 3.0 * _check_severity(severity)
    if sigma == 0.0:
        return images.clone()
    kernel = 2 * math.ceil(3 * sigma) + 1  # +-3 sigma holds 99.7% of the kernel's mass
    return normalize(TF.gaussian_blur(to_pixels(images), [kernel, kernel], [sigma, sigma]))


@_fill_doc
def contrast(images: torch.Tensor, severity: float, generator: torch.Generator) -> torch.Tensor:
    """Lower the contrast to a factor ``1 - 0.9 * severity`` around each image's mean grey.

    At severity 1 a tenth of the contrast is left (torchvision's ``adjust_contrast``), so the
    strongest shift still carries the object.

    %(shift_parameters)s
    generator : torch.Generator
        unused: lowering the contrast is deterministic.

    Returns
    -------
    %(shifted)s
    """
    factor = 1.0 - 0.9 * _check_severity(severity)
    return normalize(TF.adjust_contrast(to_pixels(images), factor))


SHIFTS: dict[str, Shift] = {
    "noise": gaussian_noise,
    "rotation": rotation,
    "invert": invert,
    "blur": blur,
    "contrast": contrast,
}
