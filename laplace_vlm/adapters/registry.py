"""The adapter registry: ``@register_adapter`` families, ``get_adapter(model)`` picks one."""

from __future__ import annotations

from typing import Any

from laplace_vlm.adapters.base import DualEncoderAdapter
from laplace_vlm.docstrings import fill_doc

_ADAPTERS: list[type[DualEncoderAdapter]] = []


def register_adapter(cls: type[DualEncoderAdapter]) -> type[DualEncoderAdapter]:
    """Class decorator: make ``cls`` available to :func:`get_adapter` (first match wins).

    Parameters
    ----------
    cls : type of DualEncoderAdapter
        the adapter class; registering it twice has no effect.

    Returns
    -------
    type of DualEncoderAdapter
        ``cls`` itself.
    """
    if cls not in _ADAPTERS:
        _ADAPTERS.append(cls)
    return cls


def get_adapter(model: Any) -> DualEncoderAdapter:
    """The adapter of the first registered family that supports ``model``.

    Parameters
    ----------
    model : nn.Module or DualEncoderAdapter
        a dual encoder; an adapter passes through unchanged.

    Returns
    -------
    DualEncoderAdapter
        ``cls(model)`` of the first registered class whose ``supports(model)`` is true.

    Raises
    ------
    ValueError
        if no registered adapter supports the model's class.
    """
    if isinstance(model, DualEncoderAdapter):
        return model
    for cls in _ADAPTERS:
        if cls.supports(model):
            return cls(model)
    kind = type(model)
    supported = ", ".join(family for cls in _ADAPTERS for family in cls.families)
    raise ValueError(
        f"No laplace_vlm adapter supports a {kind.__module__}.{kind.__qualname__}. "
        f"Supported families: {supported}. To add one, subclass DualEncoderAdapter and "
        "decorate it with @register_adapter."
    )


@fill_doc
def is_instance_by_name(model: Any, module_prefix: str, names: set[str]) -> bool:
    """``isinstance`` by class name, so that checking costs no import of the library.

    Parameters
    ----------
    %(candidate_model)s
    module_prefix : str
        the library's module prefix, e.g. ``"open_clip."``.
    names : set of str
        accepted class names.

    Returns
    -------
    bool
        whether a class in ``type(model).__mro__`` is named in ``names`` and defined in a
        module starting with ``module_prefix``.
    """
    return any(
        c.__module__.startswith(module_prefix) and c.__name__ in names for c in type(model).__mro__
    )
