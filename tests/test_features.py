"""Feature extraction over loaders, and the safetensors feature cache."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from laplace_vlm.adapters import Features, get_adapter
from laplace_vlm.adapters.features import FeatureSet, extract_features


def _feature_set(residual: bool = True, text: bool = True) -> FeatureSet:
    g = torch.Generator().manual_seed(0)
    image = Features(
        torch.randn(5, 6, generator=g),
        torch.randn(5, 3, generator=g),
        torch.randn(5, 3, generator=g) if residual else None,
    )
    txt = Features(
        torch.randn(4, 2, generator=g, dtype=torch.float64), torch.randn(4, 3, generator=g)
    )
    txt = txt if text else None
    return FeatureSet(image, txt, torch.tensor([0, 2, 1, 1, 0]), {"family": "toy"})


def _assert_equal(a: FeatureSet, b: FeatureSet) -> None:
    for tower in ("image", "text"):
        fa, fb = getattr(a, tower), getattr(b, tower)
        assert (fa is None) == (fb is None)
        for name in ("activations", "embeddings", "residual") if fa is not None else ():
            xa, xb = getattr(fa, name), getattr(fb, name)
            assert (xa is None) == (xb is None), name
            if xa is not None:
                assert xa.dtype == xb.dtype and torch.equal(xa, xb), name
    assert (a.labels is None) == (b.labels is None)
    if a.labels is not None:
        assert torch.equal(a.labels, b.labels)
    assert a.metadata == b.metadata


@pytest.mark.parametrize("residual, text", [(True, True), (False, False)])
def test_round_trip(tmp_path: Path, residual: bool, text: bool) -> None:
    features = _feature_set(residual, text)
    path = tmp_path / "features.safetensors"
    features.save(path)
    _assert_equal(FeatureSet.load(path), features)
    assert [p.name for p in tmp_path.iterdir()] == ["features.safetensors"]  # no temp left


def test_save_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "features.safetensors"
    _feature_set().save(path)
    replacement = _feature_set(residual=False, text=False)
    with pytest.raises(FileExistsError, match=str(path)):
        replacement.save(path)
    _assert_equal(FeatureSet.load(path), _feature_set())
    replacement.save(path, overwrite=True)
    _assert_equal(FeatureSet.load(path), replacement)


def test_foreign_safetensors_file_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "other.safetensors"
    save_file({"image.activations": torch.zeros(2, 3)}, str(path))
    with pytest.raises(ValueError, match="not a laplace_vlm feature file"):
        FeatureSet.load(path)
    save_file({"x": torch.zeros(2)}, str(path), metadata={"format": "someone.else"})
    with pytest.raises(ValueError, match="format='someone.else'"):
        FeatureSet.load(path)


def test_other_version_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "features.safetensors"
    save_file(
        {"labels": torch.zeros(2)}, str(path), {"format": "laplace_vlm.features", "version": "99"}
    )
    with pytest.raises(ValueError, match="version '99' is not supported"):
        FeatureSet.load(path)


def test_unexpected_tensors_are_rejected(tmp_path: Path) -> None:
    path = tmp_path / "features.safetensors"
    meta = {"format": "laplace_vlm.features", "version": "1"}
    save_file({"image.embeddings": torch.zeros(2, 3)}, str(path), meta)
    with pytest.raises(ValueError, match="lack activations"):
        FeatureSet.load(path)
    save_file({"weights": torch.zeros(2, 3)}, str(path), meta)
    with pytest.raises(ValueError, match="unexpected tensors"):
        FeatureSet.load(path)


@pytest.mark.parametrize("cut", [8, 40, -5])
def test_truncated_file_is_rejected(tmp_path: Path, cut: int) -> None:
    path = tmp_path / "features.safetensors"
    _feature_set().save(path)
    data = path.read_bytes()
    path.write_bytes(data[:cut])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        FeatureSet.load(path)


def test_garbage_and_pickles_are_rejected(tmp_path: Path) -> None:
    path = tmp_path / "features.pt"
    torch.save({"image": torch.zeros(2)}, path)  # a pickle: must never be unpickled
    with pytest.raises(ValueError):
        FeatureSet.load(path)
    header = json.dumps({"__metadata__": {"format": "laplace_vlm.features"}}).encode()
    path.write_bytes(struct.pack("<Q", len(header) + 100) + header)  # header claims more bytes
    with pytest.raises(ValueError):
        FeatureSet.load(path)


def test_missing_file() -> None:
    with pytest.raises(FileNotFoundError):
        FeatureSet.load("/nonexistent/features.safetensors")


@pytest.fixture
def data(tokenizer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    images = torch.randn(7, 3, 32, 32, generator=g)
    tokens = tokenizer([f"a photo of number {i}" for i in range(7)])
    return images, tokens, torch.tensor([0, 1, 2, 0, 1, 2, 0])


def _direct(
    model: nn.Module, images: torch.Tensor, tokens: torch.Tensor
) -> tuple[Features, Features]:
    adapter = get_adapter(model)
    return adapter.encode_image(images), adapter.encode_text(tokens)


def _assert_close_features(a: Features, b: Features) -> None:
    torch.testing.assert_close(a.activations, b.activations)
    torch.testing.assert_close(a.embeddings, b.embeddings)
    assert (a.residual is None) == (b.residual is None)


def test_extract_image_label_batches(clip_model: nn.Module, data, capsys) -> None:
    images, tokens, labels = data
    loader = DataLoader(TensorDataset(images, labels), batch_size=3)
    features = extract_features(clip_model, loader, progress_bar=True)
    assert "Extracting features" in capsys.readouterr().err
    assert features.text is None
    assert torch.equal(features.labels, labels) and features.labels.dtype == torch.long
    _assert_close_features(features.image, _direct(clip_model, images, tokens)[0])
    assert features.metadata == {
        "family": "open_clip.CLIP/VisionTransformer",
        "image_head": "visual.proj",
        "text_head": "text_projection",
    }
    assert features.image.activations.device.type == "cpu"


def test_extract_image_token_pairs_with_an_adapter(clip_model: nn.Module, data) -> None:
    images, tokens, _ = data
    adapter = get_adapter(clip_model)
    loader = DataLoader(TensorDataset(images, tokens), batch_size=4)
    features = extract_features(adapter, loader, device="cpu")
    assert features.labels is None
    image, text = _direct(clip_model, images, tokens)
    _assert_close_features(features.image, image)
    _assert_close_features(features.text, text)


def test_extract_dict_batches(clip_model: nn.Module, data) -> None:
    images, tokens, labels = data
    loader = [
        {"text": tokens[:4], "label": labels[:4].tolist()},
        {"text": tokens[4:], "label": labels[4:]},
    ]
    features = extract_features(clip_model, loader)
    assert features.image is None and torch.equal(features.labels, labels)
    _assert_close_features(features.text, _direct(clip_model, images, tokens)[1])


def test_extract_then_save_and_load(clip_model: nn.Module, data, tmp_path: Path) -> None:
    images, _, labels = data
    features = extract_features(clip_model, [(images, labels)])
    features.save(tmp_path / "f.safetensors")
    _assert_equal(FeatureSet.load(tmp_path / "f.safetensors"), features)


@pytest.mark.parametrize(
    "batch, message",
    [
        ((torch.zeros(2, 3, 32, 32),), "must be \\(images, labels\\)"),
        ({"images": torch.zeros(2, 3, 32, 32)}, "dict batch takes the keys"),
        ((torch.zeros(2, 3, 32, 32), torch.zeros(2)), "1-D integer"),
        ((torch.zeros(2, 3, 32, 32), torch.zeros(2, 3, 1, dtype=torch.long)), "1-D integer"),
    ],
)
def test_malformed_batches_are_rejected(clip_model: nn.Module, batch, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        extract_features(clip_model, [batch])


def test_inconsistent_and_empty_loaders_are_rejected(clip_model: nn.Module, data) -> None:
    images, tokens, labels = data
    with pytest.raises(ValueError, match="no batches"):
        extract_features(clip_model, [])
    loader = [(images[:2], labels[:2]), {"image": images[2:4]}]
    with pytest.raises(ValueError, match="'label' is in 1 of 2 batches"):
        extract_features(clip_model, loader)


def test_extract_rejects_unsupported_models() -> None:
    with pytest.raises(ValueError, match="Supported families"):
        extract_features(nn.Linear(2, 2), [])
