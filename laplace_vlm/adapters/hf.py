"""Hugging Face ``transformers`` dual encoders: ``CLIPModel``, ``SiglipModel``, ``Siglip2Model``.

``transformers`` is an optional extra: nothing here imports it; models are recognised by class
name. All heads are ``nn.Linear`` modules the towers call, so pre-hooks capture them:

- CLIP: ``visual_projection`` and ``text_projection`` (no bias).
- SigLIP: no image projection; the last linear map is the MAP head's ``vision_model.head.mlp.fc2``
  (bias) plus the residual that enters ``vision_model.head.layernorm``; text ``text_model.head``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from laplace_vlm.adapters.base import DualEncoderAdapter, Tower
from laplace_vlm.adapters.registry import is_instance_by_name, register_adapter


def _pooled(output: Any) -> torch.Tensor:
    """transformers 5.x returns a ``BaseModelOutputWithPooling``, 4.x the tensor itself."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _image_encoder(model: nn.Module) -> Any:
    def encode(images: Any) -> torch.Tensor:
        if isinstance(images, Mapping):  # a processor's output (Siglip2 needs its masks)
            return _pooled(model.get_image_features(**images))
        return _pooled(model.get_image_features(pixel_values=images))

    return encode


def _text_encoder(model: nn.Module) -> Any:
    def encode(tokens: Any) -> torch.Tensor:
        if isinstance(tokens, Mapping):
            return _pooled(model.get_text_features(**tokens))
        return _pooled(model.get_text_features(input_ids=tokens))

    return encode


@register_adapter
class HFCLIPAdapter(DualEncoderAdapter):
    """Adapter for ``transformers.CLIPModel``.

    Parameters
    ----------
    model : transformers.CLIPModel
        the model; its ``visual_projection`` and ``text_projection`` are the heads.
    """

    families = ("transformers.CLIPModel",)

    def __init__(self, model: nn.Module) -> None:
        super().__init__(
            model,
            family="transformers.CLIPModel",
            image=Tower.hooked(
                "image", "visual_projection", model.visual_projection, _image_encoder(model)
            ),
            text=Tower.hooked(
                "text", "text_projection", model.text_projection, _text_encoder(model)
            ),
            logit_scale=model.logit_scale,
        )

    @classmethod
    def supports(cls, model: Any) -> bool:
        # a transformers CLIPModel, by class name (no import of transformers)
        return is_instance_by_name(model, "transformers.", {"CLIPModel"})


@register_adapter
class HFSiglipAdapter(DualEncoderAdapter):
    """Adapter for ``transformers.SiglipModel`` and ``Siglip2Model``.

    Parameters
    ----------
    model : transformers.SiglipModel or transformers.Siglip2Model
        the model; the heads are ``vision_model.head.mlp.fc2`` (with the residual that enters
        ``vision_model.head.layernorm``) and ``text_model.head``.

    Raises
    ------
    ValueError
        if the vision tower has no attention-pooling head (``vision_use_head=False``).
    """

    families = ("transformers.SiglipModel", "transformers.Siglip2Model")

    def __init__(self, model: nn.Module) -> None:
        family = f"transformers.{type(model).__name__}"
        map_head = getattr(model.vision_model, "head", None)
        if map_head is None:
            raise ValueError(
                f"{family}: the vision tower has no attention-pooling head "
                "(vision_use_head=False), so it has no linear last layer. Supported: SigLIP "
                "vision towers with their MAP head (vision_model.head.mlp.fc2 + residual)."
            )
        image = Tower.hooked(
            "image",
            "vision_model.head.mlp.fc2",
            map_head.mlp.fc2,
            _image_encoder(model),
            residual_input=map_head.layernorm,
        )
        text_head = model.text_model.head
        super().__init__(
            model,
            family=family,
            image=image,
            text=Tower.hooked("text", "text_model.head", text_head, _text_encoder(model)),
            logit_scale=model.logit_scale,
            logit_bias=model.logit_bias,
        )

    @classmethod
    def supports(cls, model: Any) -> bool:
        # a transformers SiglipModel or Siglip2Model, by class name (no import of transformers)
        return is_instance_by_name(model, "transformers.", {"SiglipModel", "Siglip2Model"})
