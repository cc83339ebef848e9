"""The two projection heads as one small module: the parameters the posterior is over."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from laplace_vlm.validation import as_real_tensor, check_finite

POSTERIOR_DTYPES = (torch.float32, torch.float64)


def as_linear(projection: Any, name: str, dtype: torch.dtype) -> nn.Linear:
    """Copy a projection into a fresh ``nn.Linear`` in ``dtype``.

    The copy decouples the posterior from the user's model (laplace writes samples into its
    parameters) and fixes the layout.

    Parameters
    ----------
    projection : torch.Tensor or nn.Linear or LinearHead
        a weight `(D, d)`, or an object with ``.weight`` `(D, d)` and optionally ``.bias``
        `(D,)`.
    name : str
        the argument's name, for the error messages.
    dtype : torch.dtype
        the dtype of the copy.

    Returns
    -------
    nn.Linear
        a fresh layer on the device of the weight.

    Raises
    ------
    TypeError
        if ``projection`` is neither a tensor nor has a tensor ``.weight``.
    ValueError
        if the weight is not 2-D.
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
    return linear_copy(weight, bias, dtype)


def linear_copy(
    weight: torch.Tensor, bias: torch.Tensor | None = None, dtype: torch.dtype | None = None
) -> nn.Linear:
    """A fresh ``nn.Linear`` holding detached copies of ``weight`` `(D, d)` and ``bias`` `(D,)`.

    The one way a head is copied: for the posterior, for fine-tuning, and for the curvature
    backends, whose hooks must never touch the user's modules.

    Parameters
    ----------
    weight : torch.Tensor
        `(D, d)` weight.
    bias : torch.Tensor, optional
        `(D,)` bias; without it the layer has none.
    dtype : torch.dtype, optional
        the dtype of the copy; default the dtype of ``weight``.

    Returns
    -------
    nn.Linear
        with ``d`` inputs and ``D`` outputs, on the device of ``weight``.
    """
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    linear = linear.to(device=weight.device, dtype=dtype or weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight.detach())
        if bias is not None:
            linear.bias.copy_(bias.detach())
    return linear


def fold_bias(linear: nn.Linear) -> nn.Linear:
    """``[W | b]`` as one bias-free ``nn.Linear`` on activations with a trailing 1.

    The weight and bias then share one Kronecker factor ``B x A`` with ``A`` over ``[a, 1]``,
    as the reference implementation does, so their cross-covariance is kept; laplace sees one
    parameter whose row-major layout is that of the factor.

    Parameters
    ----------
    linear : nn.Linear
        a layer with a bias, weight `(D, d)`.

    Returns
    -------
    nn.Linear
        a fresh bias-free layer with weight ``[W | b]`` `(D, d + 1)`.
    """
    return linear_copy(torch.cat([linear.weight, linear.bias[:, None]], dim=1))


def unfold_bias(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a folded weight (the inverse of :func:`fold_bias`).

    Parameters
    ----------
    weight : torch.Tensor
        `(D, d + 1)` folded weight ``[W | b]``.

    Returns
    -------
    weight, bias : torch.Tensor
        `(D, d)` and `(D,)` views of ``weight``.
    """
    return weight[:, :-1], weight[:, -1]


def similarity_logits(
    u: torch.Tensor, v: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Logits ``scale * u @ v.T (+ bias)`` of normalised embeddings: the one cosine logit.

    Parameters
    ----------
    u : torch.Tensor
        `(M, D)` normalised rows (the inputs), or a batch `(..., M, D)`.
    v : torch.Tensor
        `(K, D)` normalised rows (the classes), or a batch `(..., K, D)`.
    scale : torch.Tensor
        the *linear* logit scale, i.e. ``exp(logit_scale)``.
    bias : torch.Tensor, optional
        SigLIP's scalar logit bias.

    Returns
    -------
    logits : torch.Tensor
        `(M, K)`, or `(..., M, K)` for batches.
    """
    logits = scale * (u @ v.mT)
    return logits if bias is None else logits + bias


def posterior_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 if any input is float64, else float32 (never half precision).

    Parameters
    ----------
    *tensors : torch.Tensor or None
        the tensors to look at; anything that is not a tensor is ignored.

    Returns
    -------
    torch.dtype
        ``torch.float64`` or ``torch.float32``.
    """
    dtypes = {t.dtype for t in tensors if isinstance(t, torch.Tensor)}
    return torch.float64 if torch.float64 in dtypes else torch.float32


class DualHead(nn.Module):
    """Image and text projection heads with the logit scale and bias of a dual encoder.

    Its parameters, in the order laplace sees them: image weight, [image bias], text weight,
    [text bias]. ``logit_scale`` (log scale) and ``logit_bias`` are buffers: fixed at MAP.
    A head whose bias is folded into its weight (:func:`fold_bias`, ``joint[modality]``)
    takes *design* inputs ``[a, 1]`` (:meth:`design`); the others take activations as they are.

    Parameters
    ----------
    image_projection, text_projection : nn.Linear
        the image and text heads, weights `(D, d_img [+ 1])` and `(D, d_txt [+ 1])`; kept as
        given (not copied).
    logit_scale : float or torch.Tensor
        the *log* logit scale, one value; a scalar buffer in the image weight's dtype and
        device.
    logit_bias : float or torch.Tensor, optional
        SigLIP's logit bias, one value, kept likewise.
    joint : tuple of bool, default=(False, False)
        whether the image / text head's bias is folded into its weight (:func:`fold_bias`).
    """

    def __init__(
        self,
        image_projection: nn.Linear,
        text_projection: nn.Linear,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
        joint: tuple[bool, bool] = (False, False),
    ) -> None:
        super().__init__()
        self.image_projection = image_projection
        self.text_projection = text_projection
        self.joint = {"image": bool(joint[0]), "text": bool(joint[1])}
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

    def design(self, modality: str, activations: torch.Tensor) -> torch.Tensor:
        """The head's inputs: ``activations``, with a trailing 1 if its bias is folded.

        Parameters
        ----------
        modality : {'image', 'text'}
            which head.
        activations : torch.Tensor
            `(N, d)` pre-projection activations.

        Returns
        -------
        torch.Tensor
            `(N, d + 1)` ``[activations, 1]`` for a folded head, else ``activations`` itself.
        """
        if not self.joint[modality]:
            return activations
        return torch.cat([activations, activations.new_ones(len(activations), 1)], dim=1)

    def in_features(self, modality: str) -> int:
        """``d``: the pre-projection activation dim of a modality (without the folded 1).

        Parameters
        ----------
        modality : {'image', 'text'}
            which head.

        Returns
        -------
        int
            the width of the activations; the design inputs have ``d + 1`` if folded.
        """
        linear = getattr(self, f"{modality}_projection")
        return linear.in_features - self.joint[modality]

    def embed_image(self, activations: torch.Tensor, residual: torch.Tensor | None = None):
        """Un-normalised image embeddings ``z = W_img a (+ b_img) (+ r)`` of design inputs.

        Parameters
        ----------
        activations : torch.Tensor
            `(N, d_img [+ 1])` image design inputs (:meth:`design`).
        residual : torch.Tensor, optional
            `(N, D)` per-image offset after the projection (SigLIP's image tower).

        Returns
        -------
        torch.Tensor
            `(N, D)` the rows of the logits (:meth:`logits`), before normalisation.
        """
        return self._embed(self.image_projection, activations, residual)

    def embed_text(self, activations: torch.Tensor, residual: torch.Tensor | None = None):
        """Un-normalised text embeddings ``t = W_txt a (+ b_txt) (+ r)``: the logits' classes.

        Parameters
        ----------
        activations : torch.Tensor
            `(C, d_txt [+ 1])` text design inputs, one row per class (:meth:`design`).
        residual : torch.Tensor, optional
            `(C, D)` per-text offset, if a text tower has one.

        Returns
        -------
        torch.Tensor
            `(C, D)` the columns of the logits, before normalisation.
        """
        return self._embed(self.text_projection, activations, residual)

    @staticmethod
    def _embed(head: nn.Linear, activations: torch.Tensor, residual: torch.Tensor | None):
        embeddings = head(activations)
        return embeddings if residual is None else embeddings + residual

    def set_classes(self, activations: torch.Tensor, residual: torch.Tensor | None = None):
        """Store the class texts so that bare image inputs can be scored.

        Parameters
        ----------
        activations : torch.Tensor
            `(C, d_txt [+ 1])` class text design inputs (:meth:`design`).
        residual : torch.Tensor, optional
            `(C, D)` offsets of the class text embeddings.
        """
        self.class_activations = activations
        self.class_residual = residual

    def logits(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Similarity logits of un-normalised embeddings (:func:`similarity_logits`).

        Parameters
        ----------
        z : torch.Tensor
            `(N, D)` image embeddings, or a batch `(..., N, D)` (e.g. weight samples).
        t : torch.Tensor
            `(C, D)` text embeddings, or a batch `(..., C, D)`.

        Returns
        -------
        torch.Tensor
            `(N, C)` ``exp(logit_scale) cos(z_n, t_c) (+ logit_bias)``, or `(..., N, C)`.
        """
        return similarity_logits(F.normalize(z, dim=-1), F.normalize(t, dim=-1), self.scale,
                                 self.logit_bias)  # fmt: skip

    def forward(self, x: torch.Tensor | dict[str, torch.Tensor]) -> torch.Tensor:
        """Similarity logits `(N, C)` of design inputs.

        Parameters
        ----------
        x : dict or torch.Tensor
            ``{"image": (N, d_img [+ 1]), "text": (C, d_txt [+ 1])}``, optionally with
            ``"image_residual"`` `(N, D)` and ``"text_residual"`` `(C, D)`; or image design
            inputs `(N, d_img [+ 1])`, scored against the classes of :meth:`set_classes`.

        Returns
        -------
        torch.Tensor
            `(N, C)` :meth:`logits` of the images' embeddings against the texts'.
        """
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
    joint_bias: bool = True,
) -> DualHead:
    """Validated ``DualHead`` in fp32 (fp64 if a weight is fp64), whatever the model's dtype.

    Parameters
    ----------
    image_projection, text_projection : torch.Tensor or nn.Linear or LinearHead
        the image and text heads (see :func:`as_linear`); copied, and their outputs must have
        the same dim ``D``.
    logit_scale : float or torch.Tensor
        the *log* logit scale: one finite value (``None`` raises).
    logit_bias : float or torch.Tensor, optional
        SigLIP's logit bias, finite.
    joint_bias : bool, default=True
        fold the bias of each head that has one into its weight (:func:`fold_bias`).

    Returns
    -------
    DualHead
        fresh copies of the heads (the model's stay untouched), biases folded where
        ``joint_bias``.

    Raises
    ------
    ValueError
        if a head or ``logit_scale`` is missing, the embedding dims differ, ``logit_scale`` is
        not a scalar, or ``logit_scale`` / ``logit_bias`` is not finite.
    """
    given = {"image_projection": image_projection, "text_projection": text_projection,
             "logit_scale": logit_scale}  # fmt: skip
    missing = [name for name, value in given.items() if value is None]
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
    scale = check_finite("logit_scale", as_real_tensor("logit_scale", logit_scale, dtype))
    if scale.numel() != 1:
        raise ValueError(f"logit_scale must be a scalar, got shape {tuple(scale.shape)}.")
    if logit_bias is not None:
        check_finite("logit_bias", as_real_tensor("logit_bias", logit_bias, dtype))
    joint = (joint_bias and image.bias is not None, joint_bias and text.bias is not None)
    image, text = (fold_bias(h) if j else h for h, j in zip((image, text), joint))
    return DualHead(image, text, scale, logit_bias, joint)
