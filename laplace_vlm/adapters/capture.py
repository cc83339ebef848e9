"""How an adapter reads a head's input: forward pre-hooks, or swapping the head for one call.

- :class:`HookCapture`: forward pre-hooks on an ``nn.Linear`` that the tower calls as a module
  (and on the module that receives a residual ``r``, SigLIP's MAP head).
- :class:`SwapCapture`: for heads the tower never calls as a module (open_clip's bare
  ``proj`` Parameters, ResNet's ``attnpool.c_proj`` used inside ``F.multi_head_attention_forward``),
  replace the attribute for one call so the tower returns its pre-projection activations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

Encode = Callable[[Any], torch.Tensor]
Captured = tuple[torch.Tensor, torch.Tensor, "torch.Tensor | None"]


def _pool(x: torch.Tensor | None, pool: str) -> torch.Tensor | None:
    """Reduce `(N, L, d)` latent tokens the way the pooling head does; `(N, d)` passes."""
    if x is None or x.dim() == 2:
        return x
    if pool == "token":
        return x[:, 0]
    if pool == "avg":
        return x.mean(1)
    raise ValueError(f"cannot pool captured activations of shape {tuple(x.shape)} with {pool!r}")


@dataclass(eq=False)
class HookCapture:
    """Capture the input of ``linear`` (and of ``residual_input``) with forward pre-hooks.

    Attributes
    ----------
    path : str
        the head's path, for error messages.
    linear : nn.Module
        the last linear layer; the tower must call it exactly once per forward.
    residual_input : nn.Module, optional
        the module whose input is the residual added after ``linear`` (SigLIP: the MAP head's
        pre-MLP norm, since ``x = x + mlp(norm(x))``).
    pool : {'token', 'avg'}, default='token'
        how a `(N, L, d)` capture is reduced to `(N, d)`: the first token (SigLIP's MAP head
        keeps latent 0) or the mean over tokens.
    """

    path: str
    linear: nn.Module
    residual_input: nn.Module | None = None
    pool: str = "token"

    def __call__(self, run: Callable[[], torch.Tensor]) -> Captured:
        """Run one forward pass with the pre-hooks registered, and remove them after.

        Parameters
        ----------
        run : callable
            ``run()`` performs the tower's forward pass and returns its `(N, D)` embedding.

        Returns
        -------
        activations : torch.Tensor
            `(N, d)` input of ``linear``, pooled if it was `(N, L, d)`.
        embeddings : torch.Tensor
            `(N, D)` what ``run`` returned.
        residual : torch.Tensor or None
            `(N, D)` input of ``residual_input`` (pooled likewise); None without one.

        Raises
        ------
        RuntimeError
            if ``linear`` (or ``residual_input``) did not run exactly once.
        """
        seen: dict[str, list[torch.Tensor]] = {"activations": [], "residual": []}
        modules = {"activations": self.linear, "residual": self.residual_input}
        handles = [
            module.register_forward_pre_hook(lambda _m, args, key=key: seen[key].append(args[0]))
            for key, module in modules.items()
            if module is not None
        ]
        try:
            embeddings = run()
        finally:
            for handle in handles:
                handle.remove()
        pre = self._single(seen["activations"])
        res = self._single(seen["residual"]) if self.residual_input is not None else None
        return _pool(pre, self.pool), embeddings, _pool(res, self.pool)

    def _single(self, calls: list[torch.Tensor]) -> torch.Tensor:
        if len(calls) != 1:
            raise RuntimeError(
                f"the head at {self.path!r} ran {len(calls)} times in one forward pass; "
                "the adapter expects exactly one call."
            )
        return calls[0]


@dataclass(eq=False)
class SwapCapture:
    """Swap ``owner.name`` for one call so the tower returns its pre-projection activations.

    Attributes
    ----------
    owner : nn.Module
        the module holding the head attribute.
    name : str
        the attribute (``"proj"``, ``"text_projection"``, ``"c_proj"``).
    replacement : callable
        ``replacement(original)`` gives the stand-in: ``None`` for a Parameter used behind an
        ``if proj is not None`` guard, an identity Linear for ResNet's ``c_proj``.
    project : callable
        ``project(activations)`` recomputes the tower's embedding with the live head, in the
        model's dtype, exactly as the tower does.
    """

    owner: nn.Module
    name: str
    replacement: Callable[[Any], Any]
    project: Callable[[torch.Tensor], torch.Tensor]

    def __call__(self, run: Callable[[], torch.Tensor]) -> Captured:
        """Run one forward pass with ``owner.name`` replaced, and restore it after.

        Parameters
        ----------
        run : callable
            ``run()`` performs the tower's forward pass; with the stand-in in place it returns
            the pre-projection activations.

        Returns
        -------
        activations : torch.Tensor
            `(N, d)` what ``run`` returned.
        embeddings : torch.Tensor
            `(N, D)` ``project(activations)``.
        residual : None
            a swapped head has no residual.
        """
        original = getattr(self.owner, self.name)
        setattr(self.owner, self.name, self.replacement(original))
        try:
            activations = run()
        finally:
            setattr(self.owner, self.name, original)
        return activations, self.project(activations), None
