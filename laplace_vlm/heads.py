"""The two projection heads as one small module: the parameters the posterior is over."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from laplace_vlm.validation import check_finite

POSTERIOR_DTYPES = (torch.float32, torch.float64)


def as_linear(projection: Any, name: str, dtype: torch.dtype) -> nn.Linear:
    """Copy a projection into a fresh ``nn.Linear`` in ``dtype``.

    ``projection`` is a weight `(D, d)` or anything with ``.weight`` `(D, d)` and ``.bias``
    (``nn.Linear``, an adapter's ``LinearHead``). The copy decouples the posterior from the
    user's model (laplace writes samples into its parameters) and fixes the layout.
    """
    if isinstance(projection, torch.Tensor):
        weight, bias = projection, None
    elif isinstance(getattr(projection, "weight", None), torch.Tensor):
        weight, bias = projection.weight, getattr(projection, "bias", None)
    else:
        raise TypeError(
            f"{name} must be an nn.Linear or a weight tensor of shape (D, d), "
            f"got {type(projection).__name__}."
        )
    if weight.ndim != 2:
        raise ValueError(f"{name} weight must have shape (D, d), got {tuple(weight.shape)}.")
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    linear = linear.to(device=weight.device, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(weight.detach())
        if bias is not None:
            linear.bias.copy_(bias.detach())
    return linear


def posterior_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 if any input is float64, else float32 (never half precision)."""
    dtypes = {t.dtype for t in tensors if isinstance(t, torch.Tensor)}
    return torch.float64 if torch.float64 in dtypes else torch.float32


class DualHead(nn.Module):
    """Image and text projection heads with the logit scale and bias of a dual encoder.

    Parameters, in the order laplace sees them: image weight, [image bias], text weight,
    [text bias]. ``logit_scale`` (log scale) and ``logit_bias`` are buffers: fixed at MAP.

    ``forward`` maps pre-projection activations to similarity logits: a dict
    ``{"image": (N, d_img), "text": (C, d_txt)}`` gives `(N, C)`; a tensor of image
    activations is scored against the classes set with :meth:`set_classes`.
    """

    def __init__(
        self,
        image_projection: nn.Linear,
        text_projection: nn.Linear,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.image_projection = image_projection
        self.text_projection = text_projection
        like = image_projection.weight
        self.register_buffer("logit_scale", torch.as_tensor(logit_scale).to(like).reshape(()))
        bias = None if logit_bias is None else torch.as_tensor(logit_bias).to(like).reshape(())
        self.register_buffer("logit_bias", bias)
        self.register_buffer("class_activations", None, persistent=False)
        self.register_buffer("class_residual", None, persistent=False)

    @property
    def scale(self) -> torch.Tensor:
        """The linear logit scale ``exp(logit_scale)``."""
        return self.logit_scale.exp()

    def embed_image(self, activations: torch.Tensor, residual: torch.Tensor | None = None):
        """Un-normalised image embeddings `(N, D)`."""
        z = self.image_projection(activations)
        return z if residual is None else z + residual

    def embed_text(self, activations: torch.Tensor, residual: torch.Tensor | None = None):
        """Un-normalised text embeddings `(C, D)`."""
        t = self.text_projection(activations)
        return t if residual is None else t + residual

    def set_classes(self, activations: torch.Tensor, residual: torch.Tensor | None = None):
        """Store class text activations `(C, d_txt)` so a bare image tensor can be scored."""
        self.class_activations = activations
        self.class_residual = residual

    def logits(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Similarity logits `(N, C)` of un-normalised embeddings."""
        logits = self.scale * F.normalize(z, dim=-1) @ F.normalize(t, dim=-1).T
        return logits if self.logit_bias is None else logits + self.logit_bias

    def forward(self, x: torch.Tensor | dict[str, torch.Tensor]) -> torch.Tensor:
        if isinstance(x, torch.Tensor):
            if self.class_activations is None:
                raise ValueError("Scoring a bare image tensor needs classes: call set_classes().")
            x = {"image": x, "text": self.class_activations, "text_residual": self.class_residual}
        z = self.embed_image(x["image"], x.get("image_residual"))
        t = self.embed_text(x["text"], x.get("text_residual"))
        return self.logits(z, t)


def build_heads(
    image_projection: Any,
    text_projection: Any,
    logit_scale: float | torch.Tensor | None,
    logit_bias: float | torch.Tensor | None = None,
) -> DualHead:
    """Validated ``DualHead`` in fp32 (fp64 if a weight is fp64), whatever the model's dtype."""
    missing = [
        name
        for name, value in (
            ("image_projection", image_projection),
            ("text_projection", text_projection),
            ("logit_scale", logit_scale),
        )
        if value is None
    ]
    if missing:
        raise ValueError(f"without a model, DualEncoderLaplace needs {', '.join(missing)}.")
    weights = [getattr(p, "weight", p) for p in (image_projection, text_projection)]
    dtype = posterior_dtype(*weights)
    image = as_linear(image_projection, "image_projection", dtype)
    text = as_linear(text_projection, "text_projection", dtype)
    if image.out_features != text.out_features:
        raise ValueError(
            "image_projection and text_projection must map to the same embedding dim, got "
            f"{image.out_features} and {text.out_features}."
        )
    scale = check_finite("logit_scale", torch.as_tensor(logit_scale, dtype=dtype))
    if scale.numel() != 1:
        raise ValueError(f"logit_scale must be a scalar, got shape {tuple(scale.shape)}.")
    if logit_bias is not None:
        check_finite("logit_bias", torch.as_tensor(logit_bias, dtype=dtype))
    return DualHead(image, text, scale, logit_bias)
