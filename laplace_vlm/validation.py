"""Input checks with errors that name the argument and what was expected.

Validation happens before anything reaches laplace's ``symeig``, which calls ``exit()`` on a
failed eigendecomposition (a NaN would otherwise end the user's interpreter with status 0).
"""

from __future__ import annotations

import torch


def check_matrix(name: str, value: object, dim: int | None = None) -> torch.Tensor:
    """A finite, non-empty float tensor of shape `(N, dim)`."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}.")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}.")
    if value.ndim != 2 or (dim is not None and value.shape[1] != dim):
        expected = f"(N, {dim})" if dim is not None else "(N, d)"
        raise ValueError(f"{name} must have shape {expected}, got {tuple(value.shape)}.")
    if len(value) == 0:
        raise ValueError(f"{name} is empty.")
    check_finite(name, value)
    return value


def check_finite(name: str, value: torch.Tensor) -> torch.Tensor:
    """Raise if ``value`` holds NaN or inf."""
    if not torch.isfinite(value).all():
        raise ValueError(f"{name} contains NaN or inf.")
    return value


def check_nonzero_norm(name: str, z: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Raise if a row of the embeddings ``z`` has (numerically) zero norm: its cosine is undefined."""
    norms = z.norm(dim=-1)
    bad = (norms <= eps * max(1.0, norms.max().item())).nonzero().flatten()
    if len(bad):
        raise ValueError(
            f"{name} gives zero-norm embeddings at rows {bad[:10].tolist()}: "
            "the cosine similarity is undefined."
        )
    return z
