"""Fashion-MNIST: the idx reader, the splits on tiny fake files, and the real files where installed."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch

from laplace_vlm.datasets import fashion_mnist as fm
from laplace_vlm.datasets.images import to_pixels
from laplace_vlm.experiments.recipe import load_splits

REAL = fm.DEFAULT_DATA_DIR
needs_real_data = pytest.mark.skipif(
    not fm.available(REAL), reason=f"Fashion-MNIST not installed in {REAL}"
)


def write_idx(path, array: np.ndarray, compress: bool) -> None:
    """The idx layout written out by hand: 0, 0, type 0x08, ndim, big-endian sizes, bytes."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def fake_release(folder, n_train: int = 300, n_test: int = 200, compress: bool = True):
    """Four idx files with the release's names: random images, labels cycling 0..9."""
    rng = np.random.default_rng(0)
    parts = {}
    for part, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, (n, 28, 28))
        labels = np.arange(n) % 10
        image_name, label_name = fm.FILES[part]
        write_idx(folder / image_name, images, compress)
        write_idx(folder / label_name, labels, compress)
        parts[part] = (images, labels)
    return parts


@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_returns_the_written_array(tmp_path, compress):
    array = np.random.default_rng(1).integers(0, 256, (7, 5, 3))
    write_idx(tmp_path / "x-idx3-ubyte", array, compress)
    name = "x-idx3-ubyte.gz" if compress else "x-idx3-ubyte"
    out = fm.read_idx(tmp_path / name)
    assert out.dtype == torch.uint8 and np.array_equal(out.numpy(), array)


def test_read_idx_agrees_with_torchvision(tmp_path):
    from torchvision.datasets.mnist import read_image_file, read_label_file

    rng = np.random.default_rng(2)
    write_idx(tmp_path / "images", rng.integers(0, 256, (11, 28, 28)), compress=False)
    write_idx(tmp_path / "labels", rng.integers(0, 10, (11,)), compress=False)
    assert torch.equal(fm.read_idx(tmp_path / "images"), read_image_file(str(tmp_path / "images")))
    assert torch.equal(
        fm.read_idx(tmp_path / "labels").long(), read_label_file(str(tmp_path / "labels"))
    )


def test_read_idx_refuses_other_files(tmp_path):
    (tmp_path / "not-idx").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(20))
    with pytest.raises(ValueError, match="not an idx file"):
        fm.read_idx(tmp_path / "not-idx")
    write_idx(tmp_path / "short", np.zeros((4, 2, 2)), compress=False)
    data = (tmp_path / "short").read_bytes()
    (tmp_path / "short").write_bytes(data[:-3])  # a truncated download
    with pytest.raises(ValueError, match="holds 13 values"):
        fm.read_idx(tmp_path / "short")


def test_missing_files_name_data_dir_and_the_four_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="data_dir") as err:
        load_splits("fashion-mnist", data_dir=tmp_path)
    for pair in fm.FILES.values():
        for name in pair:
            assert f"{name}.gz" in str(err.value)
    assert not fm.available(tmp_path)


@pytest.mark.parametrize("compress", [True, False])
def test_splits_on_a_fake_release(tmp_path, compress):
    raw = fake_release(tmp_path, compress=compress)
    assert fm.available(tmp_path)
    splits = load_splits("fashion-mnist", seed=0, data_dir=tmp_path, max_train=100, max_eval=50)
    sizes = {name: len(y) for name, (_, y) in splits.items()}
    assert sizes == {"train": 100, "curvature": 100, "val": 50, "test": 50}
    for _, labels in splits.values():  # stratified: 10 classes, equal shares
        assert torch.bincount(labels, minlength=10).tolist() == [len(labels) // 10] * 10
    # every image is its raw grey values, scaled to [0, 1], upsampled, in three channels:
    # find each split image among the raw images of its part by its 28x28 downsampling
    found = {}
    for name, part in (
        ("train", "train"),
        ("curvature", "train"),
        ("val", "test"),
        ("test", "test"),
    ):
        images, labels = splits[name]
        pixels = to_pixels(images)
        assert torch.equal(pixels[:, 0], pixels[:, 2])
        down = torch.nn.functional.interpolate(pixels[:, :1], size=(28, 28), mode="area")[:, 0]
        raw_images = torch.as_tensor(raw[part][0], dtype=torch.float32) / 255
        nearest = torch.cdist(down.flatten(1), raw_images.flatten(1)).argmin(1)
        assert torch.equal(torch.as_tensor(raw[part][1])[nearest], labels)
        found[name] = set(nearest.tolist())
    # val and test: disjoint subsets of the official test part, exchangeable with each other;
    # the curvature pairs: training-part images the model is not trained on
    assert len(found["val"]) == 50 and not found["val"] & found["test"]
    assert len(found["curvature"]) == 100 and not found["curvature"] & found["train"]
    again = load_splits("fashion-mnist", seed=0, data_dir=tmp_path, max_train=100, max_eval=50)
    assert torch.equal(again["val"][0], splits["val"][0])
    other = load_splits("fashion-mnist", seed=1, data_dir=tmp_path, max_train=100, max_eval=50)
    assert not torch.equal(other["train"][0], splits["train"][0])


def test_constant_images_stay_constant():
    pixels = torch.full((2, 28, 28), 51, dtype=torch.uint8)  # 51 / 255 = 0.2
    torch.testing.assert_close(to_pixels(fm.to_images(pixels)), torch.full((2, 3, 32, 32), 0.2))


@needs_real_data
def test_the_installed_release():
    pixels, labels = fm.load_part("train", REAL)
    test_pixels, test_labels = fm.load_part("test", REAL)
    assert pixels.shape == (60000, 28, 28) and test_pixels.shape == (10000, 28, 28)
    assert torch.bincount(labels).tolist() == [6000] * 10
    assert torch.bincount(test_labels).tolist() == [1000] * 10
    # the release's first labels: ankle boot, t-shirt/top, t-shirt/top (train); ankle boot,
    # pullover, trouser (test)
    assert labels[:3].tolist() == [9, 0, 0] and test_labels[:3].tolist() == [9, 2, 1]
