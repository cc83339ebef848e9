"""Distribution shifts of normalised images: noise, rotation, inversion, blur, contrast.

Every shift works in pixel space (``[0, 1]``): it undoes the normalisation, transforms, clamps
and normalises again, so it applies to every stand-in data set alike.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Callable

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF

from laplace_vlm.datasets.images import normalize, to_pixels
from laplace_vlm.docstrings import fill_doc

# one severity axis shared by all shifts: 0 is clean data, 1 the strongest shift
SEVERITIES: tuple[float, ...] = (0.2, 0.4, 0.6, 0.8, 1.0)

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


def conditions(
    images: torch.Tensor, seed: int, severities: Sequence[float] = SEVERITIES
) -> Iterator[tuple[str, float, torch.Tensor]]:
    """``(condition, severity, images)``: clean first, then every shift at every severity.

    Parameters
    ----------
    images : torch.Tensor
        `(N, 3, 32, 32)` clean images.
    seed : int
        seed of the shifts' randomness (one generator per shift).
    severities : sequence of float
        in ``(0, 1]``.

    Yields
    ------
    tuple
        ``(condition, severity, images)``: ``"clean"`` or a shift of ``SHIFTS``, its severity
        (0 for clean) and the `(N, 3, 32, 32)` images under it.
    """
    yield "clean", 0.0, images
    for index, (shift, transform) in enumerate(SHIFTS.items()):
        generator = torch.Generator().manual_seed(seed * 1000 + index)
        for severity in severities:
            yield shift, float(severity), transform(images, severity, generator)
