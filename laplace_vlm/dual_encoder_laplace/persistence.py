"""Persistence of :class:`~laplace_vlm.DualEncoderLaplace`: ``state_dict``, files, BayesVLM.

``save`` writes ``state_dict()`` and ``load`` is construction plus ``load_state_dict``; the
released BayesVLM factors load through public construction as well.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from laplace_vlm.curvature.factor_sums import FactorSums
from laplace_vlm.docstrings import fill_doc
from laplace_vlm.enums import damping_argument, plain, posterior_form
from laplace_vlm.heads import unfold_bias
from laplace_vlm.io.bayesvlm import REFERENCE_N_DATA, read_bayesvlm_factors, read_bayesvlm_prior
from laplace_vlm.io.posterior_file import check_state, heads_fingerprint, read_state, save_state
from laplace_vlm.validation import check_bool, check_int, check_positive

if TYPE_CHECKING:
    from laplace_vlm.dual_encoder_laplace.core import DualEncoderLaplace


class PersistenceMixin:
    """State dicts, safetensors files and the released factors."""

    def state_dict(self) -> dict[str, Any]:
        """laplace's state dict plus what rebuilds this posterior without the model.

        Adds the contrastive type, the posterior form, the curvature backend, the heads'
        tensors and their fingerprint. Only tensors, plain strings and numbers: loads under
        ``torch.load(weights_only=True)``, and :meth:`save` writes exactly this.

        Returns
        -------
        dict
            laplace's entries plus ``joint_bias``, ``contrastive``, ``damping``,
            ``curvature``, ``fingerprint`` and ``heads``.
        """
        state = super().state_dict()
        state["likelihood"] = plain(self.likelihood)
        heads = {k: v for k, v in self.heads.state_dict().items()
                 if v is not None and not k.startswith("class_")}  # fmt: skip
        state.update(
            joint_bias=[self.heads.joint["image"], self.heads.joint["text"]],
            contrastive=self.contrastive,
            damping=damping_argument(self.posterior_form),
            curvature=self.curvature,
            fingerprint=heads_fingerprint(self.heads),
            heads=heads,
        )
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict`, after checking it belongs to these heads and likelihood.

        Parameters
        ----------
        state_dict : dict
            from :meth:`state_dict` (or ``torch.load(..., weights_only=True)`` of one).

        Raises
        ------
        ValueError
            for another class, contrastive type, posterior form or heads, or a malformed state.
        """
        check_state(state_dict)
        self._check_compatible(state_dict)
        # n_outputs follows set_classes (the classes are not saved): laplace's saved value goes
        super().load_state_dict({**state_dict, "n_outputs": self.n_outputs})

    def _check_compatible(self, state: dict[str, Any]) -> None:
        if state.get("cls_name") != type(self).__name__:
            raise ValueError(
                f"this state is not a {type(self).__name__} (cls_name={state.get('cls_name')!r})."
            )
        if state["contrastive"] != self.contrastive:
            raise ValueError(
                f"saved for contrastive={state['contrastive']!r}, this posterior is "
                f"{self.contrastive!r}."
            )
        fingerprint = heads_fingerprint(self.heads)
        if state["fingerprint"] != fingerprint:
            raise ValueError(
                "the saved posterior was fitted for other projection heads (fingerprint "
                f"{state['fingerprint']} != {fingerprint}): load it with the model it was "
                "fitted on."
            )
        if posterior_form(state["damping"]) is not self.posterior_form:
            raise ValueError(
                f"saved with damping={state['damping']!r}, this posterior has "
                f"damping={damping_argument(self.posterior_form)!r}."
            )

    @fill_doc
    def save(self, path: str | os.PathLike, overwrite: bool = False) -> None:
        """Write :meth:`state_dict` to a safetensors file (atomic; never pickle).

        Parameters
        ----------
        %(path)s
        overwrite : bool, default=False
            replace an existing file; otherwise a ``FileExistsError``.
        """
        save_state(path, self.state_dict(), overwrite=check_bool("overwrite", overwrite))

    @classmethod
    def load(
        cls, path: str | os.PathLike, model: nn.Module | None = None, **kwargs: Any
    ) -> DualEncoderLaplace:
        """Construct a posterior and load a file written by :meth:`save`.

        Parameters
        ----------
        path : str or os.PathLike
            the file (laplace-vlm 0.1 files load too).
        model : nn.Module, optional
            the model it was fitted for; without, the saved heads (feature mode).
        **kwargs
            constructor arguments; ``contrastive``, ``damping``, ``temperature``,
            ``curvature``, ``enable_backprop`` and ``joint_bias`` default to the saved ones.

        Returns
        -------
        DualEncoderLaplace
            the fitted posterior.

        Raises
        ------
        FileNotFoundError
            if ``path`` does not exist.
        ValueError
            if the file is not a valid posterior, or belongs to other heads.
        """
        state = read_state(path)
        check_state(state, source=os.fspath(path))
        for key in ("contrastive", "damping", "temperature", "curvature", "enable_backprop"):
            if key in state:
                kwargs.setdefault(key, state[key])
        joint = state.get("joint_bias", [False, False])  # 0.1 files: separate bias blocks
        kwargs.setdefault("joint_bias", any(joint))
        if model is None:
            heads = state["heads"]
            kwargs.update(image_projection=_head(heads, "image", joint[0]),
                          text_projection=_head(heads, "text", joint[1]),
                          logit_scale=heads["logit_scale"], logit_bias=heads.get("logit_bias"))  # fmt: skip
        try:
            la = cls(model, **kwargs)
            la.load_state_dict(state)
        except ValueError as err:  # other heads, another form, or a value laplace refuses
            raise ValueError(f"{os.fspath(path)}: {err}") from err
        return la

    @classmethod
    def from_bayesvlm(
        cls,
        directory: str | os.PathLike,
        model: nn.Module | None = None,
        *,
        n_data: int = REFERENCE_N_DATA,
        pseudo_count: float = 10.0,
        prior_precision: str | float | torch.Tensor = "released",
        damping: bool | str = "symmetric",
        **kwargs: Any,
    ) -> DualEncoderLaplace:
        """A fitted posterior from the curvature files released with the paper's code.

        Parameters
        ----------
        directory : str or os.PathLike
            folder with ``{A,B}_{img,txt}_analytic.pt`` and ``prior_precision_analytic.json``.
        model : nn.Module, optional
            the matching model (open_clip ViT-B-32 laion2b_s34b_b79k); else give the heads as
            in feature mode (``image_projection=``, ``text_projection=``, ``logit_scale=``).
        n_data : int, default=327,680
            the pairs behind the released factors.
        pseudo_count : float, default=10
            the paper's ``n``: ``temperature = 1 / n``.
        prior_precision : 'released' or float or torch.Tensor, default='released'
            'released' takes ``(lambda_img, lambda_txt)`` from the JSON (found at ``n = 1``
            with the reference's evidence objective: re-optimise for another ``n``).
        damping : {'symmetric', False, True}, default='symmetric'
            the reference's posterior form by default, so that the predictive reproduces the
            reference pipeline; ``False`` is the exact-prior form ``fit`` uses.
        **kwargs
            other constructor arguments.

        Returns
        -------
        DualEncoderLaplace
            fitted with the released factors.

        Raises
        ------
        FileNotFoundError
            if a released file is missing.
        TypeError
            for a non-number ``pseudo_count`` or a non-integer ``n_data``.
        ValueError
            if the heads have a bias, a factor does not fit the heads' dims,
            ``prior_precision`` is another string, or ``pseudo_count`` / ``n_data`` is not
            positive.
        """
        pseudo_count = float(check_positive("pseudo_count", pseudo_count))
        n_data = check_int("n_data", n_data)
        factors = read_bayesvlm_factors(directory)
        if isinstance(prior_precision, str):
            if prior_precision != "released":
                raise ValueError(
                    f"prior_precision must be 'released' or numbers, got {prior_precision!r}."
                )
            prior_precision = read_bayesvlm_prior(directory)
        la = cls(model, temperature=1.0 / pseudo_count, prior_precision=prior_precision,
                 damping=damping, **kwargs)  # fmt: skip
        # a bias folded into the weight (joint_bias=True, the default) is a bias too: without
        # the joint flag this check could never fire and such heads met the dims check below
        if any(la._has_bias) or any(la.heads.joint.values()):
            raise ValueError("the released CLIP factors are for heads without bias.")
        D_i, d_i, D_t, d_t = la._dims
        for name, dim in {"A_img": d_i, "B_img": D_i, "A_txt": d_t, "B_txt": D_t}.items():
            if factors[name].shape[0] != dim:
                raise ValueError(
                    f"{name} is {tuple(factors[name].shape)} but the model's head needs "
                    f"({dim}, {dim}): these factors belong to another model."
                )
        like = la.heads.image_projection.weight
        la.set_factor_sums(FactorSums.from_bayesvlm(factors, n_data, like))
        return la


def _head(heads: dict[str, torch.Tensor], side: str, folded: bool) -> nn.Linear:
    """A saved head as an ``nn.Linear`` with its own bias (the constructor copies it)."""
    weight, bias = heads[f"{side}_projection.weight"], heads.get(f"{side}_projection.bias")
    if folded:
        weight, bias = unfold_bias(weight)
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear
