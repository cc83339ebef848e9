"""What an adapter hands to the Laplace code: features, the head copy, towers, the base class.

A dual encoder's tower ends in a linear map ``emb = W a + b (+ r)``. An adapter finds that
map (the *head*), copies it, and reads the head's input ``a`` (the *activations*) and the
tower's own embedding from one forward pass. Two capture strategies cover every family:
hooks or a swapped attribute (:mod:`laplace_vlm.adapters.capture`).

On the first batch per tower the adapter checks ``a @ W.T + b + r`` against an untouched forward
of the model, so a layout that drifted in a new library release fails loudly, not silently.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from laplace_vlm.adapters.capture import Captured, Encode, HookCapture
from laplace_vlm.docstrings import fill_doc

# Relative (Frobenius) tolerance of the first-batch check, by the model's dtype.
_CHECK_RTOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of features and head copies: float64 stays, the rest becomes float32.

    Parameters
    ----------
    dtype : torch.dtype
        the dtype of the model (or of one of its tensors).

    Returns
    -------
    torch.dtype
        ``torch.float64`` for float64, else ``torch.float32`` (never half precision).
    """
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass
class Features:
    """Pre-projection activations and embeddings of one tower.

    Attributes
    ----------
    activations : torch.Tensor
        `(N, d)` input of the tower's last linear layer.
    embeddings : torch.Tensor
        `(N, D)` the tower's own un-normalised embedding.
    residual : torch.Tensor, optional
        `(N, D)` offset ``r`` with ``embeddings = activations @ W.T + b + r`` (SigLIP image tower).
    """

    activations: torch.Tensor
    embeddings: torch.Tensor
    residual: torch.Tensor | None = None


@dataclass
class LinearHead:
    """A tower's last linear layer as a detached copy in ``nn.Linear`` layout.

    Attributes
    ----------
    path : str
        where the layer lives in the model, e.g. ``"visual.proj"``.
    weight, bias : torch.Tensor
        `(D, d)` and `(D,)` (or None), float32 (float64 for float64 models).
    """

    path: str
    weight: torch.Tensor
    bias: torch.Tensor | None = None

    @classmethod
    def copy_of(
        cls,
        path: str,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        *,
        transpose: bool = False,
    ) -> LinearHead:
        """A detached copy of a layer's tensors in float32 (float64 stays float64).

        Parameters
        ----------
        path : str
            where the layer lives in the model, e.g. ``"visual.proj"``.
        weight : torch.Tensor
            `(D, d)` weight in ``nn.Linear`` layout, or `(d, D)` with ``transpose=True``.
        bias : torch.Tensor, optional
            `(D,)` bias.
        transpose : bool, default=False
            ``True`` for open_clip's bare `(d, D)` ``proj`` Parameters (used as ``x @ proj``).

        Returns
        -------
        LinearHead
            contiguous copies that share no memory with the model.
        """
        dtype = compute_dtype(weight.dtype)
        weight = weight.detach().T if transpose else weight.detach()
        weight = weight.to(dtype, copy=True).contiguous()
        bias = None if bias is None else bias.detach().to(dtype, copy=True)
        return cls(path, weight, bias)

    def project(self, activations: torch.Tensor) -> torch.Tensor:
        """Apply the copied layer: ``activations @ W.T + b``.

        Parameters
        ----------
        activations : torch.Tensor
            `(N, d)` inputs; cast to the head's dtype (the head moves to their device).

        Returns
        -------
        torch.Tensor
            `(N, D)` in the head's dtype, on the device of ``activations``.
        """
        weight = self.weight.to(activations.device)
        bias = None if self.bias is None else self.bias.to(activations.device)
        return F.linear(activations.to(weight.dtype), weight, bias)


@dataclass
class Tower:
    """How an adapter encodes one tower.

    Attributes
    ----------
    name : {'image', 'text'}
        which tower.
    head : LinearHead
        the copied last linear layer.
    capture : HookCapture or SwapCapture
        turns a forward pass into ``(activations, embeddings, residual)``.
    encode : callable
        ``encode(inputs)``: the model's own `(N, D)` embedding (``normalize=False``, unwrapped).
    param : torch.Tensor
        the live head weight: the device and dtype the tower runs in.
    """

    name: str
    head: LinearHead
    capture: Callable[[Callable[[], torch.Tensor]], Captured]
    encode: Encode
    param: torch.Tensor

    @classmethod
    def hooked(
        cls, name: str, path: str, linear: nn.Linear, encode: Encode, **hook_kwargs: Any
    ) -> Tower:
        """The tower of an ``nn.Linear`` head that the tower calls as a module.

        Parameters
        ----------
        name : {'image', 'text'}
            which tower.
        path : str
            where ``linear`` lives in the model, e.g. ``"visual_projection"``.
        linear : nn.Linear
            the head, copied into :attr:`head`; its input is read with forward pre-hooks.
        encode : callable
            ``encode(inputs)``: the model's own `(N, D)` embedding.
        **hook_kwargs
            ``residual_input`` and ``pool`` of :class:`~laplace_vlm.adapters.capture.HookCapture`.

        Returns
        -------
        Tower
            a :class:`~laplace_vlm.adapters.capture.HookCapture` tower on ``linear.weight``.
        """
        head = LinearHead.copy_of(path, linear.weight, linear.bias)
        return cls(name, head, HookCapture(path, linear, **hook_kwargs), encode, linear.weight)


def cast_floating(inputs: Any, dtype: torch.dtype) -> Any:
    """Cast floating tensors (also the values of a mapping) to ``dtype``; tokens pass.

    Parameters
    ----------
    inputs : torch.Tensor or Mapping or object
        one tower's batch: pixels, token ids, or a processor's / tokenizer's mapping (cast
        recursively). Integer tensors and other objects are returned unchanged.
    dtype : torch.dtype
        the tower's dtype.

    Returns
    -------
    torch.Tensor or dict or object
        ``inputs`` with floating tensors cast; a mapping comes back as a dict.
    """
    if isinstance(inputs, torch.Tensor):
        return inputs.to(dtype) if inputs.is_floating_point() else inputs
    if isinstance(inputs, Mapping):
        return {key: cast_floating(value, dtype) for key, value in inputs.items()}
    return inputs


def unwrap(output: Any) -> torch.Tensor:
    """The embedding of a tower output: a tuple or list gives its first item.

    Parameters
    ----------
    output : torch.Tensor or tuple or list
        what ``encode_image`` / ``encode_text`` returned (a tuple for CoCa with ``output_tokens``).

    Returns
    -------
    torch.Tensor
        `(N, D)` embedding.
    """
    return output[0] if isinstance(output, (tuple, list)) else output


def _relative_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    if x.shape != ref.shape:
        return float("inf")
    x, ref = x.detach(), ref.detach().to(x.dtype)  # a float of a graph warns in torch 2.14
    return float(torch.linalg.norm(x - ref) / torch.linalg.norm(ref).clamp_min(1e-30))


class DualEncoderAdapter(abc.ABC):
    """Pre-projection features and projection heads of one dual-encoder family.

    Subclasses locate the two heads in ``__init__`` and pass them on as :class:`Tower` objects;
    the base class runs the capture, checks the first batch per tower and upcasts the outputs.

    Parameters
    ----------
    model : nn.Module
        the dual encoder.
    family : str
        the family name used in messages, e.g. ``"open_clip.CLIP/VisionTransformer"``.
    image, text : Tower
        how the image tower and the text tower are encoded.
    logit_scale : torch.Tensor
        the model's *log* logit scale, a scalar or `(1,)`; kept as a detached scalar copy.
    logit_bias : torch.Tensor, optional
        SigLIP's logit bias, kept likewise.

    Attributes
    ----------
    model : nn.Module
        the dual encoder.
    family : str
        e.g. ``"open_clip.CLIP/VisionTransformer"``.
    families : tuple of str
        class attribute: the model families the subclass supports (listed in errors).
    image_head, text_head : LinearHead
        the copied last linear layers of the two towers.
    logit_scale : torch.Tensor
        scalar, the *log* scale as the model stores it.
    logit_bias : torch.Tensor or None
        scalar (SigLIP) or ``None``.
    """

    families: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        model: nn.Module,
        *,
        family: str,
        image: Tower,
        text: Tower,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
    ) -> None:
        self.model, self.family = model, family
        self._towers = {"image": image, "text": text}
        self.image_head, self.text_head = image.head, text.head
        self.logit_scale = _scalar(logit_scale)
        self.logit_bias = None if logit_bias is None else _scalar(logit_bias)
        self._verified: set[str] = set()
        # None, or torch.bfloat16 / torch.float16: the towers run under torch.autocast (mixed
        # precision); the features come out in float32 all the same
        self.autocast: torch.dtype | None = None

    @classmethod
    @abc.abstractmethod
    @fill_doc
    def supports(cls, model: Any) -> bool:
        """Whether this adapter can handle ``model``.

        Parameters
        ----------
        %(candidate_model)s

        Returns
        -------
        bool
            whether ``cls(model)`` can be built; :func:`~laplace_vlm.adapters.get_adapter`
            takes the first registered class that says so.
        """

    @property
    def device(self) -> torch.device:
        """Device of the model's image head (where inputs should go)."""
        return self._towers["image"].param.device

    def encode_image(self, images: Any, grad: bool = False) -> Features:
        """Encode a batch of images.

        Parameters
        ----------
        images : torch.Tensor or Mapping
            `(N, C, H, W)` pixels (or the processor's mapping for Hugging Face models), on the
            model's device; floating tensors are cast to the tower's dtype.
        grad : bool, default=False
            build the autograd graph through the tower (test-time adaptation, prompt tuning).

        Returns
        -------
        Features
            `(N, d)` activations, `(N, D)` embeddings (and residual), float32 or float64.
        """
        return self._encode(self._towers["image"], images, grad)

    def encode_text(self, tokens: Any, grad: bool = False) -> Features:
        """Encode a batch of tokenised texts.

        Parameters
        ----------
        tokens : torch.Tensor or Mapping
            `(N, L)` token ids (open_clip), or a tokenizer's mapping / ``input_ids`` tensor
            (Hugging Face), on the model's device.
        grad : bool, default=False
            build the autograd graph through the tower.

        Returns
        -------
        Features
            `(N, d)` activations and `(N, D)` embeddings, float32 or float64.
        """
        return self._encode(self._towers["text"], tokens, grad)

    def _encode(self, tower: Tower, inputs: Any, grad: bool = False) -> Features:
        inputs = cast_floating(inputs, tower.param.dtype)
        autocast = (nullcontext() if self.autocast is None
                    else torch.autocast(tower.param.device.type, dtype=self.autocast))  # fmt: skip
        with torch.set_grad_enabled(grad), _eval_mode(self.model), autocast:
            pre, emb, res = tower.capture(lambda: unwrap(tower.encode(inputs)))
            if tower.name not in self._verified:
                self._verify(tower, pre, emb, res, unwrap(tower.encode(inputs)))
                self._verified.add(tower.name)
        dtype = compute_dtype(tower.param.dtype)
        res = None if res is None else res.to(dtype)
        return Features(pre.to(dtype), emb.to(dtype), res)

    def _verify(
        self,
        tower: Tower,
        pre: torch.Tensor,
        emb: torch.Tensor,
        res: torch.Tensor | None,
        reference: torch.Tensor,
    ) -> None:
        """Raise if the head copy or the capture does not reproduce the model's embedding."""
        rtol = _CHECK_RTOL.get(self.autocast or tower.param.dtype, 1e-4)
        recon = tower.head.project(pre)
        if res is not None:
            recon = recon + res.to(recon.dtype)
        checks = {"activations @ W.T + b + r": recon, "the captured embedding": emb}
        for what, value in checks.items():
            err = _relative_error(value.to(recon.dtype), reference)
            if not err <= rtol:
                raise RuntimeError(
                    f"{self.family}: the {tower.name} head at {tower.head.path!r} does not "
                    f"reproduce the model's own encode_{tower.name}(normalize=False): {what} is "
                    f"off by {err:.2e} relative (tolerance {rtol:.0e}). The model's layout differs "
                    "from what this adapter expects (or the copied head no longer matches)."
                )


def _scalar(value: torch.Tensor) -> torch.Tensor:
    """Detached float32+ scalar (HF SigLIP and ``nonscalar_logit_scale`` store shape `(1,)`)."""
    value = value.detach()
    return value.to(compute_dtype(value.dtype), copy=True).reshape(())


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Run in eval mode (dropout off, deterministic features), restoring every module's flag."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training
