"""``DualEncoderLaplace``: KFAC Laplace over the two projection heads of a dual encoder."""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch
import tqdm
from laplace import KronLaplace
from laplace.utils.matrix import KronDecomposed
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import parameters_to_vector

from laplace_vlm.curvature import curvature_name, get_curvature_backend
from laplace_vlm.curvature.distributed import all_reduce_sums, failures_shared_across_ranks
from laplace_vlm.curvature.factor_sums import FactorSums
from laplace_vlm.curvature.likelihoods import check_contrastive, pair_loss
from laplace_vlm.enums import MOMENT_PRED_TYPES, LinkApprox, PosteriorForm, PredType, parse_option
from laplace_vlm.heads import DualHead, build_heads, unfold_bias
from laplace_vlm.inputs import InputEncoder
from laplace_vlm.io.bayesvlm import REFERENCE_N_DATA, read_bayesvlm_factors, read_bayesvlm_prior
from laplace_vlm.io.fit_checkpoint import FitCheckpoint, checkpoint_key
from laplace_vlm.io.posterior_file import check_state, heads_fingerprint, read_state, save_state
from laplace_vlm.posterior.head_posterior import HeadPosterior
from laplace_vlm.posterior.marglik import maximize_marglik
from laplace_vlm.predictive.chunks import (
    glm_covariance_chunks,
    logit_sample_chunks,
    moment_chunks,
)
from laplace_vlm.predictive.links import link_function, probit_link, sample_logits
from laplace_vlm.validation import check_finite, check_nonzero_norm, check_positive

# laplace arguments that have no meaning for two projection heads fed dicts of activations
_UNSUPPORTED_LAPLACE_ARGS = {
    "dict_key_x": "input_ids",
    "dict_key_y": "labels",
    "backend_kwargs": None,
    "asdl_fisher_kwargs": None,
}
# Monte Carlo predictive without chunk_size: images per chunk keep S x chunk x C below this
_MC_MAX_ELEMENTS = 2**22


class DualEncoderLaplace(KronLaplace):
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
    temperature : float, default=1
        ``1 / n`` for the paper's pseudo-data count ``n``.
    damping : {False, True, 'symmetric'}, default=False
        how the prior enters each Kronecker block (:class:`laplace_vlm.enums.PosteriorForm`):
        ``False``, the exact prior ``h F0 x F1 + delta I``; ``True``, laplace's
        ``(sqrt(h) F0 + sqrt(delta) I) x (sqrt(h) F1 + sqrt(delta) I)`` on its split
        ``[sum B, sum a a^T / N]``; ``'symmetric'``, the reference implementation's same form
        on the split ``[sum B / sqrt(N), sum a a^T / sqrt(N)]``.
    joint_bias : bool, default=True
        a head with a bias (SigLIP's) gets one Kronecker factor over ``[W | b]``, the
        activations with a trailing 1, as the reference does: the weight-bias
        cross-covariance is kept. ``False`` gives laplace's separate bias block. The head
        then appears in ``self.heads`` as one bias-free ``nn.Linear`` of ``d + 1`` inputs.
    enable_backprop : bool, default=False
        laplace's flag: predictions are differentiable in the inputs (activations, or through
        the encoders in model mode). Otherwise no autograd graph is built.
    **kwargs
        laplace's ``prior_precision``, ``prior_mean``, ``sigma_noise`` (must stay 1 for
        classification). ``dict_key_x``, ``dict_key_y``, ``backend_kwargs`` and
        ``asdl_fisher_kwargs`` have no meaning here and raise.
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
        damping: bool | str = False,
        joint_bias: bool = True,
        **kwargs: Any,
    ) -> None:
        for name, default in _UNSUPPORTED_LAPLACE_ARGS.items():
            if name in kwargs and kwargs.pop(name) != default:
                raise ValueError(
                    f"{name} is not supported by DualEncoderLaplace: inputs are dicts "
                    "{'image', 'text'} of activations or raw inputs, and the curvature backends "
                    "take no options (choose one with curvature=...)."
                )
        likelihood = _plain(likelihood)
        if likelihood != "classification":
            raise ValueError(
                "DualEncoderLaplace needs likelihood='classification' (set the contrastive "
                f"type with contrastive='clip'|'siglip'), got {likelihood!r}."
            )
        self.contrastive: str = check_contrastive(contrastive)
        self.curvature: str = curvature_name(curvature, backend)
        get_curvature_backend(self.curvature)  # fail early on an unknown name
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}.")
        self.chunk_size = chunk_size
        self.adapter = None
        if model is not None:
            from laplace_vlm.adapters import get_adapter

            self.adapter = get_adapter(model)
            image_projection, text_projection = self.adapter.image_head, self.adapter.text_head
            logit_scale = self.adapter.logit_scale if logit_scale is None else logit_scale
            logit_bias = self.adapter.logit_bias if logit_bias is None else logit_bias
        if not isinstance(joint_bias, bool):
            raise ValueError(f"joint_bias must be True or False, got {joint_bias!r}.")
        heads = build_heads(image_projection, text_projection, logit_scale, logit_bias, joint_bias)
        self.posterior_form = _posterior_form(damping)
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

    @KronLaplace.prior_precision.setter
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
        """Posterior of the image head and of the text head, in their eigenbases."""
        P = self.posterior_precision
        img_bias, txt_bias = self._has_bias
        image = HeadPosterior.from_kron(P, 0, img_bias)
        text = HeadPosterior.from_kron(P, 1 + img_bias, txt_bias)
        return image, text

    def refresh_mean(self) -> None:
        """Take the heads' current weights as the posterior mean (after fine-tuning them)."""
        self.mean = parameters_to_vector(self.params).detach()

    def optimize_prior_precision(
        self,
        pred_type: Any = "glm",
        method: Any = "marglik",
        n_steps: int | None = None,
        lr: float | None = None,
        init_prior_prec: float | torch.Tensor = 1.0,
        prior_structure: Any = "scalar",
        val_loader: Any = None,
        loss: Any = None,
        log_prior_prec_min: float = -4,
        log_prior_prec_max: float = 4,
        grid_size: int = 100,
        link_approx: Any = "probit",
        n_samples: int = 100,
        verbose: bool = False,
        progress_bar: bool = False,
        log_prior_prec_base: float = 10.0,
    ) -> None:
        """Tune the prior precision: the evidence optimum (marglik) or laplace's gridsearch.

        laplace's signature and defaults. ``method='marglik'`` maximises
        :meth:`log_marginal_likelihood` to convergence with
        :func:`laplace_vlm.posterior.marglik.maximize_marglik` (safeguarded Newton in
        ``log lambda``) instead of laplace's 100 Adam steps of 0.1 from ``init_prior_prec``,
        which stop well short of optima far from it. ``method='gridsearch'`` is laplace's,
        without its reminder about ``link_approx`` (it passes ``link_approx`` on to
        :meth:`__call__`).

        Parameters
        ----------
        pred_type, link_approx, n_samples
            the predictive that gridsearch scores (unused by marglik, as in laplace).
        val_loader, loss, log_prior_prec_min, log_prior_prec_max, grid_size, log_prior_prec_base
            gridsearch's validation data and grid; given with marglik they are ignored with a
            warning (as laplace does for ``val_loader``).
        method : {'marglik', 'gridsearch'}, default='marglik'
        n_steps : int, optional
            marglik: the most evidence evaluations (``max_iter``, default 100; about 10 are
            typical); gridsearch: unused, as in laplace.
        lr : float, optional
            the step of laplace's Adam loop: the Newton iteration has none, so marglik refuses
            it.
        init_prior_prec : float or torch.Tensor, default=1.0
            the start: one value (broadcast to ``prior_structure``), one per head (2 values) or
            one per tensor (``n_layers``).
        prior_structure : {'scalar', 'head', 'layerwise'}, default='scalar'
            laplace's 'scalar' and 'layerwise' (one per weight and bias tensor), or one value
            per head; laplace's 'diag' cannot be held by a Kronecker posterior.
        verbose, progress_bar : bool, default=False
        """
        method = str(getattr(method, "value", method))
        if method == "gridsearch":
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="By default `link_approx` is `probit`")
                super().optimize_prior_precision(
                    pred_type, method, 100 if n_steps is None else n_steps,
                    1e-1 if lr is None else lr, init_prior_prec, prior_structure, val_loader,
                    loss, log_prior_prec_min, log_prior_prec_max, grid_size, link_approx,
                    n_samples, verbose, progress_bar, log_prior_prec_base=log_prior_prec_base,
                )  # fmt: skip
            return
        if method != "marglik":
            raise ValueError(f"method must be 'marglik' or 'gridsearch', got {method!r}.")
        if lr is not None:
            raise ValueError(
                f"lr={lr} is the step size of laplace's Adam loop; method='marglik' here runs a "
                "Newton iteration in log prior precision, which has none: drop lr (n_steps "
                "bounds the iterations)."
            )
        if val_loader is not None:
            warnings.warn(
                "`val_loader` will be ignored when `method` == 'marglik'. "
                "Do you mean to set `method = 'gridsearch'`?"
            )
        ignored = [name for name, given in (
            ("loss", loss is not None), ("log_prior_prec_min", log_prior_prec_min != -4),
            ("log_prior_prec_max", log_prior_prec_max != 4), ("grid_size", grid_size != 100),
            ("log_prior_prec_base", log_prior_prec_base != 10.0)) if given]  # fmt: skip
        if ignored:
            warnings.warn(f"{', '.join(ignored)} only apply to method='gridsearch': ignored.")
        try:
            maximize_marglik(
                self,
                prior_structure,
                init_prior_prec,
                max_iter=100 if n_steps is None else n_steps,
                verbose=verbose,
                progress_bar=progress_bar,
            )
        except ValueError as err:
            if n_steps is None or "max_iter" not in str(err):
                raise
            raise ValueError(f"optimize_prior_precision(n_steps={n_steps}): {err}") from err

    def fit(
        self,
        train_loader: Any,
        override: bool = True,
        progress_bar: bool = False,
        checkpoint: str | None = None,
        checkpoint_every: int = 100,
    ) -> None:
        """Estimate the KFAC curvature of both heads from matched image-text pairs.

        Parameters
        ----------
        train_loader : iterable
            batches of matched pairs, ``(image, text)`` or ``{"image": ..., "text": ...}``
            (optionally ``"image_residual"``/``"text_residual"``). Each batch is a class
            batch: its texts are the classes of its images and vice versa. Feature mode:
            activations `(M, d)`; model mode: images and tokens. The number of pairs ``N``
            is counted, so loaders without a length (webdataset) work.
        override : bool, default=True
            ``False`` adds the new pairs to the current factors, as if fitted on the union.
        progress_bar : bool, default=False
        checkpoint : str, optional
            file for partial sums, written atomically every ``checkpoint_every`` batches; a
            later call with the same file and a deterministic loader resumes where it stopped.
        checkpoint_every : int, default=100

        Notes
        -----
        Inside an initialised ``torch.distributed`` process group every rank fits its own
        shard and the sums are all-reduced once: all ranks end with the factors of the union.
        """
        previous = None
        if not override and self.H_facs is not None:
            previous = FactorSums.from_kron(self.H_facs, self.n_data, self.loss)
        sums = FactorSums.zeros(self._dims, self.heads.image_projection.weight)
        ckpt, done = None, 0
        if checkpoint is not None:
            key = checkpoint_key(heads_fingerprint(self.heads), self.contrastive, self.curvature)
            ckpt = FitCheckpoint(checkpoint, checkpoint_every, key)
            saved, done = ckpt.resume(sums.tensors())
            sums = FactorSums(**saved)
        self.model.eval()
        pbar = tqdm.tqdm(train_loader, disable=not progress_bar, desc="[KFAC]")
        seen = 0
        with failures_shared_across_ranks():
            for seen, batch in enumerate(pbar, start=1):
                if seen <= done:  # counted before the interruption
                    continue
                sums += self._batch_sums(batch)
                if ckpt is not None:
                    ckpt.maybe_save(sums.tensors(), seen)
            if seen < done:
                raise ValueError(
                    f"checkpoint {checkpoint} counted {done} batches but train_loader yielded "
                    f"{seen}: it belongs to another loader (delete it to start afresh)."
                )
        all_reduce_sums(sums)
        if previous is not None:
            previous += sums
            sums = previous
        self._set_factors(sums)
        if ckpt is not None:  # the sums are in the posterior now: a stale file must not be reused
            ckpt.finish()

    def _batch_sums(self, batch: Any) -> FactorSums:
        heads, fn = self.heads, get_curvature_backend(self.curvature)
        with torch.no_grad():  # the backends build whatever graph they need themselves
            a_i, r_i, a_t, r_t = self.inputs.pair(batch)
            z = check_nonzero_norm("image embeddings", heads.embed_image(a_i, r_i))
            t = check_nonzero_norm("text embeddings", heads.embed_text(a_t, r_t))
            u, v = F.normalize(z, dim=-1), F.normalize(t, dim=-1)
        labels = torch.arange(len(a_i), device=a_i.device)

        def factors(head, acts, residual, targets):  # one head, the other tower at its MAP
            bias = None if head.bias is None else head.bias.detach()
            return fn(head.weight.detach(), bias, acts, residual, targets, heads.scale.detach(),
                      heads.logit_bias, self.contrastive, labels=labels,
                      chunk_size=self.chunk_size)  # fmt: skip

        B_i, A_i = factors(heads.image_projection, a_i, r_i, v)
        B_t, A_t = factors(heads.text_projection, a_t, r_t, u)
        loss = pair_loss(u, v, labels, heads.logits, self.contrastive, self.chunk_size)
        n = torch.tensor(len(a_i), dtype=torch.int64, device=a_i.device)
        return FactorSums(B_i, A_i, B_t, A_t, loss, n)

    def _set_factors(self, sums: FactorSums) -> None:
        if int(sums.n) == 0:
            raise ValueError("train_loader yielded no pairs: cannot fit the curvature.")
        for name, value in sums.tensors().items():
            check_finite(f"curvature factor {name}", value)
        self.H_facs = sums.to_kron(*self._has_bias)
        self.loss = sums.loss.detach()
        self.n_data = int(sums.n)
        self.n_outputs = self._dims[0]
        self.refresh_mean()
        self.H = self.H_facs.decompose(damping=self.damping)

    def set_classes(self, text: Any, residual: torch.Tensor | None = None) -> None:
        """Fix the class texts (activations, or tokens in model mode) so ``la(images)`` works."""
        with torch.set_grad_enabled(self.enable_backprop):
            a_t, r_t = self.inputs.features("text", text, residual)
        self.heads.set_classes(a_t, r_t)

    def _predict_inputs(self, x: Any):
        """Validated head inputs and the two posteriors, under laplace's ``enable_backprop``."""
        return self.inputs.predict(x), self.head_posteriors()

    def embedding_moments(
        self, x: Any, full: bool = False
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Mean and variance (or covariance) of both embeddings under the posterior.

        Parameters
        ----------
        x : dict or torch.Tensor
            ``{"image": (N, ...), "text": (C, ...)}`` or images scored against ``set_classes``.
        full : bool, default=False
            the full `(N, D, D)` covariances instead of the `(N, D)` variances.

        Returns
        -------
        moments : dict
            ``{"image": (mean (N, D), var (N, D) or cov (N, D, D)), "text": (mean (C, D), ...)}``
        """
        with torch.set_grad_enabled(self.enable_backprop):
            (a_i, r_i, a_t, r_t), (post_i, post_t) = self._predict_inputs(x)
            z, t = self.heads.embed_image(a_i, r_i), self.heads.embed_text(a_t, r_t)
            spread = (lambda p, a: p.covariance(a)) if full else (lambda p, a: p.variance(a))
            return {"image": (z, spread(post_i, a_i)), "text": (t, spread(post_t, a_t))}

    def predictive_moments(
        self,
        x: Any,
        pred_type: str | PredType = PredType.PROBCOSINE,
        diagonal_output: bool = True,
        chunk_size: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance of the similarity logits, `(N, C)` each.

        Parameters
        ----------
        x : dict or torch.Tensor
            ``{"image": (N, ...), "text": (C, ...)}`` or images scored against ``set_classes``.
        pred_type : {'probcosine', 'probcosine_diag', 'glm', 'map'}, default='probcosine'
            moment matching of the cosine with full or diagonal embedding covariances,
            laplace's linearised predictive, or the deterministic logits (variance 0).
        diagonal_output : bool, default=True
            ``False`` returns the `(N, C, C)` covariance over classes (``glm`` only).
        chunk_size : int, optional
            images per chunk (defaults to the constructor's); peak memory independent of N.

        Returns
        -------
        mean : torch.Tensor
            `(N, C)`.
        var : torch.Tensor
            `(N, C)`, or `(N, C, C)` with ``diagonal_output=False``.
        """
        pred_type = parse_option(PredType, pred_type, "pred_type")
        if pred_type is PredType.MAP and diagonal_output:  # the deterministic logits
            with torch.set_grad_enabled(self.enable_backprop):
                a_i, r_i, a_t, r_t = self.inputs.predict(x)
                logits = self.heads({"image": a_i, "text": a_t, "image_residual": r_i,
                                     "text_residual": r_t})  # fmt: skip
            return logits, torch.zeros_like(logits)
        if pred_type not in MOMENT_PRED_TYPES:
            options = tuple(p.value for p in (*MOMENT_PRED_TYPES, PredType.MAP))
            raise ValueError(f"pred_type must be one of {options} for moments, got {pred_type!r}.")
        if not diagonal_output and pred_type is not PredType.GLM:
            raise ValueError("diagonal_output=False (class covariances) needs pred_type='glm'.")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}.")
        with torch.set_grad_enabled(self.enable_backprop):
            inputs, posteriors = self._predict_inputs(x)
            step = chunk_size or self.chunk_size or len(inputs[0])
            if not diagonal_output:
                return glm_covariance_chunks(self.heads, posteriors, inputs, step)
            if self.enable_backprop:  # new tensors per chunk keep the graph
                chunks = list(moment_chunks(self.heads, posteriors, inputs, pred_type, step))
                return torch.cat([m for m, _ in chunks]), torch.cat([v for _, v in chunks])
            # preallocated outputs: peak memory is N x C plus one chunk's working set
            mean = inputs[0].new_empty(len(inputs[0]), len(inputs[2]))
            var = torch.empty_like(mean)
            for _ in moment_chunks(self.heads, posteriors, inputs, pred_type, step, (mean, var)):
                pass
            return mean, var

    def functional_samples(
        self,
        x: Any,
        pred_type: str | PredType = PredType.NN,
        n_samples: int = 100,
        diagonal_output: bool = False,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Samples of the logits of all images and classes, `(S, N, C)`.

        Parameters
        ----------
        x : dict or torch.Tensor
            as for :meth:`predictive_moments`.
        pred_type : {'nn', 'glm', 'probcosine', 'probcosine_diag'}, default='nn'
            ``nn``: weights sampled from the posterior of both heads (one draw shared by all
            inputs) through the exact normalisation, the faithful joint samples; ``glm``: the
            same draws through the linearisation; the ProbCosine types: independent Gaussian
            samples of their logit moments.
        n_samples : int, default=100
            S.
        diagonal_output : bool, default=False
            ``glm`` only: independent samples of the diagonal of its logit covariance, as in
            laplace.
        generator : torch.Generator, optional
            randomness of the draws.
        """
        pred_type = parse_option(PredType, pred_type, "pred_type")
        if pred_type is PredType.MAP:
            raise ValueError("pred_type='map' has no samples: it is the deterministic model.")
        if diagonal_output and pred_type is not PredType.GLM:
            raise ValueError("diagonal_output=True needs pred_type='glm'.")
        if n_samples < 1:
            raise ValueError(f"n_samples must be a positive integer, got {n_samples}.")
        if pred_type is not PredType.NN and (diagonal_output or pred_type is not PredType.GLM):
            mean, var = self.predictive_moments(x, pred_type)
            return sample_logits(mean, var, n_samples, generator)
        with torch.set_grad_enabled(self.enable_backprop):
            inputs, posteriors = self._predict_inputs(x)
            chunks = logit_sample_chunks(self.heads, posteriors, inputs, pred_type, n_samples,
                                         generator, len(inputs[0]))  # fmt: skip
            return torch.cat(list(chunks), 1)

    def _mc_probabilities(self, x, pred_type, n_samples, generator, apply_link) -> torch.Tensor:
        """Monte Carlo probabilities `(N, C)`, averaged chunk by chunk (memory bounded)."""
        generator = torch.default_generator if generator is None else generator
        with torch.set_grad_enabled(self.enable_backprop):
            inputs, posteriors = self._predict_inputs(x)
            step = self.chunk_size or max(1, _MC_MAX_ELEMENTS // (n_samples * len(inputs[2])))
            if pred_type in (PredType.GLM, PredType.NN):  # joint weight-space samples
                chunks = logit_sample_chunks(self.heads, posteriors, inputs, pred_type, n_samples,
                                             generator, step)  # fmt: skip
            else:  # independent Gaussian logits with the ProbCosine moments
                moments = moment_chunks(self.heads, posteriors, inputs, pred_type, step)
                chunks = (sample_logits(m, v, n_samples, generator) for m, v in moments)
            return torch.cat([apply_link(f).mean(0) for f in chunks])

    def predictive_samples(
        self,
        x: Any,
        pred_type: str | PredType = PredType.NN,
        n_samples: int = 100,
        diagonal_output: bool = False,
        generator: torch.Generator | None = None,
        link: str = "softmax",
    ) -> torch.Tensor:
        """Samples of the class probabilities, `(S, N, C)`.

        Parameters are those of :meth:`functional_samples`, and ``link`` ('softmax' over
        classes or SigLIP's per-pair 'sigmoid') applied to each logit sample.
        """
        f = self.functional_samples(x, pred_type, n_samples, diagonal_output, generator)
        return link_function(link)(f)

    def __call__(
        self,
        x: Any,
        pred_type: str | PredType = PredType.PROBCOSINE,
        joint: bool = False,
        link_approx: str | LinkApprox = LinkApprox.PROBIT,
        n_samples: int = 100,
        diagonal_output: bool = False,
        generator: torch.Generator | None = None,
        fitting: bool = False,
        link: str = "softmax",
        **model_kwargs: Any,
    ) -> torch.Tensor:
        """Predictive class probabilities, `(N, C)`.

        Parameters
        ----------
        x : dict or torch.Tensor
            ``{"image": (N, ...), "text": (C, ...)}`` (activations, or images and tokens in
            model mode, optionally with ``"image_residual"``/``"text_residual"``), or images
            scored against the classes of :meth:`set_classes`.
        pred_type : {'probcosine', 'probcosine_diag', 'glm', 'nn', 'map'}, default='probcosine'
            the logit moments (see :meth:`predictive_moments`), weight sampling through the
            exact normalisation (``nn``, needs ``link_approx='mc'``), or the MAP model.
        joint : bool, default=False
            laplace's joint regression predictive; must be False (classification).
        link_approx : {'probit', 'mc', 'bridge', 'bridge_norm'}, default='probit'
            the probit approximation on the moments, Monte Carlo (see
            :meth:`functional_samples`), or laplace's Laplace bridge (full class covariance for
            ``glm``, diagonal for the ProbCosine types).
        n_samples : int, default=100
            Monte Carlo samples for ``link_approx='mc'``.
        diagonal_output : bool, default=False
            with ``pred_type='glm', link_approx='mc'``: sample the diagonal of the class
            covariance only, as in laplace.
        generator : torch.Generator, optional
            randomness for ``link_approx='mc'``.
        fitting : bool, default=False
            laplace's reward-modelling switch (its gridsearch passes True); no effect for
            classification, as upstream.
        link : {'softmax', 'sigmoid'}, default='softmax'
            a distribution over classes, or SigLIP's independent per-pair probabilities.
        **model_kwargs
            laplace passes these to the model's forward; the heads take none, so any raises.

        Returns
        -------
        probs : torch.Tensor
            `(N, C)`.
        """
        pred_type = parse_option(PredType, pred_type, "pred_type")
        link_approx = parse_option(LinkApprox, link_approx, "link_approx")
        if joint:
            raise ValueError("joint=True is only defined for regression in laplace.")
        if model_kwargs:
            raise ValueError(f"unexpected arguments {sorted(model_kwargs)}: the heads take none.")
        if diagonal_output and not (pred_type is PredType.GLM and link_approx is LinkApprox.MC):
            raise ValueError("diagonal_output=True needs pred_type='glm' and link_approx='mc'.")
        apply_link = link_function(link)
        if pred_type is PredType.MAP:
            return apply_link(self.predictive_moments(x, PredType.MAP)[0])
        if pred_type is PredType.NN and link_approx is not LinkApprox.MC:
            raise ValueError("pred_type='nn' needs link_approx='mc'.")
        if link_approx is LinkApprox.MC:
            if diagonal_output:
                f = self.functional_samples(x, pred_type, n_samples, True, generator)
                return apply_link(f).mean(0)
            return self._mc_probabilities(x, pred_type, n_samples, generator, apply_link)
        if link_approx is LinkApprox.PROBIT:
            return probit_link(link)(*self.predictive_moments(x, pred_type))
        if link != "softmax":
            raise ValueError("the Laplace bridge is a softmax link: use link='softmax'.")
        self._bridge_pred_type = pred_type
        try:  # laplace's bridge code, reading our moments through its hook
            return KronLaplace._glm_forward_call(self, x, "classification", link_approx=link_approx)
        finally:
            del self._bridge_pred_type

    def _glm_predictive_distribution(self, X: Any, joint: bool = False, diagonal_output=False):
        """laplace's hook: the logit mean `(N, C)` and covariance `(N, C, C)`.

        The linearised (``glm``) class covariance; for a ProbCosine bridge (set by
        :meth:`__call__`) the diagonal covariance of its moments.
        """
        pred_type = getattr(self, "_bridge_pred_type", PredType.GLM)
        if pred_type is PredType.GLM:
            return self.predictive_moments(X, PredType.GLM, diagonal_output=False)
        mean, var = self.predictive_moments(X, pred_type)
        return mean, torch.diag_embed(var)

    def state_dict(self) -> dict[str, Any]:
        """laplace's state dict plus what rebuilds this posterior without the model.

        Adds the contrastive type, the posterior form, the curvature backend, the heads'
        tensors and their fingerprint. Only tensors, plain strings and numbers: loads under
        ``torch.load(weights_only=True)``, and :meth:`save` writes exactly this.
        """
        state = super().state_dict()
        state["likelihood"] = _plain(self.likelihood)
        heads = {k: v for k, v in self.heads.state_dict().items()
                 if v is not None and not k.startswith("class_")}  # fmt: skip
        state.update(
            joint_bias=[self.heads.joint["image"], self.heads.joint["text"]],
            contrastive=self.contrastive,
            damping=_damping_value(self.posterior_form),
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
        super().load_state_dict(state_dict)

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
        if _posterior_form(state["damping"]) is not self.posterior_form:
            raise ValueError(
                f"saved with damping={state['damping']!r}, this posterior has "
                f"damping={_damping_value(self.posterior_form)!r}."
            )

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> None:
        """Write :meth:`state_dict` to a safetensors file (atomic; never pickle).

        Parameters
        ----------
        path : str or os.PathLike
            the file.
        overwrite : bool, default=False
            replace an existing file; otherwise a ``FileExistsError``.
        """
        save_state(path, self.state_dict(), overwrite=overwrite)

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
            ``curvature`` and ``enable_backprop`` default to the saved ones.
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
        la = cls(model, **kwargs)
        la.load_state_dict(state)
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
        """
        factors = read_bayesvlm_factors(directory)
        if isinstance(prior_precision, str):
            if prior_precision != "released":
                raise ValueError(
                    f"prior_precision must be 'released' or numbers, got {prior_precision!r}."
                )
            prior_precision = read_bayesvlm_prior(directory)
        la = cls(model, temperature=1.0 / pseudo_count, prior_precision=prior_precision,
                 damping=damping, **kwargs)  # fmt: skip
        if any(la._has_bias):
            raise ValueError("the released CLIP factors are for heads without bias.")
        D_i, d_i, D_t, d_t = la._dims
        for name, dim in {"A_img": d_i, "B_img": D_i, "A_txt": d_t, "B_txt": D_t}.items():
            if factors[name].shape[0] != dim:
                raise ValueError(
                    f"{name} is {tuple(factors[name].shape)} but the model's head needs "
                    f"({dim}, {dim}): these factors belong to another model."
                )
        like = la.heads.image_projection.weight
        la._set_factors(FactorSums.from_bayesvlm(factors, n_data, like))
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


def _plain(value: Any) -> str:
    """laplace's str-Enums (``PredType.GLM``) as their plain values."""
    return str(getattr(value, "value", value))


def _damping_value(form: PosteriorForm) -> bool | str:
    """The ``damping`` argument that builds ``form`` (a plain bool or string, for state dicts)."""
    return form.value if form is PosteriorForm.SYMMETRIC else form is PosteriorForm.DAMPED


def _posterior_form(damping: Any) -> PosteriorForm:
    """``damping`` (False, True or 'symmetric') as a :class:`PosteriorForm`."""
    if isinstance(damping, bool):
        return PosteriorForm.DAMPED if damping else PosteriorForm.EXACT
    if damping == PosteriorForm.SYMMETRIC:
        return PosteriorForm.SYMMETRIC
    raise ValueError(f"damping must be False, True or 'symmetric', got {damping!r}.")
