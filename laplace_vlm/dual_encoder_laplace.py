"""``DualEncoderLaplace``: KFAC Laplace over the two projection heads of a dual encoder."""

from __future__ import annotations

import warnings
from typing import Any

import torch
import tqdm
from laplace import KronLaplace
from laplace.utils.matrix import KronDecomposed
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import parameters_to_vector

from laplace_vlm.predictive.chunks import (
    glm_covariance_chunks,
    logit_sample_chunks,
    moment_chunks,
)
from laplace_vlm.curvature import curvature_name, get_curvature_backend
from laplace_vlm.curvature.distributed import all_reduce_sums, failures_shared_across_ranks
from laplace_vlm.curvature.factor_sums import FactorSums
from laplace_vlm.io.fit_checkpoint import FitCheckpoint, checkpoint_key
from laplace_vlm.posterior.head_posterior import HeadPosterior
from laplace_vlm.heads import DualHead, build_heads
from laplace_vlm.inputs import InputEncoder
from laplace_vlm.curvature.likelihoods import check_contrastive, pair_loss
from laplace_vlm.predictive.moments import (
    PREDICTIVE_METHODS,
    link_function,
    probit_sigmoid,
    probit_softmax,
)
from laplace_vlm.io.bayesvlm import load_bayesvlm
from laplace_vlm.io.posterior_file import (
    check_compatible,
    heads_fingerprint,
    load_laplace,
    save_laplace,
)
from laplace_vlm.validation import check_finite, check_nonzero_norm, check_positive

PRED_TYPES = ("glm", "probcosine", "probcosine_diag", "nn", "map")
LINK_APPROXIMATIONS = ("probit", "mc", "bridge", "bridge_norm")


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
    temperature : float, default=1
        ``1 / n`` for the paper's pseudo-data count ``n``.
    damping : bool, default=False
        ``(sqrt(h) F0 + sqrt(delta) I) x (sqrt(h) F1 + sqrt(delta) I)`` instead of the exact prior.
    **kwargs
        the remaining arguments of ``laplace.KronLaplace``.
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
        **kwargs: Any,
    ) -> None:
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
        heads = build_heads(image_projection, text_projection, logit_scale, logit_bias)
        super().__init__(heads, likelihood, backend=None, **kwargs)
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
        """Posterior precision; upstream drops ``damping`` when adding the prior: keep it."""
        self._check_H_init()
        P = self.H * self._H_factor + self.prior_precision
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

    def optimize_prior_precision(self, *args: Any, **kwargs: Any) -> None:
        """laplace's tuning (marglik or gridsearch), without its reminder about ``link_approx``
        (irrelevant to marglik; gridsearch passes ``link_approx`` on to :meth:`__call__`)."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="By default `link_approx` is `probit`")
            super().optimize_prior_precision(*args, **kwargs)

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
            sums, done = ckpt.resume(sums)
        self.model.eval()
        pbar = tqdm.tqdm(train_loader, disable=not progress_bar, desc="[KFAC]")
        seen = 0
        with failures_shared_across_ranks():
            for seen, batch in enumerate(pbar, start=1):
                if seen <= done:  # counted before the interruption
                    continue
                sums += self._batch_sums(batch)
                if ckpt is not None:
                    ckpt.maybe_save(sums, seen)
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
        a_i, r_i, a_t, r_t = self.inputs.pair(batch)
        heads, fn = self.heads, get_curvature_backend(self.curvature)
        with torch.no_grad():
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
        a_t, r_t = self.inputs.features("text", text, residual)
        self.heads.set_classes(a_t, r_t)

    def embedding_moments(
        self, x: Any, full: bool = False
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Mean and variance (or covariance) of both embeddings under the posterior.

        Returns
        -------
        moments : dict
            ``{"image": (mean (N, D), var (N, D) or cov (N, D, D)), "text": (mean (C, D), ...)}``
        """
        a_i, r_i, a_t, r_t = self.inputs.predict(x)
        post_i, post_t = self.head_posteriors()
        with torch.no_grad():
            z, t = self.heads.embed_image(a_i, r_i), self.heads.embed_text(a_t, r_t)
        spread = (lambda p, a: p.covariance(a)) if full else (lambda p, a: p.variance(a))
        return {"image": (z, spread(post_i, a_i)), "text": (t, spread(post_t, a_t))}

    def predictive_moments(
        self,
        x: Any,
        method: str = "probcosine",
        diagonal_output: bool = True,
        chunk_size: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance of the similarity logits, `(N, C)` each.

        Parameters
        ----------
        x : dict or torch.Tensor
            ``{"image": (N, ...), "text": (C, ...)}`` or images scored against ``set_classes``.
        method : {'probcosine', 'probcosine_diag', 'glm'}, default='probcosine'
            moment matching with full or diagonal embedding covariances, or laplace's
            linearised predictive.
        diagonal_output : bool, default=True
            ``False`` returns the `(N, C, C)` covariance over classes (``glm`` only).
        chunk_size : int, optional
            images per chunk (defaults to the constructor's); peak memory independent of N.
        """
        if method not in PREDICTIVE_METHODS:
            raise ValueError(f"method must be one of {PREDICTIVE_METHODS}, got {method!r}.")
        if not diagonal_output and method != "glm":
            raise ValueError("diagonal_output=False (class covariances) needs method='glm'.")
        inputs = self.inputs.predict(x)
        step = chunk_size or self.chunk_size or len(inputs[0])
        if not diagonal_output:
            return glm_covariance_chunks(self, inputs, step)
        # preallocated outputs: peak memory is N x C plus one chunk's working set
        mean = inputs[0].new_empty(len(inputs[0]), len(inputs[2]))
        var = torch.empty_like(mean)
        for _ in moment_chunks(self, inputs, method, step, out=(mean, var)):
            pass
        return mean, var

    def functional_samples(
        self,
        x: Any,
        pred_type: str = "glm",
        n_samples: int = 100,
        diagonal_output: bool = False,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Joint samples of the logits of all images and classes, `(S, N, C)`.

        Weights are sampled from the posterior of both heads (one draw shared by all
        inputs); ``glm`` propagates them through the linearisation, ``nn`` through the
        normalisation exactly.
        """
        pred_type = _check_sample_type(pred_type)
        inputs = self.inputs.predict(x)
        chunks = logit_sample_chunks(self, inputs, pred_type, n_samples, generator, len(inputs[0]))
        return torch.cat(list(chunks), 1)

    def _mc_probabilities(self, x, pred_type, n_samples, generator, apply_link) -> torch.Tensor:
        """Monte Carlo probabilities `(N, C)`, averaged chunk by chunk (memory S x chunk x C)."""
        inputs, step = self.inputs.predict(x), self.chunk_size or 4096
        if pred_type in ("glm", "nn"):
            chunks = logit_sample_chunks(self, inputs, pred_type, n_samples, generator, step)
            return torch.cat([apply_link(f).mean(0) for f in chunks])
        probs = []  # moment matching: independent Gaussian logits per (image, class)
        for mean, var in moment_chunks(self, inputs, pred_type, step):
            eps = torch.randn((n_samples, *mean.shape), generator=generator, dtype=mean.dtype)
            probs.append(apply_link(mean + var.sqrt() * eps.to(mean.device)).mean(0))
        return torch.cat(probs)

    def predictive_samples(
        self,
        x: Any,
        pred_type: str = "glm",
        n_samples: int = 100,
        diagonal_output: bool = False,
        generator: torch.Generator | None = None,
        link: str = "softmax",
    ) -> torch.Tensor:
        """Samples of the class probabilities, `(S, N, C)`."""
        f = self.functional_samples(x, pred_type, n_samples, diagonal_output, generator)
        return link_function(link)(f)

    def __call__(
        self,
        x: Any,
        pred_type: str = "glm",
        joint: bool = False,
        link_approx: str = "probit",
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
        pred_type : {'glm', 'probcosine', 'probcosine_diag', 'nn', 'map'}
            the logit moments (see :meth:`predictive_moments`), weight sampling through the
            exact normalisation (``nn``, needs ``link_approx='mc'``), or the MAP model.
        link_approx : {'probit', 'mc', 'bridge', 'bridge_norm'}
        link : {'softmax', 'sigmoid'}, default='softmax'
            a distribution over classes, or SigLIP's independent per-pair probabilities.
        """
        pred_type, link_approx = _plain(pred_type), _plain(link_approx)
        if pred_type not in PRED_TYPES:
            raise ValueError(f"pred_type must be one of {PRED_TYPES}, got {pred_type!r}.")
        if link_approx not in LINK_APPROXIMATIONS:
            raise ValueError(
                f"link_approx must be one of {LINK_APPROXIMATIONS}, got {link_approx!r}."
            )
        if joint:
            raise ValueError("joint=True is only defined for regression in laplace.")
        apply_link = link_function(link)
        if pred_type == "map":
            a_i, r_i, a_t, r_t = self.inputs.predict(x)
            with torch.no_grad():
                return apply_link(self.heads({"image": a_i, "text": a_t, "image_residual": r_i,
                                              "text_residual": r_t}))  # fmt: skip
        if pred_type == "nn" and link_approx != "mc":
            raise ValueError("pred_type='nn' needs link_approx='mc'.")
        if link_approx == "mc":
            return self._mc_probabilities(x, pred_type, n_samples, generator, apply_link)
        if link_approx == "probit":
            mean, var = self.predictive_moments(x, method=pred_type)
            return probit_sigmoid(mean, var) if link == "sigmoid" else probit_softmax(mean, var)
        if link == "sigmoid":
            raise ValueError("the Laplace bridge is a softmax link: use link='softmax'.")
        return self._bridge(x, pred_type, link_approx)

    def _bridge(self, x: Any, pred_type: str, link_approx: str) -> torch.Tensor:
        """Reuse laplace's Laplace-bridge code on our moments (full covariance for glm)."""
        if pred_type == "glm":
            mean, cov = self.predictive_moments(x, method="glm", diagonal_output=False)
        else:
            mean, var = self.predictive_moments(x, method=pred_type)
            cov = torch.diag_embed(var)
        self._glm_predictive_distribution = lambda *_, **__: (mean, cov)
        try:
            return KronLaplace._glm_forward_call(self, x, "classification", link_approx=link_approx)
        finally:
            del self._glm_predictive_distribution

    def _glm_predictive_distribution(self, X: Any, joint: bool = False, diagonal_output=False):
        """laplace's hook: the linearised logit mean `(N, C)` and covariance `(N, C, C)`."""
        return self.predictive_moments(X, method="glm", diagonal_output=False)

    def _nn_predictive_classification(self, X: Any, n_samples: int = 100, **kwargs: Any):
        return self.predictive_samples(X, "nn", n_samples).mean(0)

    def state_dict(self) -> dict[str, Any]:
        """laplace's state dict plus the contrastive type and a fingerprint of the heads.

        Only tensors, plain strings and numbers: loads under ``torch.load(weights_only=True)``.
        """
        state = super().state_dict()
        state["likelihood"] = _plain(self.likelihood)
        state.update(
            contrastive=self.contrastive,
            damping=bool(self.damping),
            fingerprint=heads_fingerprint(self.heads),
        )
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        check_compatible(self, state_dict)
        super().load_state_dict(state_dict)

    def save(self, path: str, overwrite: bool = False) -> None:
        """Save the fitted posterior (factors, prior, heads) to a safetensors file."""
        save_laplace(self, path, overwrite=overwrite)

    @classmethod
    def load(cls, path: str, model: nn.Module | None = None, **kwargs: Any) -> DualEncoderLaplace:
        """Load a posterior saved with :meth:`save`, for ``model`` (or the saved heads)."""
        return load_laplace(cls, path, model, **kwargs)

    @classmethod
    def from_bayesvlm(cls, directory: str, model: nn.Module | None = None, **kwargs: Any):
        """Posterior from the curvature files released with the paper's reference code."""
        return load_bayesvlm(cls, directory, model, **kwargs)


def _plain(value: Any) -> str:
    """laplace's str-Enums (``PredType.GLM``) as their plain values."""
    return str(getattr(value, "value", value))


def _check_sample_type(pred_type: Any) -> str:
    pred_type = _plain(pred_type)
    if pred_type not in ("glm", "nn"):
        raise ValueError(f"pred_type must be 'glm' or 'nn' for samples, got {pred_type!r}.")
    return pred_type
