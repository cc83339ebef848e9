"""Turning what users pass (activations, images, tokens) into the heads' inputs.

Float tensors of shape `(N, d)` are always pre-projection activations. Anything else
(images `(N, 3, H, W)`, integer tokens) is encoded by the model's adapter, which also
returns the per-input residual of towers like SigLIP's image tower.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from laplace_vlm.heads import DualHead
from laplace_vlm.validation import check_matrix

HeadInputs = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]
PREDICT_KEYS = {"image", "text", "image_residual", "text_residual"}


class InputEncoder:
    """Validated ``(a_img, r_img, a_txt, r_txt)`` for the heads, on their device and dtype.

    Parameters
    ----------
    heads : DualHead
        the heads the inputs are for.
    adapter : DualEncoderAdapter, optional
        model mode: encodes raw images and tokens. ``None`` in feature mode, where only
        activations are accepted.
    """

    def __init__(self, heads: DualHead, adapter: Any | None = None) -> None:
        self.heads, self.adapter = heads, adapter

    def pair(self, batch: Any) -> HeadInputs:
        """Inputs of one fit batch of matched pairs (tuple or dict).

        Parameters
        ----------
        batch : tuple or dict
            ``(image, text)``, or a dict with ``"image"`` and ``"text"`` and optionally
            ``"image_residual"`` and ``"text_residual"``; both sides with ``M`` rows.

        Returns
        -------
        a_img, r_img, a_txt, r_txt : torch.Tensor or None
            the ``M`` pairs' image design inputs `(M, d_img [+ 1])` and residual `(M, D)`
            (or None), then their text ones, `(M, d_txt [+ 1])` and `(M, D)` (see
            :meth:`features`).

        Raises
        ------
        ValueError
            for another batch layout, or images and texts of different counts.
        """
        if isinstance(batch, Mapping):
            if "image" not in batch or "text" not in batch:
                raise ValueError(f"a fit batch needs keys 'image' and 'text', got {list(batch)}.")
            image, text = batch["image"], batch["text"]
            r_i, r_t = batch.get("image_residual"), batch.get("text_residual")
        elif isinstance(batch, (tuple, list)) and len(batch) == 2:
            (image, text), r_i, r_t = batch, None, None
        else:
            raise ValueError("a fit batch must be (image, text) or a dict with 'image' and 'text'.")
        a_i, r_i = self.features("image", image, r_i)
        a_t, r_t = self.features("text", text, r_t)
        if len(a_i) != len(a_t):
            raise ValueError(
                f"a fit batch must hold matched pairs: {len(a_i)} images vs {len(a_t)} texts."
            )
        return a_i, r_i, a_t, r_t

    def predict(self, x: Any) -> HeadInputs:
        """Inputs of a prediction: a dict, or images scored against the stored classes.

        Parameters
        ----------
        x : dict or tuple or object
            a dict with ``"image"`` and optionally ``"text"``, ``"image_residual"``,
            ``"text_residual"`` (without ``"text"``: the classes of ``set_classes``); a fit
            batch ``(image, text)`` (the texts are the classes); anything else is the images,
            scored against those classes.

        Returns
        -------
        a_img, r_img, a_txt, r_txt : torch.Tensor or None
            design inputs `(N, d_img [+ 1])` and residual `(N, D)` (or None) of the ``N``
            images; of the ``C`` classes they are scored against, `(C, d_txt [+ 1])` and
            `(C, D)` (see :meth:`features`).

        Raises
        ------
        ValueError
            for a dict without ``"image"`` or with other keys, or when the classes are
            needed and none are set.
        """
        if isinstance(x, (tuple, list)):  # a fit batch (image, text), as laplace takes (X, y)
            if len(x) != 2:
                raise ValueError(
                    "x as a sequence must be a fit batch (image, text), got "
                    f"{len(x)} elements: pass a dict {{'image': ..., 'text': ...}}."
                )
            x = {"image": x[0], "text": x[1]}
        if not isinstance(x, Mapping):
            return (*self.features("image", x, None), *self.classes())
        unknown = set(x) - PREDICT_KEYS
        if unknown or "image" not in x:
            raise ValueError(
                "x must have keys 'image' and 'text' (optionally 'image_residual', "
                f"'text_residual'), got {sorted(x)}."
            )
        a_i, r_i = self.features("image", x["image"], x.get("image_residual"))
        if "text" not in x:
            return a_i, r_i, *self.classes()
        return a_i, r_i, *self.features("text", x["text"], x.get("text_residual"))

    def classes(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The class texts stored on the heads with ``set_classes``.

        Returns
        -------
        activations : torch.Tensor
            `(C, d_txt [+ 1])` class text design inputs.
        residual : torch.Tensor or None
            `(C, D)` their residual offsets.

        Raises
        ------
        ValueError
            if no classes are set.
        """
        if self.heads.class_activations is None:
            raise ValueError(
                "no classes: pass x={'image': ..., 'text': ...} or call set_classes()."
            )
        return self.heads.class_activations, self.heads.class_residual

    def features(self, modality: str, value: Any, residual: torch.Tensor | None):
        """The head's design inputs `(N, d [+ 1])` (and residual `(N, D)`) of one modality.

        ``value`` is activations `(N, d)` or, in model mode, raw images / tokens; a head with
        a folded bias gets a trailing 1 (:meth:`DualHead.design`).

        Parameters
        ----------
        modality : {'image', 'text'}
            which head.
        value : torch.Tensor or object
            `(N, d)` float activations, or (model mode) raw images / tokens that the adapter
            encodes, through the tower's graph where autograd is enabled.
        residual : torch.Tensor, optional
            `(N, D)` offset of the embeddings; for raw inputs the adapter's residual is used
            instead.

        Returns
        -------
        design : torch.Tensor
            `(N, d [+ 1])` on the head's device and in its dtype.
        residual : torch.Tensor or None
            `(N, D)`, likewise.

        Raises
        ------
        TypeError, ValueError
            if the activations (or residual) are not finite float matrices of the right shape.
        """
        weight = getattr(self.heads, f"{modality}_projection").weight
        d = self.heads.in_features(modality)
        if not _is_activation(value) and self.adapter is not None:
            encode = getattr(self.adapter, f"encode_{modality}")
            value = value.to(weight.device) if isinstance(value, torch.Tensor) else value
            # the graph through the tower only where the caller records one (enable_backprop)
            feats = encode(value, grad=torch.is_grad_enabled())
            value, residual = feats.activations, feats.residual
        name = f"x[{modality!r}]"
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.ndim != 2:
            raise ValueError(
                f"{name} must be pre-projection activations of shape (N, {d})"
                + ("" if self.adapter else " (feature mode: no model to encode raw inputs)")
                + f", got shape {tuple(value.shape)}."
            )
        value = check_matrix(name, value, d).to(weight.device, weight.dtype)
        if residual is not None:
            residual = check_matrix(f"{name} residual", residual, weight.shape[0])
            if len(residual) != len(value):
                raise ValueError(f"{name} residual must have {len(value)} rows.")
            residual = residual.to(weight.device, weight.dtype)
        return self.heads.design(modality, value), residual


def _is_activation(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.is_floating_point() and value.ndim == 2
