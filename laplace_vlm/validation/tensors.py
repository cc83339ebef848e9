"""Checks of tensors: data matrices, finite and positive values, norms, probabilities, labels.

The checks reduce without temporaries the size of their input, so validating `(N, d)`
activations does not add an `O(N)` allocation to a chunked prediction.
"""

from __future__ import annotations

import math

import torch


def check_matrix(name: str, value: object, dim: int | None = None) -> torch.Tensor:
    """A finite, non-empty float tensor of shape `(N, dim)` that holds data.

    Parameters
    ----------
    name : str
        the argument's name, for the error messages.
    value : object
        what was passed.
    dim : int, optional
        the required number of columns; any if None.

    Returns
    -------
    torch.Tensor
        ``value`` itself.

    Raises
    ------
    TypeError
        if ``value`` is not a floating-point tensor.
    ValueError
        if it is not 2-D with ``dim`` columns, has no rows or no columns, is on the meta device,
        or is not finite.
    """
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}.")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}.")
    if value.ndim != 2 or (dim is not None and value.shape[1] != dim):
        expected = f"(N, {dim})" if dim is not None else "(N, d)"
        raise ValueError(f"{name} must have shape {expected}, got {tuple(value.shape)}.")
    if value.numel() == 0:  # no rows, or no columns
        raise ValueError(f"{name} is empty, got shape {tuple(value.shape)}.")
    check_has_data(name, value)
    check_finite(name, value)
    return value


def check_has_data(name: str, value: torch.Tensor) -> torch.Tensor:
    """Raise if ``value`` lives on the meta device (a shape without data cannot be moved).

    Parameters
    ----------
    name : str
        the argument's name, for the error messages.
    value : torch.Tensor
        the tensor to check.

    Returns
    -------
    torch.Tensor
        ``value`` itself.
    """
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

    Parameters
    ----------
    name : str
        the argument's name, for the error messages.
    value : torch.Tensor
        the tensor to check; integer and empty tensors pass.

    Returns
    -------
    torch.Tensor
        ``value`` itself.
    """
    if not value.is_floating_point() or value.numel() == 0:
        return value  # integers and empty tensors are finite
    check_has_data(name, value)
    lo, hi = torch.aminmax(value.detach())
    if not (math.isfinite(lo.item()) and math.isfinite(hi.item())):
        raise ValueError(f"{name} contains NaN or inf.")
    return value


def as_real_tensor(name: str, value: object, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``torch.as_tensor(value)`` of a real number or tensor, or a ``TypeError`` naming ``name``.

    Parameters
    ----------
    name : str
        the argument's name, for the error messages.
    value : object
        a number, a sequence of numbers or a tensor.
    dtype : torch.dtype, optional
        the dtype of the result.

    Returns
    -------
    torch.Tensor
        the tensor.

    Raises
    ------
    TypeError
        for strings, bools, complex numbers and anything torch cannot read as real numbers.
    """
    if isinstance(value, (str, bytes, bool)):
        raise TypeError(
            f"{name} must be a real number or tensor, got {type(value).__name__} {value!r}."
        )
    try:
        tensor = torch.as_tensor(value, dtype=dtype)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(
            f"{name} must be a real number or tensor, got {type(value).__name__}."
        ) from None
    if tensor.is_complex() or tensor.dtype == torch.bool:
        raise TypeError(f"{name} must be real-valued, got {tensor.dtype}.")
    return tensor


def check_positive(name: str, value: float | torch.Tensor) -> torch.Tensor:
    """A finite tensor with every entry > 0 (prior precision, temperature, pseudo-counts).

    Parameters
    ----------
    name : str
        the argument's name, for the error messages.
    value : float or torch.Tensor
        what was passed.

    Returns
    -------
    torch.Tensor
        ``torch.as_tensor(value)``.

    Raises
    ------
    TypeError
        if it is not a real number or tensor.
    ValueError
        if it is empty, not finite, or has an entry <= 0.
    """
    tensor = as_real_tensor(name, value)
    check_finite(name, tensor)
    if tensor.numel() == 0 or not bool((tensor > 0).all()):
        raise ValueError(f"{name} must be positive and finite, got {_short(tensor)}.")
    return tensor


def check_nonzero_norm(name: str, z: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Raise if a row of the embeddings ``z`` has a zero or non-finite norm.

    A zero norm leaves the cosine undefined; a non-finite one means NaN weights or an
    overflow (``|z|^2`` beyond the dtype's range), which would otherwise be misreported
    as zero-norm or surface later as a NaN curvature.

    Parameters
    ----------
    name : str
        what ``z`` is, for the error messages.
    z : torch.Tensor
        `(N, D)` embeddings.
    eps : float, default=1e-12
        a norm at most ``eps * max(1, largest norm)`` counts as zero.

    Returns
    -------
    torch.Tensor
        ``z`` itself.
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


def check_probabilities(name: str, value: object) -> torch.Tensor:
    """A :func:`check_matrix` whose rows are distributions: entries in [0, 1] summing to 1.

    Logits and per-pair sigmoid probabilities fail here; a metric that can take logits says
    so with ``from_logits=True``.

    Parameters
    ----------
    name : str
        the argument's name, for the error messages.
    value : object
        what was passed, `(N, C)`.

    Returns
    -------
    torch.Tensor
        ``value`` itself.

    Raises
    ------
    TypeError, ValueError
        as :func:`check_matrix`; ``ValueError`` for entries outside [0, 1] or rows that do
        not sum to 1 (within ``1e-3`` in float32 and below, ``1e-6`` in float64).
    """
    check_matrix(name, value)
    lo, hi = torch.aminmax(value.detach())
    tol = 1e-6 if value.dtype == torch.float64 else 1e-3
    err = (value.detach().sum(-1, dtype=torch.float64) - 1).abs().max().item()
    if lo.item() < 0 or hi.item() > 1 or err > tol:
        raise ValueError(
            f"{name} must be probabilities (rows of entries in [0, 1] summing to 1), got "
            f"entries in [{lo.item():.4g}, {hi.item():.4g}] and rows off 1 by up to {err:.3g}: "
            "for logits pass from_logits=True (where offered) or apply a softmax first."
        )
    return value


def check_labels(name: str, value: object, n: int, n_classes: int) -> torch.Tensor:
    """`(n,)` integer class indices in ``[0, n_classes)``.

    Float labels are refused instead of truncated (``2.7`` is no class index).

    Parameters
    ----------
    name : str
        the argument's name, for the error messages.
    value : object
        what was passed.
    n : int
        the number of predictions the labels belong to.
    n_classes : int
        the number of classes.

    Returns
    -------
    torch.Tensor
        ``value`` itself.

    Raises
    ------
    TypeError
        if ``value`` is not an integer tensor.
    ValueError
        for another shape or an index out of range.
    """
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}.")
    if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor of class indices, got {value.dtype}.")
    if tuple(value.shape) != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {tuple(value.shape)}.")
    check_has_data(name, value)
    if n and (int(value.min()) < 0 or int(value.max()) >= n_classes):
        raise ValueError(
            f"{name} must lie in [0, {n_classes}), got values in "
            f"[{int(value.min())}, {int(value.max())}]."
        )
    return value


def _short(tensor: torch.Tensor) -> str:
    values = tensor.flatten()[:4].tolist()
    return str(values if tensor.numel() > 1 else values[0] if values else "[]")
