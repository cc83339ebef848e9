"""Fashion-MNIST (Xiao et al. 2017) from its four idx files, as normalised 3x32x32 tensors.

The files are those of the original release (``train-images-idx3-ubyte.gz``, ...), gzipped or
not; Debian's ``dataset-fashion-mnist`` package installs them under
``/usr/share/datasets/fashion-mnist/``. The idx reader is a few lines here rather than
torchvision's ``read_image_file``: that one opens only uncompressed files and checks the format
with ``assert`` (gone under ``python -O``).
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

from laplace_vlm.datasets.images import Split, grey_to_images, stratified_subset

DEFAULT_DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_UBYTE = 0x08  # the idx type code of unsigned bytes, the only one Fashion-MNIST uses


def read_idx(path: str | os.PathLike) -> torch.Tensor:
    """Read an idx file of unsigned bytes (gzipped if the name ends in ``.gz``).

    Parameters
    ----------
    path : path
        the file; layout: two zero bytes, the type code ``0x08``, the number of dimensions
        ``k``, ``k`` big-endian int32 sizes, then the bytes in C order.

    Returns
    -------
    torch.Tensor
        uint8 of the stored shape, e.g. `(60000, 28, 28)` images or `(60000,)` labels.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != _IDX_UBYTE:
        raise ValueError(f"path: {path} is not an idx file of unsigned bytes.")
    ndim = data[3]
    shape = tuple(np.frombuffer(data, dtype=">i4", count=ndim, offset=4).tolist())
    offset = 4 + 4 * ndim
    if len(data) - offset != int(np.prod(shape)):
        raise ValueError(f"path: {path} holds {len(data) - offset} values for the shape {shape}.")
    values = np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(shape)
    return torch.from_numpy(values.copy())  # a writable copy: the buffer is read-only


def find_file(data_dir: Path, name: str) -> Path:
    """``data_dir / name`` with or without ``.gz``; a clear error when neither exists.

    Parameters
    ----------
    data_dir : Path
        the folder.
    name : str
        the file name without ``.gz``, e.g. ``"train-images-idx3-ubyte"``.

    Returns
    -------
    Path
        the gzipped file if there is one, else the uncompressed one.

    Raises
    ------
    FileNotFoundError
        naming the four files and where Debian installs them.
    """
    for candidate in (data_dir / f"{name}.gz", data_dir / name):
        if candidate.is_file():
            return candidate
    expected = ", ".join(f"{n}.gz" for pair in FILES.values() for n in pair)
    raise FileNotFoundError(
        f"data_dir: {name}(.gz) not found in {data_dir}. Fashion-MNIST needs the four files "
        f"{expected} (Debian: apt-get install dataset-fashion-mnist, into {DEFAULT_DATA_DIR})."
    )


def available(data_dir: str | os.PathLike | None = None) -> bool:
    """Whether all four files are in ``data_dir`` (default: ``DEFAULT_DATA_DIR``).

    Parameters
    ----------
    data_dir : path, optional
        the folder; ``DEFAULT_DATA_DIR`` if None.

    Returns
    -------
    bool
        True if every file is there, gzipped or not.
    """
    try:
        for pair in FILES.values():
            for name in pair:
                find_file(Path(data_dir or DEFAULT_DATA_DIR), name)
    except FileNotFoundError:
        return False
    return True


def to_images(pixels: torch.Tensor) -> torch.Tensor:
    """`(N, 28, 28)` uint8 grey values -> `(N, 3, 32, 32)` float32 normalised model inputs.

    Bilinear resizing; the grey channel is repeated three times.

    Parameters
    ----------
    pixels : torch.Tensor
        `(N, 28, 28)` uint8 grey values.

    Returns
    -------
    torch.Tensor
        `(N, 3, 32, 32)` model inputs (see :func:`laplace_vlm.datasets.images.grey_to_images`).
    """
    return grey_to_images(pixels.float().div(255.0)[:, None])


def load_part(part: str, data_dir: str | os.PathLike | None = None) -> tuple[torch.Tensor, ...]:
    """The raw ``"train"`` (60,000) or ``"test"`` (10,000) images and labels.

    Parameters
    ----------
    part : {'train', 'test'}
        the official part of the release.
    data_dir : path, optional
        folder of the four files; ``DEFAULT_DATA_DIR`` if None.

    Returns
    -------
    pixels : torch.Tensor
        `(N, 28, 28)` uint8.
    labels : torch.Tensor
        `(N,)` int64 in ``0..9``.
    """
    if part not in FILES:
        raise ValueError(f"part must be one of {tuple(FILES)}, got {part!r}.")
    folder = Path(data_dir or DEFAULT_DATA_DIR)
    image_file, label_file = (find_file(folder, name) for name in FILES[part])
    pixels, labels = read_idx(image_file), read_idx(label_file).long()
    if pixels.ndim != 3 or labels.shape != pixels.shape[:1]:
        raise ValueError(
            f"data_dir: {image_file.name} {tuple(pixels.shape)} and {label_file.name} "
            f"{tuple(labels.shape)} do not pair up as (N, H, W) images with (N,) labels."
        )
    return pixels, labels


def load_fashion_mnist_splits(
    seed: int = 0,
    data_dir: str | os.PathLike | None = None,
    sizes: dict[str, int | None] | None = None,
) -> dict[str, Split]:
    """Seeded, stratified train/curvature/val/test splits of Fashion-MNIST.

    ``"train"`` is a subset of the official 60,000 training images and ``"curvature"`` a
    disjoint subset of the same part, never trained on (the posterior's curvature pairs, as
    the paper fits its factors on pairs of the training distribution on which the loss is far
    from zero); ``"val"`` and ``"test"``
    are disjoint subsets of the official 10,000 test images, so that validation (temperature,
    pseudo-count, conformal calibration) is exchangeable with the test data. Validation
    images held out of the official training part were not: on them the demo CLIP had
    accuracy 0.849 against 0.833 on the test part, and LAC sets at alpha = 0.1 calibrated on
    them covered 0.878 of the test images.

    Parameters
    ----------
    seed : int
        seed of the subsets.
    data_dir : path, optional
        folder of the four idx files; ``DEFAULT_DATA_DIR`` if None.
    sizes : dict, optional
        ``{"train": n, "curvature": n, "val": n, "test": n}``; a missing key or None means
        all the training images (train; then no curvature images are left, and
        ``"curvature"`` must be 0), all the others (curvature), half of the official test
        images (val) and the rest of them (test).

    Returns
    -------
    splits : dict
        ``{"train": (images, labels), "curvature": ..., "val": ..., "test": ...}`` with
        images `(N, 3, 32, 32)` float32 and labels `(N,)` int64.
    """
    sizes = sizes or {}
    pixels, labels = load_part("train", data_dir)
    train = stratified_subset(labels, sizes.get("train"), seed)
    unused = _complement(len(labels), train)
    curvature = unused[stratified_subset(labels[unused], sizes.get("curvature"), seed + 3)]
    test_pixels, test_labels = load_part("test", data_dir)
    val = stratified_subset(test_labels, sizes.get("val") or len(test_labels) // 2, seed + 1)
    rest = _complement(len(test_labels), val)
    test = rest[stratified_subset(test_labels[rest], sizes.get("test"), seed + 2)]
    return {
        "train": (to_images(pixels[train]), labels[train]),
        "curvature": (to_images(pixels[curvature]), labels[curvature]),
        "val": (to_images(test_pixels[val]), test_labels[val]),
        "test": (to_images(test_pixels[test]), test_labels[test]),
    }


def _complement(n: int, index: torch.Tensor) -> torch.Tensor:
    """The increasing indices of ``range(n)`` not in ``index``."""
    keep = torch.ones(n, dtype=torch.bool)
    keep[index] = False
    return keep.nonzero().squeeze(1)
