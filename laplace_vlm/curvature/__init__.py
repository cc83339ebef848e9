"""Curvature backends for one projection head: a registry of ``head_factors`` callables.

Every backend is a :class:`~laplace_vlm.curvature.backend.HeadCurvature` instance (or a function
with the signature of :func:`laplace_vlm.curvature.closed_form.head_factors`) and returns ``(B, A)``: the summed output-side GGN `(D, D)` and the summed input outer
products `(d, d)` of one class batch, unscaled. ``DualEncoderLaplace`` turns them into
laplace's ``Kron`` scaling.
"""

from __future__ import annotations

import importlib
from typing import Callable

import torch

HeadFactorsFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]

# name -> "module:function"; imported on first use so that optional backends cost nothing.
_BACKENDS: dict[str, str | HeadFactorsFn] = {
    "closed_form": "laplace_vlm.curvature.closed_form:head_factors",
    "asdl": "laplace_vlm.curvature.asdl:head_factors",
    "backpack": "laplace_vlm.curvature.backpack:head_factors",
    "curvlinops": "laplace_vlm.curvature.curvlinops:head_factors",
}


def register_curvature_backend(name: str, fn: HeadFactorsFn | str) -> None:
    """Register ``fn`` (or a ``"module:function"`` path) as curvature backend ``name``.

    Parameters
    ----------
    name : str
        the name ``DualEncoderLaplace(curvature=...)`` takes; an existing one is replaced.
    fn : callable or str
        a function with the signature of
        :func:`laplace_vlm.curvature.closed_form.head_factors`, or its ``"module:function"``
        path, imported on first use.
    """
    _BACKENDS[name] = fn


def available_curvature_backends() -> list[str]:
    """Names accepted by ``DualEncoderLaplace(curvature=...)``.

    Returns
    -------
    list of str
        the registered backend names, sorted.
    """
    return sorted(_BACKENDS)


def get_curvature_backend(name: str) -> HeadFactorsFn:
    """Return the ``head_factors`` function registered as ``name``.

    Parameters
    ----------
    name : str
        a registered backend name (:func:`available_curvature_backends`).

    Returns
    -------
    callable
        the backend's ``head_factors``, imported on the first call.

    Raises
    ------
    ValueError
        if ``name`` is not registered.
    """
    if name not in _BACKENDS:
        raise ValueError(
            f"curvature must be one of {available_curvature_backends()}, got {name!r}."
        )
    fn = _BACKENDS[name]
    if isinstance(fn, str):
        module, attr = fn.split(":")
        fn = getattr(importlib.import_module(module), attr)
        _BACKENDS[name] = fn
    return fn


# laplace's own curvature classes map onto our per-head backends of the same library
_LAPLACE_BACKENDS = {"AsdlGGN": "asdl", "BackPackGGN": "backpack", "CurvlinopsGGN": "curvlinops"}


def curvature_name(curvature: str, backend: type | None = None) -> str:
    """The backend name for ``curvature=``, or for laplace's ``backend=`` class if given.

    Parameters
    ----------
    curvature : str
        a backend name, returned as is when ``backend`` is None.
    backend : type, optional
        laplace's ``AsdlGGN``, ``BackPackGGN`` or ``CurvlinopsGGN`` (matched by class name),
        mapped to ``'asdl'``, ``'backpack'`` or ``'curvlinops'``.

    Returns
    -------
    str
        the backend name.

    Raises
    ------
    ValueError
        for any other ``backend``.
    """
    if backend is None:
        return curvature
    name = _LAPLACE_BACKENDS.get(getattr(backend, "__name__", ""))
    if name is None:
        raise ValueError(
            f"backend must be one of laplace's {sorted(_LAPLACE_BACKENDS)} (or use curvature=...), "
            f"got {backend!r}."
        )
    return name
