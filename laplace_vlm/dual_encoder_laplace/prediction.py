"""Prediction of :class:`~laplace_vlm.DualEncoderLaplace`: the one dispatch of ``pred_type``.

Moments (:meth:`PredictionMixin.predictive_moments`), samples and probabilities
(``__call__``) in laplace's API; zero-shot, retrieval, active learning and the demos call
these, never the formulas.
"""

from __future__ import annotations

from typing import Any

import torch

from laplace_vlm.docstrings import fill_doc
from laplace_vlm.enums import MOMENT_PRED_TYPES, Link, LinkApprox, PredType, parse_option
from laplace_vlm.predictive.chunks import (
    glm_covariance_chunks,
    logit_sample_chunks,
    moment_chunks,
)
from laplace_vlm.predictive.links import laplace_bridge, link_function, probit_link, sample_logits
from laplace_vlm.validation import check_bool, check_generator, check_int, check_optional_int

# Monte Carlo predictive without chunk_size: images per chunk keep S x chunk x C below this
_MC_MAX_ELEMENTS = 2**22

# the logit samples' parameters: predictive_samples is the link of functional_samples
_fill_doc = fill_doc.extend(
    logit_sample_parameters="""
        x : dict or torch.Tensor
            as for :meth:`predictive_moments`.
        pred_type : {'nn', 'glm', 'probcosine', 'probcosine_diag'}, default='nn'
            ``nn``: weights sampled from the posterior of both heads (one draw shared by all
            inputs) through the exact normalisation, the faithful joint samples; ``glm``: the
            same draws through the linearisation; the ProbCosine types: independent Gaussian
            samples of their logit moments. The default differs from laplace's ``'glm'``:
            laplace defaults to the linearisation because pushing weight samples through a
            whole network is expensive and off the GGN's model; here the weights are two
            linear heads, a sample costs one GEMM per head, and ``nn`` is exact for the
            normalised cosine the linearisation only approximates.
        n_samples : int, default=100
            ``S >= 1``, the number of samples.
        diagonal_output : bool, default=False
            laplace's meaning: sample from the diagonal of the logit covariance only
            (independent classes); ``glm`` only.
        generator : torch.Generator, optional
            randomness of the draws.
        """,
)


class PredictionMixin:
    """The predictive methods; they need ``inputs``, ``heads``, ``head_posteriors()``."""

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
        check_bool("full", full)
        with torch.set_grad_enabled(self.enable_backprop):
            (a_i, r_i, a_t, r_t), (post_i, post_t) = self._predict_inputs(x)
            z, t = self.heads.embed_image(a_i, r_i), self.heads.embed_text(a_t, r_t)
            spread = (lambda p, a: p.covariance(a)) if full else (lambda p, a: p.variance(a))
            return {"image": (z, spread(post_i, a_i)), "text": (t, spread(post_t, a_t))}

    def predictive_moments(
        self,
        x: Any,
        pred_type: str | PredType = PredType.PROBCOSINE,
        class_covariance: bool = False,
        chunk_size: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance of the similarity logits, `(N, C)` each.

        Parameters
        ----------
        x : dict or tuple or torch.Tensor
            ``{"image": (N, ...), "text": (C, ...)}``, a fit batch ``(image, text)``, or images
            scored against ``set_classes``.
        pred_type : {'probcosine', 'probcosine_diag', 'glm', 'map'}, default='probcosine'
            moment matching of the cosine with full or diagonal embedding covariances,
            laplace's linearised predictive, or the deterministic logits (variance 0).
        class_covariance : bool, default=False
            return the `(N, C, C)` covariance over the classes instead of its diagonal
            (``glm`` only; what laplace's ``_glm_predictive_distribution`` gives with
            ``diagonal_output=False``).
        chunk_size : int, optional
            images per chunk (defaults to the constructor's); peak memory independent of N.

        Returns
        -------
        mean : torch.Tensor
            `(N, C)`.
        var : torch.Tensor
            `(N, C)`, or `(N, C, C)` with ``class_covariance=True``.

        Raises
        ------
        TypeError
            for a non-bool ``class_covariance`` or a non-integer ``chunk_size``.
        ValueError
            for another ``pred_type``, ``class_covariance`` without ``glm``, ``chunk_size < 1``
            or bad inputs (:class:`~laplace_vlm.inputs.InputEncoder`).
        """
        pred_type = parse_option(PredType, pred_type, "pred_type")
        check_bool("class_covariance", class_covariance)
        chunk_size = check_optional_int("chunk_size", chunk_size)
        if pred_type not in (*MOMENT_PRED_TYPES, PredType.MAP):
            options = tuple(p.value for p in (*MOMENT_PRED_TYPES, PredType.MAP))
            raise ValueError(
                f"pred_type must be one of {options} for moments, got {pred_type.value!r}."
            )
        if class_covariance and pred_type is not PredType.GLM:
            raise ValueError(
                f"class_covariance=True needs pred_type='glm', got {pred_type.value!r}: the other "
                "moments are per logit."
            )
        if pred_type is PredType.MAP:  # the deterministic logits
            with torch.set_grad_enabled(self.enable_backprop):
                a_i, r_i, a_t, r_t = self.inputs.predict(x)
                logits = self.heads({"image": a_i, "text": a_t, "image_residual": r_i,
                                     "text_residual": r_t})  # fmt: skip
            return logits, torch.zeros_like(logits)
        with torch.set_grad_enabled(self.enable_backprop):
            inputs, posteriors = self._predict_inputs(x)
            step = chunk_size or self.chunk_size or len(inputs[0])
            if class_covariance:
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

    @_fill_doc
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
        %(logit_sample_parameters)s

        Returns
        -------
        samples : torch.Tensor
            `(S, N, C)` logit samples (logit bias included).

        Raises
        ------
        TypeError
            for a non-integer ``n_samples``, a non-bool ``diagonal_output`` or a ``generator``
            that is not a ``torch.Generator``.
        ValueError
            for ``pred_type='map'`` or ``'gp'``, ``diagonal_output`` without ``glm``, or
            ``n_samples < 1``.
        """
        pred_type = _sampled_pred_type(pred_type, n_samples, diagonal_output, generator)
        if pred_type is not PredType.NN and (diagonal_output or pred_type is not PredType.GLM):
            mean, var = self.predictive_moments(x, pred_type)
            # None is torch's global generator here too, as for the weight samples (not
            # sample_logits' fixed seed 0)
            generator = torch.default_generator if generator is None else generator
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

    @_fill_doc
    def predictive_samples(
        self,
        x: Any,
        pred_type: str | PredType = PredType.NN,
        n_samples: int = 100,
        diagonal_output: bool = False,
        generator: torch.Generator | None = None,
        link: str = "softmax",
    ) -> torch.Tensor:
        """Samples of the class probabilities: the link of :meth:`functional_samples`.

        Parameters
        ----------
        %(logit_sample_parameters)s
        link : {'softmax', 'sigmoid'}, default='softmax'
            applied to each logit sample: a distribution over classes, or SigLIP's
            independent per-pair probabilities.

        Returns
        -------
        samples : torch.Tensor
            `(S, N, C)` probabilities.

        Raises
        ------
        TypeError, ValueError
            as :meth:`functional_samples`; ``ValueError`` for another ``link``.
        """
        apply_link = link_function(link)
        return apply_link(
            self.functional_samples(x, pred_type, n_samples, diagonal_output, generator)
        )

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
        x : dict or tuple or torch.Tensor
            ``{"image": (N, ...), "text": (C, ...)}`` (activations, or images and tokens in
            model mode, optionally with ``"image_residual"``/``"text_residual"``), a fit batch
            ``(image, text)``, or images scored against the classes of :meth:`set_classes`.
        pred_type : {'probcosine', 'probcosine_diag', 'glm', 'nn', 'map'}, default='probcosine'
            the logit moments (see :meth:`predictive_moments`), weight sampling through the
            exact normalisation (``nn``, needs ``link_approx='mc'``), or the MAP model. The
            default differs from laplace's ``'glm'``: the paper's predictive is ProbCosine,
            and the linearisation of the normalised cosine misses the spread of wide
            posteriors (``tests/test_predictive.py`` measures both against exact Monte Carlo).
        joint : bool, default=False
            laplace's joint regression predictive; must be False (classification).
        link_approx : {'probit', 'mc', 'bridge', 'bridge_norm'}, default='probit'
            the probit approximation on the moments, Monte Carlo (see
            :meth:`functional_samples`), or laplace's Laplace bridge (full class covariance for
            ``glm``, diagonal for the ProbCosine types).
        n_samples : int, default=100
            Monte Carlo samples for ``link_approx='mc'`` (``>= 1``).
        diagonal_output : bool, default=False
            laplace's meaning: with ``pred_type='glm', link_approx='mc'``, sample from the
            diagonal of the class covariance only. The other predictives have no class
            covariance to drop, so ``True`` raises for them.
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

        Raises
        ------
        TypeError
            for a non-bool switch, a non-integer ``n_samples`` or a ``generator`` that is not a
            ``torch.Generator``.
        ValueError
            for an unknown option, a combination laplace does not define (``joint=True``,
            ``pred_type='nn'`` without ``'mc'``, ``diagonal_output`` outside glm + mc, the
            bridge with ``link='sigmoid'``), ``n_samples < 1``, model keyword arguments, or
            bad inputs.
        """
        pred_type = _pred_type(pred_type)
        link_approx = parse_option(LinkApprox, link_approx, "link_approx")
        link = parse_option(Link, link, "link")
        for name, value in (("joint", joint), ("diagonal_output", diagonal_output),
                            ("fitting", fitting)):  # fmt: skip
            check_bool(name, value)
        n_samples = check_int("n_samples", n_samples)
        check_generator("generator", generator)
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
        if link is not Link.SOFTMAX:
            raise ValueError("the Laplace bridge is a softmax link: use link='softmax'.")
        # the bridge reads a class covariance: glm's full one, the ProbCosine diagonal ones
        mean, var = self.predictive_moments(
            x, pred_type, class_covariance=pred_type is PredType.GLM
        )
        cov = var if var.ndim == 3 else torch.diag_embed(var)
        return laplace_bridge(mean, cov, normalized=link_approx is LinkApprox.BRIDGE_NORM)

    def _glm_predictive_distribution(
        self, X: Any, joint: bool = False, diagonal_output: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """laplace's hook: the linearised logit mean `(N, C)` and covariance `(N, C, C)`.

        ``diagonal_output=True`` gives the `(N, C)` variances instead, as in laplace.
        """
        check_bool("joint", joint)
        if joint:
            raise ValueError("joint=True is only defined for regression in laplace.")
        return self.predictive_moments(X, PredType.GLM, class_covariance=not diagonal_output)


def _pred_type(value: Any) -> PredType:
    """``pred_type`` parsed; laplace's ``'gp'`` is a member but has no Kronecker predictive."""
    pred_type = parse_option(PredType, value, "pred_type")
    if pred_type is PredType.GP:
        raise ValueError(
            "pred_type='gp' is laplace's function-space (GP) predictive of FunctionalLaplace; "
            "DualEncoderLaplace is a Kronecker weight-space posterior: use 'probcosine', "
            "'probcosine_diag', 'glm', 'nn' or 'map'."
        )
    return pred_type


def _sampled_pred_type(pred_type: Any, n_samples: Any, diagonal_output: Any, generator: Any):
    """The checked arguments of :meth:`PredictionMixin.functional_samples`: its pred type."""
    pred_type = _pred_type(pred_type)
    check_int("n_samples", n_samples)
    check_bool("diagonal_output", diagonal_output)
    check_generator("generator", generator)
    if pred_type is PredType.MAP:
        raise ValueError("pred_type='map' has no samples: it is the deterministic model.")
    if diagonal_output and pred_type is not PredType.GLM:
        raise ValueError("diagonal_output=True needs pred_type='glm'.")
    return pred_type
