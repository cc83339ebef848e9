"""``DualEncoderLaplace``: construction, the posterior and its prior.

Fitting (:mod:`.fitting`), prediction (:mod:`.prediction`), persistence
(:mod:`.persistence`) and the tuning of the prior precision (:mod:`.prior_tuning`) are
mixins of their own modules, combined with laplace's ``KronLaplace`` here.
"""

from __future__ import annotations

from typing import Any

import torch
from laplace import KronLaplace
from laplace.utils.matrix import KronDecomposed
from torch import nn
from torch.nn.utils import parameters_to_vector

from laplace_vlm.curvature import curvature_name, get_curvature_backend
from laplace_vlm.curvature.likelihoods import check_contrastive
from laplace_vlm.dual_encoder_laplace.fitting import FitMixin
from laplace_vlm.dual_encoder_laplace.persistence import PersistenceMixin
from laplace_vlm.dual_encoder_laplace.prediction import PredictionMixin
from laplace_vlm.dual_encoder_laplace.prior_tuning import PriorTuningMixin
from laplace_vlm.enums import PosteriorForm, plain, posterior_form
from laplace_vlm.heads import DualHead, build_heads
from laplace_vlm.inputs import InputEncoder
from laplace_vlm.posterior.head_posterior import HeadPosterior
from laplace_vlm.validation import (
    as_real_tensor,
    check_bool,
    check_finite,
    check_optional_int,
    check_positive,
)

# laplace arguments without a meaning for two projection heads fed {"image", "text"} inputs:
# refused when given at all (a value equal to laplace's default would still be ignored)
_UNSUPPORTED_LAPLACE_ARGS = ("dict_key_x", "backend_kwargs", "asdl_fisher_kwargs")


class DualEncoderLaplace(
    FitMixin, PredictionMixin, PersistenceMixin, PriorTuningMixin, KronLaplace
):
    """Laplace approximation over the image and text projection heads of CLIP or SigLIP.

    The image head's curvature treats each image as a classification over the texts of
    its class batch (and the text head the reverse); each head's KFAC GGN is computed with
    the other tower at its MAP value. The posterior is laplace's ``KronDecomposed``, and the
    predictive of the similarity logits is analytic (see :mod:`laplace_vlm.predictive.moments`).

    Parameters
    ----------
    model : nn.Module, optional
        an open_clip (or Hugging Face) dual encoder; its heads and logit scale/bias are read
        through :func:`laplace_vlm.adapters.get_adapter`. ``None`` for feature mode.
    likelihood : {'classification'}
        laplace's likelihood; the contrastive type is ``contrastive``.
    image_projection, text_projection : nn.Linear or torch.Tensor, optional
        feature mode: the heads, as ``nn.Linear`` or weight `(D, d)`.
    logit_scale : float or torch.Tensor, optional
        feature mode: the *log* logit scale (as open_clip stores it).
    logit_bias : float or torch.Tensor, optional
        SigLIP's logit bias.
    contrastive : {'clip', 'siglip'}, default='clip'
        InfoNCE (softmax over the other modality) or pairwise sigmoid.
    curvature : str, default='closed_form'
        a backend of :mod:`laplace_vlm.curvature` ('closed_form', 'asdl', 'backpack',
        'curvlinops'); laplace's ``backend=AsdlGGN|BackPackGGN|CurvlinopsGGN`` is mapped to it.
    chunk_size : int, optional
        rows per chunk in fit and predict; bounds memory with the same result.
    backend : type, optional
        laplace's curvature class (``AsdlGGN``, ``BackPackGGN``, ``CurvlinopsGGN``), mapped to
        ``curvature``; give one of the two.
    damping : {'symmetric', False, True}, default='symmetric'
        how the prior enters each Kronecker block (:class:`laplace_vlm.enums.PosteriorForm`):
        ``'symmetric'``, the paper's method (its reference implementation's
        ``(sqrt(h) F0 + sqrt(delta) I) x (sqrt(h) F1 + sqrt(delta) I)`` on the split
        ``[sum B / sqrt(N), sum a a^T / sqrt(N)]``); ``False``, laplace's exact prior
        ``h F0 x F1 + delta I``; ``True``, laplace's damped form on its split
        ``[sum B, sum a a^T / N]``. The default differs from laplace's ``KronLaplace``
        (``damping=False``) because the paper's posterior is this form: its cross terms
        ``sqrt(h delta) (F0 x I + I x F1)`` keep it far tighter than the exact-prior form at the
        same pseudo-count (about 130x in relative embedding variance on the digits stand-in at
        ``n = 10``).
    joint_bias : bool, default=True
        a head with a bias (SigLIP's) gets one Kronecker factor over ``[W | b]``, the
        activations with a trailing 1, as the reference does: the weight-bias
        cross-covariance is kept. ``False`` gives laplace's separate bias block. The head
        then appears in ``self.heads`` as one bias-free ``nn.Linear`` of ``d + 1`` inputs.
    **kwargs
        laplace's keyword arguments, passed on to ``KronLaplace``:

        - ``temperature`` (float, default 1): ``1 / n`` for the paper's pseudo-data count
          ``n``;
        - ``enable_backprop`` (bool, default False): predictions are differentiable in the
          inputs (activations, or through the encoders in model mode); otherwise no autograd
          graph is built;
        - ``prior_precision``, ``prior_mean`` and ``sigma_noise`` (must stay 1 for
          classification).

        - ``dict_key_y`` (str, default 'labels'): the labels' key of dict batches in
          gridsearch's ``val_loader``, as in laplace.

        ``dict_key_x``, ``backend_kwargs`` and ``asdl_fisher_kwargs`` have no meaning here
        (inputs are always keyed ``"image"``/``"text"``; backends take no options) and raise
        whenever given, even with laplace's default value.

    Attributes
    ----------
    backend : laplace_vlm.curvature.backend.HeadCurvature
        the curvature backend ``curvature`` names (not laplace's lazily built ``CurvlinopsGGN``,
        which nothing here uses).
    n_outputs : int
        the logits per input: the number of classes of :meth:`set_classes`, 0 while none are
        set (each ``x`` then brings its own ``C`` texts). Not the embedding dimension.
    """

    _key = ("dual_encoder", "kron")

    def __init__(
        self,
        model: nn.Module | None = None,
        likelihood: str = "classification",
        *,
        image_projection: nn.Linear | torch.Tensor | None = None,
        text_projection: nn.Linear | torch.Tensor | None = None,
        logit_scale: float | torch.Tensor | None = None,
        logit_bias: float | torch.Tensor | None = None,
        contrastive: str = "clip",
        curvature: str = "closed_form",
        chunk_size: int | None = None,
        backend: type | None = None,
        damping: bool | str = "symmetric",
        joint_bias: bool = True,
        **kwargs: Any,
    ) -> None:
        for name in _UNSUPPORTED_LAPLACE_ARGS:
            if name in kwargs:
                raise ValueError(
                    f"{name}={kwargs[name]!r} is not supported by DualEncoderLaplace: inputs are "
                    "dicts {'image', 'text'} of activations or raw inputs, and the curvature "
                    "backends take no options (choose one with curvature=...)."
                )
        if not isinstance(kwargs.get("dict_key_y", "labels"), str):
            raise TypeError(f"dict_key_y must be a str, got {kwargs['dict_key_y']!r}.")
        likelihood = plain(likelihood)
        if likelihood != "classification":
            raise ValueError(
                "DualEncoderLaplace needs likelihood='classification' (set the contrastive "
                f"type with contrastive='clip'|'siglip'), got {likelihood!r}."
            )
        self.contrastive: str = check_contrastive(contrastive)
        self.curvature: str = curvature_name(curvature, backend)
        get_curvature_backend(self.curvature)  # fail early on an unknown name
        self.chunk_size = check_optional_int("chunk_size", chunk_size)
        self.adapter = None
        if model is not None:
            from laplace_vlm.adapters import get_adapter

            self.adapter = get_adapter(model)
            image_projection, text_projection = self.adapter.image_head, self.adapter.text_head
            logit_scale = self.adapter.logit_scale if logit_scale is None else logit_scale
            logit_bias = self.adapter.logit_bias if logit_bias is None else logit_bias
        check_bool("joint_bias", joint_bias)
        if "enable_backprop" in kwargs:  # a truthy string or tensor is no switch
            check_bool("enable_backprop", kwargs["enable_backprop"])
        heads = build_heads(image_projection, text_projection, logit_scale, logit_bias, joint_bias)
        self.posterior_form = posterior_form(damping)
        # laplace's KronDecomposed reads a bool; the symmetric form is damped on rescaled factors
        damped = self.posterior_form is not PosteriorForm.EXACT
        super().__init__(heads, likelihood, backend=None, damping=damped, **kwargs)
        self.mean = parameters_to_vector(self.params).detach()
        self.inputs = InputEncoder(heads, self.adapter)

    @property
    def heads(self) -> DualHead:
        """The projection heads (``self.model``)."""
        return self.model

    @property
    def _dims(self) -> tuple[int, int, int, int]:
        """``(D_img, d_img, D_txt, d_txt)``"""
        return (*self.heads.image_projection.weight.shape, *self.heads.text_projection.weight.shape)

    @property
    def _has_bias(self) -> tuple[bool, bool]:
        return tuple(
            h.bias is not None for h in (self.heads.image_projection, self.heads.text_projection)
        )

    @property
    def prior_precision(self) -> torch.Tensor:
        """laplace's prior precision: one value, one per head or one per weight and bias tensor.

        Set it with one value per head (2 values) to expand each to that head's tensors;
        every value must be positive.
        """
        return KronLaplace.prior_precision.fget(self)

    @prior_precision.setter
    def prior_precision(self, prior_precision: float | torch.Tensor) -> None:
        # one value per head expands to that head's weight (and bias) tensors
        if isinstance(prior_precision, torch.Tensor) and prior_precision.numel() == 2:
            if self.n_layers != 2:
                img, txt = prior_precision.flatten()
                repeats = [1 + b for b in self._has_bias]
                prior_precision = torch.stack([img] * repeats[0] + [txt] * repeats[1])
        check_positive("prior_precision", prior_precision)
        KronLaplace.prior_precision.fset(self, prior_precision)

    @property
    def prior_mean(self) -> torch.Tensor:
        """laplace's prior mean: one value or one per parameter, finite."""
        return KronLaplace.prior_mean.fget(self)

    @prior_mean.setter
    def prior_mean(self, prior_mean: float | torch.Tensor) -> None:
        # a NaN mean would make every evidence NaN, silently
        check_finite("prior_mean", as_real_tensor("prior_mean", prior_mean))
        KronLaplace.prior_mean.fset(self, prior_mean)

    @property
    def temperature(self) -> float:
        """``1 / n`` for the paper's pseudo-data count ``n``."""
        return self._temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        self._temperature = float(check_positive("temperature", value))

    @property
    def posterior_precision(self) -> KronDecomposed:
        """Posterior precision in the form ``damping`` names.

        Upstream drops ``damping`` when adding the prior: it is kept here. The symmetric form
        moves ``sqrt(N)`` from the input to the output factor of every weight block, so the
        data term is unchanged and laplace's damped algebra gives the reference's precision.
        """
        self._check_H_init()
        H = self.H * self._H_factor
        if self.posterior_form is PosteriorForm.SYMMETRIC:
            root = float(self.n_data) ** 0.5
            eigenvalues = [[ls[0] / root, ls[1] * root] if len(ls) == 2 else ls
                           for ls in H.eigenvalues]  # fmt: skip
            H = KronDecomposed(H.eigenvectors, eigenvalues, H.deltas)
        P = H + self.prior_precision
        P.damping = self.damping
        return P

    def head_posteriors(self) -> tuple[HeadPosterior, HeadPosterior]:
        """Posterior of the image head and of the text head, in their eigenbases.

        Returns
        -------
        image, text : HeadPosterior
            read from :attr:`posterior_precision`.
        """
        P = self.posterior_precision
        img_bias, txt_bias = self._has_bias
        image = HeadPosterior.from_kron(P, 0, img_bias)
        text = HeadPosterior.from_kron(P, 1 + img_bias, txt_bias)
        return image, text

    def refresh_mean(self) -> None:
        """Take the heads' current weights as the posterior mean (after fine-tuning them)."""
        self.mean = parameters_to_vector(self.params).detach()

    @property
    def backend(self) -> Any:
        """The curvature backend that ``fit`` uses (``curvature=``), a ``HeadCurvature``.

        laplace's property would build a ``CurvlinopsGGN`` of the heads, which nothing here
        uses; this one returns what computes the curvature.
        """
        return get_curvature_backend(self.curvature)

    @property
    def n_outputs(self) -> int:
        """Logits per input: the classes of :meth:`set_classes`, 0 while none are set.

        Each ``x`` with texts brings its own ``C``; laplace's value (the model's output
        width) would be the embedding dimension here, which no prediction has.
        """
        classes = self.heads.class_activations
        return 0 if classes is None else len(classes)

    @n_outputs.setter
    def n_outputs(self, value: int) -> None:
        # laplace writes 0 at construction and the saved value on load: both follow the classes
        if value not in (0, self.n_outputs):
            raise ValueError(
                f"n_outputs is the number of classes of set_classes() ({self.n_outputs}); "
                f"it cannot be set to {value!r}: call set_classes() instead."
            )

    def set_classes(self, text: Any, residual: torch.Tensor | None = None) -> None:
        """Fix the class texts (activations, or tokens in model mode) so ``la(images)`` works.

        Parameters
        ----------
        text : torch.Tensor or object
            `(C, d_txt)` class text activations, or (model mode) tokens the adapter encodes.
        residual : torch.Tensor, optional
            `(C, D)` offsets of the class text embeddings; for tokens the adapter's residual
            is used instead.
        """
        with torch.set_grad_enabled(self.enable_backprop):
            a_t, r_t = self.inputs.features("text", text, residual)
        self.heads.set_classes(a_t, r_t)  # n_outputs follows
