"""Input checks with errors that name the argument and what was expected.

Validation happens before anything reaches laplace's ``symeig``, which calls ``exit()`` on a
failed eigendecomposition (a NaN would otherwise end the user's interpreter with status 0).
The checks reduce without temporaries the size of their input, so validating `(N, d)`
activations does not add an `O(N)` allocation to a chunked prediction.
"""

from __future__ import annotations

import math

import torch


def check_matrix(name: str, value: object, dim: int | None = None) -> torch.Tensor:
    """A finite, non-empty float tensor of shape `(N, dim)` that holds data."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}.")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}.")
    if value.ndim != 2 or (dim is not None and value.shape[1] != dim):
        expected = f"(N, {dim})" if dim is not None else "(N, d)"
        raise ValueError(f"{name} must have shape {expected}, got {tuple(value.shape)}.")
    if len(value) == 0:
        raise ValueError(f"{name} is empty.")
    check_has_data(name, value)
    check_finite(name, value)
    return value


def check_has_data(name: str, value: torch.Tensor) -> torch.Tensor:
    """Raise if ``value`` lives on the meta device (a shape without data cannot be moved)."""
    if value.is_meta:
        raise ValueError(
            f"{name} is on the 'meta' device and holds no data: materialise it (e.g. load the "
            "weights) before passing it."
        )
    return value


def check_finite(name: str, value: torch.Tensor) -> torch.Tensor:
    """Raise if ``value`` holds NaN or inf.

    ``aminmax`` propagates NaN and sees both infinities, in one reduction without the
    boolean temporary of ``isfinite(value).all()``.
    """
    if not value.is_floating_point() or value.numel() == 0:
        return value  # integers and empty tensors are finite
    check_has_data(name, value)
    lo, hi = torch.aminmax(value.detach())
    if not (math.isfinite(lo.item()) and math.isfinite(hi.item())):
        raise ValueError(f"{name} contains NaN or inf.")
    return value


def check_positive(name: str, value: float | torch.Tensor) -> torch.Tensor:
    """A finite tensor with every entry > 0 (prior precision, temperature, pseudo-counts)."""
    tensor = torch.as_tensor(value)
    check_finite(name, tensor)
    if tensor.numel() == 0 or not bool((tensor > 0).all()):
        raise ValueError(f"{name} must be positive and finite, got {_short(tensor)}.")
    return tensor


def check_nonzero_norm(name: str, z: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Raise if a row of the embeddings ``z`` has a zero or non-finite norm.

    A zero norm leaves the cosine undefined; a non-finite one means NaN weights or an
    overflow (``|z|^2`` beyond the dtype's range), which would otherwise be misreported
    as zero-norm or surface later as a NaN curvature.
    """
    norms = z.norm(dim=-1)
    finite = torch.isfinite(norms)
    if not bool(finite.all()):
        bad = (~finite).nonzero().flatten()
        raise ValueError(
            f"{name} has NaN or inf (or overflowing) norms at rows {bad[:10].tolist()}: "
            "check the projection weights and the scale of the activations."
        )
    bad = (norms <= eps * max(1.0, norms.max().item())).nonzero().flatten()
    if len(bad):
        raise ValueError(
            f"{name} gives zero-norm embeddings at rows {bad[:10].tolist()}: "
            "the cosine similarity is undefined."
        )
    return z


def _short(tensor: torch.Tensor) -> str:
    values = tensor.flatten()[:4].tolist()
    return str(values if tensor.numel() > 1 else values[0] if values else "[]")


_POSTERIOR_METADATA = ("contrastive", "damping", "temperature", "n_data", "fingerprint")


def check_saved_posterior(
    path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]
) -> None:
    """Structure and values of a saved posterior, before any of it reaches laplace.

    A file with the right ``format`` tag may still be truncated by hand, tampered with or
    written by a buggy version: every entry ``load`` reads must be there, every factor must
    have the shape the saved heads imply, every tensor must be finite (a NaN factor would
    reach laplace's ``symeig`` and its ``exit()``), and prior and temperature positive.

    Parameters
    ----------
    path : str
        the file, for the messages.
    tensors, metadata : dict
        what :func:`laplace_vlm.io.posterior_file.read_laplace_file` read.

    Raises
    ------
    ValueError
        naming the first entry that is missing or wrong.
    """
    import json

    def fail(what: str) -> ValueError:
        return ValueError(f"{path} is not a valid laplace-vlm posterior: {what}.")

    missing = [k for k in (*_POSTERIOR_METADATA, "kron_layout") if k not in metadata]
    if missing:
        raise fail(f"metadata lacks {missing}")
    parsed = {}
    for key in ("kron_layout", "n_data", "temperature", "damping"):
        try:
            parsed[key] = json.loads(metadata[key])
        except json.JSONDecodeError as err:
            raise fail(f"metadata {key}={metadata[key]!r} is not JSON ({err})") from err
    layout, n_data = parsed["kron_layout"], parsed["n_data"]
    temperature, damping = parsed["temperature"], parsed["damping"]
    if not isinstance(n_data, int) or isinstance(n_data, bool) or n_data < 1:
        raise fail(f"n_data must be a positive integer, got {metadata['n_data']!r}")
    if (
        not isinstance(temperature, (int, float))
        or not math.isfinite(temperature)
        or temperature <= 0
    ):
        raise fail(f"temperature must be positive and finite, got {metadata['temperature']!r}")
    if not isinstance(damping, bool) and damping != "symmetric":
        raise fail(f"damping must be true, false or 'symmetric', got {metadata['damping']!r}")

    def tensor(name: str) -> torch.Tensor:
        if name not in tensors:
            raise fail(f"tensor {name!r} is missing")
        value = tensors[name]
        if value.is_floating_point():
            try:
                check_finite(name, value)
            except ValueError as err:
                raise fail(str(err).rstrip(".")) from err
        return value

    def shaped(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        value = tensor(name)
        if tuple(value.shape) != shape:
            raise fail(f"{name} has shape {tuple(value.shape)}, expected {shape}")
        return value

    # the heads the file was saved with fix every other shape
    heads = {}
    for side in ("image", "text"):
        weight = tensor(f"heads.{side}_projection.weight")
        if weight.ndim != 2:
            raise fail(f"heads.{side}_projection.weight must be 2-D, got {tuple(weight.shape)}")
        bias_name = f"heads.{side}_projection.bias"
        if bias_name in tensors:
            shaped(bias_name, (weight.shape[0],))
        heads[side] = (*weight.shape, bias_name in tensors)
    shaped("heads.logit_scale", ())
    if "heads.logit_bias" in tensors:
        shaped("heads.logit_bias", ())
    expected_layout, blocks = [], []
    for D, d, bias in heads.values():
        expected_layout.append(2)
        blocks.append([(D, D), (d, d)])
        if bias:
            expected_layout.append(1)
            blocks.append([(D, D)])
    if layout != expected_layout:
        raise fail(f"kron_layout {layout} does not match the saved heads ({expected_layout})")
    for i, block in enumerate(blocks):
        for j, shape in enumerate(block):
            shaped(f"H.{i}.{j}", shape)
    n_params = sum(D * d + (D if bias else 0) for D, d, bias in heads.values())
    shaped("mean", (n_params,))
    tensor("loss")
    prior = tensor("prior_precision")
    if prior.numel() not in (1, len(blocks), n_params) or not bool((prior > 0).all()):
        raise fail(
            f"prior_precision must hold 1, {len(blocks)} or {n_params} positive values, "
            f"got {_short(prior)}"
        )
    prior_mean = tensor("prior_mean")
    if prior_mean.numel() not in (1, n_params):
        raise fail(f"prior_mean must hold 1 or {n_params} values, got {prior_mean.numel()}")
