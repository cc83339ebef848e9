"""open_clip dual encoders: ``CLIP``, ``CustomTextCLIP`` and ``CoCa`` with every image tower.

Where each family keeps its last linear layer:

- ``VisionTransformer`` (ViT, CLIPA, CoCa): ``visual.proj``, a bare `(d, D)` Parameter applied as
  ``pooled @ proj`` behind ``if self.proj is not None``: swapped for ``None`` for one call.
- ``ModifiedResNet`` (RN50...): ``visual.attnpool.c_proj``, an ``nn.Linear`` whose weight is
  passed to ``F.multi_head_attention_forward`` (never called): swapped for an identity Linear.
- ``TimmModel``: ``visual.head.proj`` / ``visual.head.mlp.fc2`` (open_clip's own head), else the
  timm classifier (``visual.trunk.head``, ``visual.trunk.head.fc``, ...), else SigLIP's MAP head
  ``visual.trunk.attn_pool.mlp.fc2`` plus the residual that enters ``attn_pool.norm``.
- text: ``text_projection`` (flattened onto ``CLIP``, else ``text.text_projection``) as a
  Parameter (swap) or ``nn.Linear`` with bias (hook); ``HFTextEncoder``: ``text.proj`` or the
  last Linear of its MLP.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from laplace_vlm.adapters.base import (
    DualEncoderAdapter,
    LinearHead,
    Tower,
)
from laplace_vlm.adapters.capture import SwapCapture
from laplace_vlm.adapters.registry import is_instance_by_name, register_adapter

_MODELS = {"CLIP", "CustomTextCLIP", "CoCa"}

_IMAGE_TOWERS = (
    "VisionTransformer (visual.proj), ModifiedResNet (visual.attnpool.c_proj), TimmModel "
    "(visual.head.proj, visual.head.mlp.fc2, the timm classifier, or a SigLIP MAP head)"
)
_TEXT_TOWERS = (
    "TextTransformer with a Parameter or nn.Linear text_projection, HFTextEncoder with a "
    "'linear' or 'mlp' proj"
)


@register_adapter
class OpenCLIPAdapter(DualEncoderAdapter):
    """Adapter for open_clip ``CLIP``, ``CustomTextCLIP`` and ``CoCa`` models.

    Parameters
    ----------
    model : open_clip.CLIP or open_clip.CustomTextCLIP or open_clip.CoCa
        the model; where its heads are found is listed in the module docstring.

    Raises
    ------
    ValueError
        if a tower has no linear last layer (e.g. text ``proj_type='none'``).
    """

    families = tuple(f"open_clip.{name}" for name in sorted(_MODELS))

    def __init__(self, model: nn.Module) -> None:
        family = f"open_clip.{type(model).__name__}/{type(model.visual).__name__}"
        super().__init__(
            model,
            family=family,
            image=_image_tower(model, family),
            text=_text_tower(model, family),
            logit_scale=model.logit_scale,
            logit_bias=getattr(model, "logit_bias", None),
        )

    @classmethod
    def supports(cls, model: Any) -> bool:
        # an open_clip CLIP, CustomTextCLIP or CoCa, by class name (no import of open_clip)
        return is_instance_by_name(model, "open_clip.", _MODELS)


def _encoder(method: Any) -> Any:
    """``encode_*`` with ``normalize=False`` spelled out (CoCa defaults to True)."""
    return lambda inputs: method(inputs, normalize=False)


def _bypass_tower(name: str, path: str, owner: nn.Module, attr: str, encode: Any) -> Tower:
    """A bare `(d, D)` Parameter used as ``x @ proj`` behind an ``is not None`` guard."""
    proj = getattr(owner, attr)
    capture = SwapCapture(owner, attr, lambda _: None, lambda pre: pre @ getattr(owner, attr))
    head = LinearHead.copy_of(path, proj, transpose=True)
    return Tower(name, head, capture, encode, proj)


def _image_tower(model: nn.Module, family: str) -> Tower:
    visual, encode = model.visual, _encoder(model.encode_image)
    if isinstance(getattr(visual, "proj", None), nn.Parameter):
        return _bypass_tower("image", "visual.proj", visual, "proj", encode)
    c_proj = getattr(getattr(visual, "attnpool", None), "c_proj", None)
    if isinstance(c_proj, nn.Linear):
        return _resnet_tower(visual.attnpool, encode)
    if hasattr(visual, "trunk"):
        return _timm_tower(visual, encode, family)
    raise ValueError(
        f"{family}: the image tower {type(visual).__name__} has no linear last layer that "
        f"laplace_vlm can find (a projection-free tower?). Supported: {_IMAGE_TOWERS}."
    )


def _resnet_tower(attnpool: nn.Module, encode: Any) -> Tower:
    """``c_proj`` is MHA's out-projection: an identity stand-in yields its input."""
    c_proj = attnpool.c_proj

    def identity(original: nn.Linear) -> nn.Linear:
        d = original.in_features
        stand_in = nn.Linear(d, d, device=original.weight.device, dtype=original.weight.dtype)
        with torch.no_grad():
            stand_in.weight.copy_(torch.eye(d))
            stand_in.bias.zero_()
        return stand_in

    def project(pre: torch.Tensor) -> torch.Tensor:
        return F.linear(pre, attnpool.c_proj.weight, attnpool.c_proj.bias)

    path = "visual.attnpool.c_proj"
    head = LinearHead.copy_of(path, c_proj.weight, c_proj.bias)
    return Tower(
        "image", head, SwapCapture(attnpool, "c_proj", identity, project), encode, c_proj.weight
    )


def _timm_tower(visual: nn.Module, encode: Any, family: str) -> Tower:
    head, trunk = visual.head, visual.trunk
    if isinstance(getattr(head, "proj", None), nn.Linear):
        return Tower.hooked("image", "visual.head.proj", head.proj, encode)
    if isinstance(getattr(getattr(head, "mlp", None), "fc2", None), nn.Linear):
        return Tower.hooked("image", "visual.head.mlp.fc2", head.mlp.fc2, encode)
    if len(head) == 0:
        classifier = trunk.get_classifier()
        if isinstance(classifier, nn.Linear):
            path = next(n for n, m in trunk.named_modules() if m is classifier)
            return Tower.hooked("image", f"visual.trunk.{path}", classifier, encode)
        if _is_map_head(trunk):
            pool = trunk.attn_pool
            return Tower.hooked(
                "image",
                "visual.trunk.attn_pool.mlp.fc2",
                pool.mlp.fc2,
                encode,
                residual_input=pool.norm,
                pool=pool.pool,
            )
    raise ValueError(
        f"{family}: cannot find the last linear layer of the timm tower "
        f"{type(trunk).__name__} (open_clip head: {list(dict(head.named_children()))}). "
        f"Supported: {_IMAGE_TOWERS}."
    )


def _is_map_head(trunk: nn.Module) -> bool:
    """SigLIP: the trunk ends in timm's ``AttentionPoolLatent``, nothing after it."""
    pool = getattr(trunk, "attn_pool", None)
    fc2 = getattr(getattr(pool, "mlp", None), "fc2", None)
    after = [getattr(trunk, "fc_norm", nn.Identity()), getattr(trunk, "head", nn.Identity())]
    return (
        isinstance(fc2, nn.Linear)
        and isinstance(getattr(pool, "norm", None), nn.Module)
        and all(isinstance(m, nn.Identity) for m in after)
    )


def _text_tower(model: nn.Module, family: str) -> Tower:
    # CLIP flattens its text tower onto the model; the others keep it at ``model.text``.
    owner, prefix = (model.text, "text.") if hasattr(model, "text") else (model, "")
    encode = _encoder(model.encode_text)
    proj = getattr(owner, "text_projection", None)
    if isinstance(proj, nn.Parameter):
        return _bypass_tower("text", f"{prefix}text_projection", owner, "text_projection", encode)
    if isinstance(proj, nn.Linear):
        return Tower.hooked("text", f"{prefix}text_projection", proj, encode)
    hf_proj = getattr(owner, "proj", None)
    if isinstance(hf_proj, nn.Linear):
        return Tower.hooked("text", f"{prefix}proj", hf_proj, encode)
    if isinstance(hf_proj, nn.Sequential) and isinstance(hf_proj[-1], nn.Linear):
        return Tower.hooked("text", f"{prefix}proj.{len(hf_proj) - 1}", hf_proj[-1], encode)
    raise ValueError(
        f"{family}: the text tower {type(owner).__name__} has no linear last layer "
        "(no text_projection or proj, e.g. proj_type='none'), so there is no text head for a "
        f"Laplace approximation. Supported: {_TEXT_TOWERS}."
    )
