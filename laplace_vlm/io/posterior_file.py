"""Posterior files: a ``state_dict`` as safetensors, the tensors as tensors, the rest as metadata.

``save_state`` walks any laplace-style state dict (tensors, nested lists and dicts of them,
numbers, strings) and writes the tensors under their path (``H.0.1``, ``heads.logit_scale``)
and the structure as JSON metadata; ``read_state`` rebuilds the same dict. Nothing is ever
unpickled, and a key that laplace adds to its state in a later release is saved and loaded
without a change here. ``check_state`` validates a state before anything reaches laplace
(a NaN factor would reach its ``symeig`` and its ``exit()``). A SHA-256 over the tensors
and the metadata, written with the file and checked on reading, turns any other change of the
bytes (a flipped bit in a factor, an edited temperature) into an error instead of a silently
different posterior.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from typing import Any

import torch
from torch import nn

from laplace_vlm.docstrings import fill_doc
from laplace_vlm.io.safetensors_file import read_safetensors, write_safetensors
from laplace_vlm.validation import check_finite

FORMAT = "laplace_vlm.dual_encoder_laplace"
VERSION = "2"
_TENSOR = "$tensor"  # marks a tensor leaf in the JSON structure
_CHECKSUM = "sha256"


def heads_fingerprint(heads: nn.Module) -> str:
    """Short hash of the heads' shapes and float32 weights: tells models apart on load.

    Parameters
    ----------
    heads : nn.Module
        the heads; ``None`` entries and the ``class_*`` buffers of their state dict are
        left out.

    Returns
    -------
    str
        16 hex digits of a SHA-256 over the sorted entry names, shapes and values.
    """
    digest = hashlib.sha256()
    for name, p in sorted(heads.state_dict().items()):
        if p is None or name.startswith("class_"):
            continue
        digest.update(f"{name}{tuple(p.shape)}".encode())
        digest.update(p.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def save_state(path: str | os.PathLike, state: dict[str, Any], overwrite: bool = False) -> None:
    """Write a state dict atomically; refuse to replace an existing file unless ``overwrite``.

    Parameters
    ----------
    path : str or os.PathLike
        the ``.safetensors`` file.
    state : dict
        tensors, nested lists/tuples/dicts of them, ``None``, bools, numbers and strings.
    overwrite : bool, default=False
        replace an existing ``path``.

    Raises
    ------
    FileExistsError
        if ``path`` exists and ``overwrite`` is False.
    TypeError
        for an entry of another type.
    """
    tensors: dict[str, torch.Tensor] = {}
    structure = _encode(state, "", tensors)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    metadata = {"format": FORMAT, "version": VERSION, "state": json.dumps(structure)}
    metadata[_CHECKSUM] = _checksum(tensors, metadata)
    write_safetensors(path, tensors, metadata, overwrite=overwrite)


def _checksum(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """SHA-256 over the metadata and every tensor's name, dtype, shape and bytes."""
    digest = hashlib.sha256()
    entries = {k: v for k, v in metadata.items() if k != _CHECKSUM}
    digest.update(json.dumps(entries, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        # a byte view: works for every dtype (bf16 and bool have no numpy twin to go through)
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@fill_doc
def read_state(path: str | os.PathLike) -> dict[str, Any]:
    """The state dict of a file written by :func:`save_state` (or by laplace-vlm 0.1).

    Parameters
    ----------
    %(path)s

    Returns
    -------
    dict
        the saved state, tensors on the CPU; a 0.1 file is converted to the current layout.

    Raises
    ------
    FileNotFoundError
        if ``path`` does not exist.
    ValueError
        if it is not a laplace-vlm posterior file of a known version, is malformed (checked
        by :func:`check_state`), or its bytes differ from what was written (checksum).
    """
    tensors, metadata = read_safetensors(path, FORMAT, "laplace-vlm posterior")
    version = metadata.get("version")
    if version == "1":  # 0.1 wrote no checksum: the structural checks are all there is
        state = _state_from_v1(path, tensors, metadata)
        check_state(state, source=os.fspath(path))
        return state
    if version != VERSION:
        raise ValueError(f"{path} has version {version!r}, expected {VERSION} (or 1).")
    try:
        state = _decode(json.loads(metadata["state"]), tensors)
    except (KeyError, json.JSONDecodeError, TypeError, RecursionError) as err:
        raise ValueError(f"{path} is not a valid laplace-vlm posterior: {err!r}.") from err
    # structure first, so that a hand-edited file gets the message that says what is wrong
    check_state(state, source=os.fspath(path))
    if metadata.get(_CHECKSUM) != _checksum(tensors, metadata):
        raise ValueError(
            f"{path} is corrupted: its content does not match the checksum written with it "
            "(the file was changed or damaged after saving)."
        )
    return state


def _encode(value: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        tensors[key] = value
        return {_TENSOR: key}
    if isinstance(value, (list, tuple)):
        return [_encode(v, f"{key}.{i}", tensors) for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {k: _encode(v, f"{key}.{k}" if key else k, tensors) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"state entry {key!r} of type {type(value).__name__} cannot be saved.")


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, dict) and set(value) == {_TENSOR}:
        return tensors[value[_TENSOR]]
    if isinstance(value, dict):
        return {k: _decode(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    return value


def _state_from_v1(path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> dict:
    """A state dict from the 0.1 format (tensors by name, scalars as JSON metadata)."""
    try:
        layout = json.loads(meta["kron_layout"])
        heads = {k[len("heads.") :]: v for k, v in tensors.items() if k.startswith("heads.")}
        prior_mean = tensors["prior_mean"]
        return {
            "H": [[tensors[f"H.{i}.{j}"] for j in range(n)] for i, n in enumerate(layout)],
            "mean": tensors["mean"],
            "loss": tensors["loss"],
            "prior_mean": prior_mean if prior_mean.numel() > 1 else prior_mean.reshape(()),
            "prior_precision": tensors["prior_precision"],
            "sigma_noise": torch.tensor(1.0),
            "n_data": json.loads(meta["n_data"]),
            "n_outputs": heads["image_projection.weight"].shape[0],
            "likelihood": "classification",
            "temperature": json.loads(meta["temperature"]),
            "enable_backprop": False,
            "cls_name": "DualEncoderLaplace",
            "contrastive": meta["contrastive"],
            "damping": json.loads(meta["damping"]),
            "curvature": meta.get("curvature", "closed_form"),
            "fingerprint": meta["fingerprint"],
            "heads": heads,
        }
    except (KeyError, json.JSONDecodeError, TypeError) as err:
        raise ValueError(f"{path} is not a valid laplace-vlm posterior: lacks {err}.") from err


def check_state(state: dict[str, Any], source: str = "state_dict") -> None:
    """Structure and values of a ``DualEncoderLaplace`` state dict, before laplace sees it.

    Every entry ``load_state_dict`` reads must be there, every factor must have the shape the
    saved heads imply, every tensor must be finite, and prior and temperature positive.

    Parameters
    ----------
    state : dict
        what ``DualEncoderLaplace.state_dict`` returns (or a file held).
    source : str, default='state_dict'
        where it came from, for the messages.

    Raises
    ------
    ValueError
        naming the first entry that is missing or wrong.
    """

    def fail(what: str) -> ValueError:
        return ValueError(f"{source} is not a valid laplace-vlm posterior: {what}.")

    def tensor(name: str, value: Any) -> torch.Tensor:
        if not isinstance(value, torch.Tensor):
            raise fail(f"{name} must be a tensor, got {type(value).__name__}")
        # eigh and the predictive run in float32 or float64 only (no fp16, no integers)
        if value.dtype not in (torch.float32, torch.float64):
            raise fail(f"{name} must be float32 or float64, got {value.dtype}")
        try:
            check_finite(name, value)
        except ValueError as err:
            raise fail(str(err).rstrip(".")) from err
        return value

    def shaped(name: str, value: Any, shape: tuple[int, ...]) -> torch.Tensor:
        value = tensor(name, value)
        if tuple(value.shape) != shape:
            raise fail(f"{name} has shape {tuple(value.shape)}, expected {shape}")
        return value

    if not isinstance(state, dict):
        raise fail(f"it must be a dict, got {type(state).__name__}")
    required = ("H", "mean", "loss", "prior_mean", "prior_precision", "sigma_noise", "n_data",
                "n_outputs", "likelihood", "temperature", "enable_backprop", "cls_name",
                "contrastive", "damping", "fingerprint", "heads")  # fmt: skip
    missing = [k for k in required if k not in state]
    if missing:
        raise fail(f"it lacks {missing}")
    _check_plain_entries(state, fail)
    n_data, temperature, damping = state["n_data"], state["temperature"], state["damping"]
    if not isinstance(n_data, int) or isinstance(n_data, bool) or n_data < 1:
        raise fail(f"n_data must be a positive integer, got {n_data!r}")
    if (
        not isinstance(temperature, (int, float))
        or not math.isfinite(temperature)
        or (temperature <= 0)
    ):
        raise fail(f"temperature must be positive and finite, got {temperature!r}")
    if not isinstance(damping, bool) and damping != "symmetric":
        raise fail(f"damping must be true, false or 'symmetric', got {damping!r}")
    blocks, n_params = _expected_blocks(state["heads"], tensor, shaped, fail)
    H, need = state["H"], [len(b) for b in blocks]
    lists = isinstance(H, (list, tuple)) and all(isinstance(b, (list, tuple)) for b in H)
    if not lists or [len(b) for b in H] != need:
        layout = [len(b) for b in H] if lists else H
        raise fail(f"H has layout {layout}, the heads need {need}")
    for i, (block, shapes) in enumerate(zip(H, blocks)):
        for j, (factor, shape) in enumerate(zip(block, shapes)):
            shaped(f"H.{i}.{j}", factor, shape)
    shaped("sigma_noise", state["sigma_noise"], ())
    shaped("mean", state["mean"], (n_params,))
    tensor("loss", state["loss"])
    prior = tensor("prior_precision", state["prior_precision"])
    if prior.ndim > 1 or prior.numel() not in (1, len(blocks), n_params) or not (prior > 0).all():
        raise fail(f"prior_precision must hold 1, {len(blocks)} or {n_params} positive values")
    prior_mean = tensor("prior_mean", state["prior_mean"])
    if prior_mean.ndim > 1 or prior_mean.numel() not in (1, n_params):
        raise fail(f"prior_mean must hold 1 or {n_params} values")


def _check_plain_entries(state: dict[str, Any], fail) -> None:
    """The entries that are not tensors: their types and values, as the constructor needs them."""
    expected = {"likelihood": ("classification",), "contrastive": ("clip", "siglip")}
    for key, options in expected.items():
        if state[key] not in options:
            raise fail(f"{key} must be one of {options}, got {state[key]!r}")
    for key in ("cls_name", "fingerprint", "curvature"):
        if key in state and not isinstance(state[key], str):
            raise fail(f"{key} must be a string, got {state[key]!r}")
    if not isinstance(state["enable_backprop"], bool):
        raise fail(f"enable_backprop must be true or false, got {state['enable_backprop']!r}")
    joint = state.get("joint_bias", [False, False])
    if (
        not isinstance(joint, list)
        or len(joint) != 2
        or not all(isinstance(j, bool) for j in joint)
    ):
        raise fail(f"joint_bias must be two booleans, got {joint!r}")
    if not isinstance(state["n_outputs"], int) or isinstance(state["n_outputs"], bool):
        raise fail(f"n_outputs must be an integer, got {state['n_outputs']!r}")


def _expected_blocks(heads: Any, tensor, shaped, fail) -> tuple[list, int]:
    """Kron factor shapes per block and the parameter count the saved heads imply."""
    if not isinstance(heads, dict):
        raise fail("heads must be a dict of tensors")
    blocks, n_params = [], 0
    for side in ("image", "text"):
        name = f"{side}_projection.weight"
        if name not in heads:
            raise fail(f"heads.{name} is missing")
        weight = tensor(f"heads.{name}", heads[name])
        if weight.ndim != 2:
            raise fail(f"heads.{name} must be 2-D, got {tuple(weight.shape)}")
        D, d = weight.shape
        blocks.append([(D, D), (d, d)])
        n_params += D * d
        bias = f"{side}_projection.bias"
        if bias in heads:
            shaped(f"heads.{bias}", heads[bias], (D,))
            blocks.append([(D, D)])
            n_params += D
    if "logit_scale" not in heads:
        raise fail("heads.logit_scale is missing")
    shaped("heads.logit_scale", heads["logit_scale"], ())
    if heads.get("logit_bias") is not None:
        shaped("heads.logit_bias", heads["logit_bias"], ())
    return blocks, n_params
