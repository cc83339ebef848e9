"""Saving a fitted ``DualEncoderLaplace``: safetensors with metadata, never pickle."""

from __future__ import annotations

import hashlib
import json
import os
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from laplace_vlm.io.safetensors_file import write_safetensors
from laplace_vlm.validation import check_saved_posterior

if TYPE_CHECKING:
    from laplace_vlm.dual_encoder_laplace import DualEncoderLaplace

FORMAT = "laplace_vlm.dual_encoder_laplace"
VERSION = "1"


def heads_fingerprint(heads: nn.Module) -> str:
    """Short hash of the heads' shapes and float32 weights: tells models apart on load."""
    digest = hashlib.sha256()
    for name, p in sorted(heads.state_dict().items()):
        if p is None or name.startswith("class_"):
            continue
        digest.update(f"{name}{tuple(p.shape)}".encode())
        digest.update(p.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def check_compatible(la: DualEncoderLaplace, state: dict[str, Any]) -> None:
    """Raise a clear error when ``state`` was saved for other heads or another likelihood."""
    if state.get("cls_name") != type(la).__name__:
        raise ValueError(
            f"this state is not a {type(la).__name__} (cls_name={state.get('cls_name')!r})."
        )
    if state.get("contrastive") != la.contrastive:
        raise ValueError(
            f"saved for contrastive={state.get('contrastive')!r}, this posterior is {la.contrastive!r}."
        )
    fingerprint = heads_fingerprint(la.heads)
    if state.get("fingerprint") != fingerprint:
        raise ValueError(
            "the saved posterior was fitted for other projection heads (fingerprint "
            f"{state.get('fingerprint')} != {fingerprint}): load it with the model it was fitted on."
        )


def save_laplace(la: DualEncoderLaplace, path: str | os.PathLike, overwrite: bool = False) -> None:
    """Write factors, prior, MAP heads and metadata; atomic, refuses to overwrite by default."""
    state = la.state_dict()
    tensors = {f"H.{i}.{j}": F for i, block in enumerate(state["H"]) for j, F in enumerate(block)}
    tensors.update({f"heads.{k}": v for k, v in la.heads.state_dict().items() if v is not None})
    tensors["mean"] = state["mean"]
    tensors["prior_precision"] = state["prior_precision"]
    tensors["prior_mean"] = torch.as_tensor(state["prior_mean"]).reshape(-1)
    tensors["loss"] = torch.as_tensor(state["loss"]).reshape(())
    metadata = {
        "format": FORMAT,
        "version": VERSION,
        "contrastive": la.contrastive,
        "curvature": la.curvature,
        "damping": json.dumps(state["damping"]),
        "temperature": json.dumps(float(la.temperature)),
        "n_data": json.dumps(int(la.n_data)),
        "fingerprint": state["fingerprint"],
        "kron_layout": json.dumps([len(block) for block in state["H"]]),
        "head_shapes": json.dumps(
            {k: list(v.shape) for k, v in la.heads.state_dict().items() if v is not None}
        ),  # fmt: skip
    }
    write_safetensors(path, tensors, metadata, overwrite=overwrite)


def read_laplace_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a file written by :func:`save_laplace`, or a clear error."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file: {path}")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path} is not a readable safetensors file ({err}).") from err
    if metadata.get("format") != FORMAT:
        raise ValueError(
            f"{path} is not a laplace-vlm posterior (format={metadata.get('format')!r})."
        )
    if metadata.get("version") != VERSION:
        raise ValueError(f"{path} has version {metadata.get('version')!r}, expected {VERSION}.")
    check_saved_posterior(path, tensors, metadata)  # before anything reaches laplace's symeig
    return tensors, metadata


def load_laplace(
    cls: type[DualEncoderLaplace], path: str | os.PathLike, model: nn.Module | None, **kwargs: Any
) -> DualEncoderLaplace:
    """Rebuild a posterior from :func:`save_laplace` output (for ``model`` or the saved heads)."""
    tensors, meta = read_laplace_file(path)
    kwargs.setdefault("contrastive", meta["contrastive"])
    kwargs.setdefault("damping", json.loads(meta["damping"]))
    kwargs.setdefault("temperature", json.loads(meta["temperature"]))
    kwargs.setdefault("curvature", meta.get("curvature", "closed_form"))
    if model is None:
        heads = {k[len("heads.") :]: v for k, v in tensors.items() if k.startswith("heads.")}
        la = cls(None, **_heads_kwargs(heads), **kwargs)
    else:
        la = cls(model, **kwargs)
    layout = json.loads(meta["kron_layout"])
    state = {
        "H": [[tensors[f"H.{i}.{j}"] for j in range(n)] for i, n in enumerate(layout)],
        "mean": tensors["mean"],
        "loss": tensors["loss"],
        "prior_mean": tensors["prior_mean"]
        if tensors["prior_mean"].numel() > 1
        else tensors["prior_mean"].reshape(()),
        "prior_precision": tensors["prior_precision"],
        "sigma_noise": torch.tensor(1.0),
        "n_data": json.loads(meta["n_data"]),
        "n_outputs": la._dims[0],
        "likelihood": "classification",
        "temperature": la.temperature,
        "enable_backprop": la.enable_backprop,
        "cls_name": cls.__name__,
        "contrastive": meta["contrastive"],
        "fingerprint": meta["fingerprint"],
    }
    la.load_state_dict(state)
    return la


def _heads_kwargs(heads: dict[str, torch.Tensor]) -> dict[str, Any]:
    def head(prefix: str) -> SimpleNamespace:
        return SimpleNamespace(weight=heads[f"{prefix}.weight"], bias=heads.get(f"{prefix}.bias"))

    return dict(
        image_projection=head("image_projection"),
        text_projection=head("text_projection"),
        logit_scale=heads["logit_scale"],
        logit_bias=heads.get("logit_bias"),
    )
