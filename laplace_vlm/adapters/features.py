"""Encode a data set once, keep the pre-projection features, and cache them as safetensors.

Feature mode is the fast path of the Laplace approximation: the towers run once, and fitting
and predicting only touch the two heads. ``extract_features`` runs the adapter over a loader;
``FeatureSet.save`` / ``load`` store the result without pickle.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from laplace_vlm.adapters import DualEncoderAdapter, Features, get_adapter
from laplace_vlm.docstrings import fill_doc
from laplace_vlm.io.safetensors_file import read_safetensors, write_safetensors

FORMAT = "laplace_vlm.features"  # the tag of files written before the package moved: kept
VERSION = "1"
_TOWERS = ("image", "text")
_BATCH_KEYS = ("image", "text", "label")


@dataclass
class FeatureSet:
    """Features of a data set: per tower, and the class labels when the loader had them.

    Attributes
    ----------
    image, text : Features, optional
        `(N, d)` activations, `(N, D)` embeddings and residuals of each tower.
    labels : torch.Tensor, optional
        `(N,)` long class labels.
    metadata : dict of str to str
        provenance stored with the file (``extract_features`` records the family and heads).
    """

    image: Features | None
    text: Features | None
    labels: torch.Tensor | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> None:
        """Write a safetensors file (to a temporary file first, then an atomic rename).

        Parameters
        ----------
        path : str or os.PathLike
            the file; its folder is created if needed.
        overwrite : bool, default=False
            replace an existing file.

        Raises
        ------
        FileExistsError
            if ``path`` exists and ``overwrite`` is False.
        """
        metadata = {**self.metadata, "format": FORMAT, "version": VERSION}
        write_safetensors(path, self._tensors(), metadata, overwrite=overwrite)

    @classmethod
    @fill_doc
    def load(cls, path: str | os.PathLike) -> FeatureSet:
        """Read a file written by :meth:`save` (no unpickling).

        Parameters
        ----------
        %(path)s

        Returns
        -------
        FeatureSet
            the tensors on the CPU, and the saved metadata without its format and version.

        Raises
        ------
        FileNotFoundError
            if ``path`` does not exist.
        ValueError
            if the file is not a laplace_vlm feature file, has another version, is truncated or
            is inconsistent.
        """
        path = Path(path)
        tensors, metadata = read_safetensors(path, FORMAT, "laplace_vlm feature file")
        if metadata.get("version") != VERSION:
            raise ValueError(
                f"{path}: feature file version {metadata.get('version')!r} is not supported "
                f"(this laplace_vlm reads version {VERSION!r})."
            )
        return cls._from_tensors(path, tensors, metadata)

    def _tensors(self) -> dict[str, torch.Tensor]:
        tensors = {}
        for tower in _TOWERS:
            features = getattr(self, tower)
            for f in fields(Features) if features is not None else ():
                value = getattr(features, f.name)
                if value is not None:
                    tensors[f"{tower}.{f.name}"] = value.detach().cpu().contiguous()
        if self.labels is not None:
            tensors["labels"] = self.labels.detach().cpu().contiguous()
        return tensors

    @classmethod
    def _from_tensors(
        cls, path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]
    ) -> FeatureSet:
        known = {"labels"} | {f"{t}.{f.name}" for t in _TOWERS for f in fields(Features)}
        unknown = sorted(set(tensors) - known)
        if unknown:
            raise ValueError(f"{path}: unexpected tensors {unknown} in a feature file.")
        towers = {}
        for tower in _TOWERS:
            parts = {f.name: tensors.get(f"{tower}.{f.name}") for f in fields(Features)}
            if all(value is None for value in parts.values()):
                towers[tower] = None
            elif parts["activations"] is None or parts["embeddings"] is None:
                raise ValueError(f"{path}: {tower} features lack activations or embeddings.")
            else:
                towers[tower] = Features(**parts)
        extra = {k: v for k, v in metadata.items() if k not in ("format", "version")}
        return cls(towers["image"], towers["text"], tensors.get("labels"), extra)


def extract_features(
    model_or_adapter: Any,
    loader: Iterable[Any],
    *,
    device: torch.device | str | None = None,
    progress_bar: bool = False,
) -> FeatureSet:
    """Encode every batch of ``loader`` and concatenate the features on the CPU.

    Parameters
    ----------
    model_or_adapter : nn.Module or DualEncoderAdapter
        a supported dual encoder (see :func:`laplace_vlm.adapters.get_adapter`) or its adapter.
    loader : iterable
        batches ``(images, labels)`` with `(B,)` integer labels, ``(images, tokens)`` with
        `(B, L)` integer tokens (or a tokenizer mapping), or mappings with any of the keys
        ``"image"``, ``"text"``, ``"label"``.
    device : torch.device or str, optional
        where batches are sent; default: the device of the model's image head.
    progress_bar : bool, default=False
        show a tqdm progress bar (laplace's convention).

    Returns
    -------
    FeatureSet
        `(N, ...)` features of each tower present in the batches, `(N,)` labels if given.
    """
    adapter = get_adapter(model_or_adapter)
    device = adapter.device if device is None else torch.device(device)
    parts: dict[str, list[Any]] = {key: [] for key in _BATCH_KEYS}
    n_batches = 0
    for batch in tqdm(loader, desc="[Extracting features]", disable=not progress_bar):
        for key, value in _split_batch(batch).items():
            encoded = value if key == "label" else _encode(adapter, key, _to(value, device))
            parts[key].append(encoded)
        n_batches += 1
    if n_batches == 0:
        raise ValueError("the loader yielded no batches.")
    for key, values in parts.items():
        if values and len(values) != n_batches:
            raise ValueError(f"{key!r} is in {len(values)} of {n_batches} batches, not in all.")
    return FeatureSet(
        image=_concat(parts["image"]),
        text=_concat(parts["text"]),
        labels=torch.cat(parts["label"]) if parts["label"] else None,
        metadata={
            "family": adapter.family,
            "image_head": adapter.image_head.path,
            "text_head": adapter.text_head.path,
        },
    )


def _encode(adapter: DualEncoderAdapter, tower: str, value: Any) -> Features:
    """Features of one tower's batch, moved to the CPU."""
    features = adapter.encode_image(value) if tower == "image" else adapter.encode_text(value)
    res = None if features.residual is None else features.residual.cpu()
    return Features(features.activations.cpu(), features.embeddings.cpu(), res)


def _split_batch(batch: Any) -> dict[str, Any]:
    """``{"image": ..., "text": ..., "label": ...}`` (only the keys present) of one batch."""
    if isinstance(batch, Mapping):
        unknown = set(batch) - set(_BATCH_KEYS)
        if unknown or not batch:
            raise ValueError(
                f"a dict batch takes the keys {_BATCH_KEYS}; got {sorted(map(str, batch))}."
            )
        batch = dict(batch)
        if "label" in batch:
            batch["label"] = _labels(batch["label"])
        return batch
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        images, second = batch
        if isinstance(second, Mapping):  # a Hugging Face tokenizer's output
            return {"image": images, "text": second}
        second = torch.as_tensor(second)
        if second.dim() == 2 and not second.is_floating_point():
            return {"image": images, "text": second}
        return {"image": images, "label": _labels(second)}
    raise ValueError(
        "a batch must be (images, labels), (images, tokens) or a dict with keys "
        f"{_BATCH_KEYS}; got {type(batch).__name__}"
        + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
        + "."
    )


def _labels(labels: Any) -> torch.Tensor:
    labels = torch.as_tensor(labels)
    if labels.dim() != 1 or labels.is_floating_point() or labels.is_complex():
        raise ValueError(
            f"labels must be a 1-D integer tensor (tokens: 2-D), got {labels.dtype} "
            f"of shape {tuple(labels.shape)}."
        )
    return labels.cpu().long()


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, Mapping):
        return {key: _to(item, device) for key, item in value.items()}
    return value


def _concat(batches: list[Features]) -> Features | None:
    if not batches:
        return None
    residuals = [f.residual for f in batches]
    return Features(
        torch.cat([f.activations for f in batches]),
        torch.cat([f.embeddings for f in batches]),
        torch.cat(residuals) if residuals[0] is not None else None,
    )
