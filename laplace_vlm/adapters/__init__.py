"""Adapters: the two projection heads of a dual encoder and their pre-projection features.

``get_adapter(model)`` picks the first registered family that supports ``model``; importing
this package registers the open_clip and Hugging Face families (neither library is imported
until a model of it is seen).
"""

from __future__ import annotations

from laplace_vlm.adapters import hf, open_clip  # noqa: F401  (register the built-in families)
from laplace_vlm.adapters.base import DualEncoderAdapter, Features, LinearHead
from laplace_vlm.adapters.registry import get_adapter, register_adapter

__all__ = ["DualEncoderAdapter", "Features", "LinearHead", "get_adapter", "register_adapter"]
