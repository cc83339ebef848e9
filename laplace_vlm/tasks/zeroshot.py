"""Zero-shot classification with uncertainty from class names and prompt templates.

Prompts follow open_clip's conventions: a template is a ``"{}"``-format string (``"{c}"``
works too) or a callable ``classname -> prompt``. A class is represented by the **mean of the
pre-projection text activations** of its prompts. The projection head is linear, so the
embedding of that mean is exactly the mean of the prompts' (un-normalised) embeddings and the
head posterior applies to it unchanged. (open_clip's ``build_zero_shot_classifier`` instead
averages *normalised* embeddings; the argmax of the two usually agrees, the probabilities
differ slightly.)

For every image the classifier returns the probabilities, the mean and variance of each
logit, the predictive entropy and the mutual information between the label and the head
weights (BALD: ``H[E p] - E H[p]`` by Monte Carlo over the Gaussian logits).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from laplace_vlm.docstrings import fill_doc
from laplace_vlm.enums import LinkApprox, PredType, parse_option
from laplace_vlm.predictive.links import sample_logits
from laplace_vlm.predictive.uncertainty import bald_from_samples, entropy
from laplace_vlm.validation import check_generator, check_int, check_matrix

Template = str | Callable[[str], str]

_fill_doc = fill_doc.extend(
    prompt_encoding="""
        classnames : sequence of str
            C names.
        templates : sequence of str or callable
            T templates, as in :func:`format_prompts`.
        batch_size : int, default=256
            prompts per forward pass.
        progress_bar : bool, default=False
            show a tqdm bar over the batches.
        """,
)


def format_prompts(classnames: Sequence[str], templates: Sequence[Template]) -> list[str]:
    """All prompts, class-major: ``[t(c0) for t in templates] + [t(c1) ...] + ...``.

    Parameters
    ----------
    classnames : sequence of str
        C names.
    templates : sequence of str or callable
        T templates: ``"a photo of a {}."`` / ``"a photo of a {c}."`` or ``lambda c: ...``.

    Returns
    -------
    prompts : list of str
        `C * T` prompts.
    """
    if len(classnames) == 0:
        raise ValueError("classnames must not be empty.")
    if len(templates) == 0:
        raise ValueError("templates must not be empty.")
    return [_fill(t, c) for c in classnames for t in templates]


def _fill(template: Template, classname: str) -> str:
    if callable(template):
        return template(classname)
    if "{" not in template:
        raise ValueError(f"template {template!r} has no '{{}}' placeholder for the class name.")
    return template.format(classname, c=classname)


@_fill_doc
def class_text_activations(
    adapter,
    tokenizer: Callable[[list[str]], torch.Tensor],
    classnames: Sequence[str],
    templates: Sequence[Template],
    batch_size: int = 256,
    progress_bar: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Template-ensembled pre-projection text activations of every class.

    Parameters
    ----------
    adapter : object
        ``laplace_vlm.adapters`` adapter (``encode_text(tokens) -> Features``).
    tokenizer : callable
        list of str -> token tensor, e.g. ``open_clip.get_tokenizer(name)``.
    %(prompt_encoding)s

    Returns
    -------
    activations : torch.Tensor
        `(C, d_txt)` mean over the templates.
    residual : torch.Tensor or None
        `(C, D)` mean residual offset (SigLIP-like heads), None where the head has none.
    """
    batch_size = check_int("batch_size", batch_size)
    prompts = format_prompts(classnames, templates)
    acts, residuals = [], []
    starts = range(0, len(prompts), batch_size)
    with torch.no_grad():
        for start in tqdm(starts, desc="encoding prompts", disable=not progress_bar):
            features = adapter.encode_text(tokenizer(prompts[start : start + batch_size]))
            acts.append(features.activations)
            residuals.append(features.residual)
    shape = (len(classnames), len(templates), -1)
    activations = torch.cat(acts).reshape(shape).mean(1)
    residual = None if residuals[0] is None else torch.cat(residuals).reshape(shape).mean(1)
    return activations, residual


@dataclass
@fill_doc
class ZeroShotPrediction:
    """Per-image zero-shot output.

    Attributes
    ----------
    %(probs)s
    logit_mean, logit_var : torch.Tensor
        `(N, C)` mean and variance of the logits (variance 0 for ``"map"``).
    %(probs_entropy)s
    mutual_information : torch.Tensor
        `(N,)` BALD mutual information (epistemic part), nats.
    """

    probs: torch.Tensor
    logit_mean: torch.Tensor
    logit_var: torch.Tensor
    entropy: torch.Tensor
    mutual_information: torch.Tensor

    @property
    def predictions(self) -> torch.Tensor:
        """`(N,)` most probable class."""
        return self.probs.argmax(-1)


class ZeroShotClassifier:
    """A fitted posterior plus the class prompts: images in, uncertain predictions out.

    Parameters
    ----------
    la : DualEncoderLaplace
        fitted posterior, feature or model mode (both take pre-projection activations).
    class_activations : torch.Tensor
        `(C, d_txt)` class text activations (e.g. from :func:`class_text_activations`).
    classnames : sequence of str, optional
        C names, kept for reports.
    class_residual : torch.Tensor, optional
        `(C, D)` residual offsets of the text embeddings.

    Raises
    ------
    TypeError
        if ``la`` has no ``predictive_moments`` (not a fitted posterior) or the class tensors
        are not float tensors.
    ValueError
        for class tensors that are not finite non-empty matrices, a residual of another row
        count, or one name per class missing.
    """

    def __init__(
        self,
        la,
        class_activations: torch.Tensor,
        classnames: Sequence[str] | None = None,
        class_residual: torch.Tensor | None = None,
    ) -> None:
        if not callable(getattr(la, "predictive_moments", None)):
            raise TypeError(f"la must be a fitted DualEncoderLaplace, got {type(la).__name__}.")
        check_matrix("class_activations", class_activations)
        if class_residual is not None:
            check_matrix("class_residual", class_residual)
            if len(class_residual) != len(class_activations):
                raise ValueError(
                    f"class_residual must have {len(class_activations)} rows (one per class), "
                    f"got {len(class_residual)}."
                )
        if classnames is not None and len(classnames) != len(class_activations):
            raise ValueError(
                f"classnames has {len(classnames)} names for {len(class_activations)} classes."
            )
        self.la = la
        self.class_activations = class_activations
        self.class_residual = class_residual
        self.classnames = None if classnames is None else tuple(classnames)

    @classmethod
    @_fill_doc
    def from_prompts(
        cls,
        la,
        adapter,
        tokenizer: Callable[[list[str]], torch.Tensor],
        classnames: Sequence[str],
        templates: Sequence[Template],
        batch_size: int = 256,
        progress_bar: bool = False,
    ) -> ZeroShotClassifier:
        """Encode ``templates x classnames`` with ``adapter`` and ensemble per class.

        Parameters
        ----------
        la : DualEncoderLaplace
            fitted posterior.
        adapter : object
            ``laplace_vlm.adapters`` adapter of the model ``la`` was fitted for.
        tokenizer : callable
            list of str -> token tensor.
        %(prompt_encoding)s

        Returns
        -------
        ZeroShotClassifier
            with the :func:`class_text_activations` of the prompts.
        """
        acts, residual = class_text_activations(
            adapter, tokenizer, classnames, templates, batch_size, progress_bar
        )
        return cls(la, acts, classnames, residual)

    def inputs(
        self, image_activations: torch.Tensor, image_residual: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """The ``{"image", "text"}`` input dict of ``la`` (residuals only where present).

        Parameters
        ----------
        image_activations : torch.Tensor
            `(N, d_img)` pre-projection image activations.
        image_residual : torch.Tensor, optional
            `(N, D)` residual offsets of the image embeddings.

        Returns
        -------
        dict of str to torch.Tensor
            ``"image"``, ``"text"`` (the class activations), and ``"image_residual"`` /
            ``"text_residual"`` where given.
        """
        x = {"image": image_activations, "text": self.class_activations}
        if image_residual is not None:
            x["image_residual"] = image_residual
        if self.class_residual is not None:
            x["text_residual"] = self.class_residual
        return x

    def predict(
        self,
        image_activations: torch.Tensor,
        image_residual: torch.Tensor | None = None,
        pred_type: str = "probcosine",
        link_approx: str = "probit",
        n_samples: int = 100,
        generator: torch.Generator | None = None,
    ) -> ZeroShotPrediction:
        """Zero-shot prediction with uncertainty for a batch of images.

        Parameters
        ----------
        image_activations : torch.Tensor
            `(N, d_img)` pre-projection image activations.
        image_residual : torch.Tensor, optional
            `(N, D)` residual offsets of the image embeddings.
        pred_type : {'probcosine', 'probcosine_diag', 'glm', 'nn', 'map'}, default='probcosine'
            logit moments; ``"nn"`` is exact Monte Carlo (weights through the normalisation,
            needs ``link_approx='mc'``; moments and mutual information from its samples);
            ``"map"`` is the deterministic model.
        link_approx : {'probit', 'mc', 'bridge', 'bridge_norm'}, default='probit'
            ``probit``: closed form on the moments. ``mc``: ``n_samples`` joint samples of the
            logits through the linearisation (``glm``: weight-space samples, so classes are
            correlated) or independent Gaussian samples of the moments (ProbCosine).
            ``bridge*``: laplace's Laplace bridge through ``la``.
        n_samples : int, default=100
            Monte Carlo samples (mutual information, and ``link_approx="mc"``).
        generator : torch.Generator, optional
            randomness of the Monte Carlo estimates; a generator seeded with 0 if None, so
            repeated calls agree.

        Returns
        -------
        prediction : ZeroShotPrediction
            the mutual information comes from the same samples as the probabilities for
            ``mc`` and from independent samples of the logit moments otherwise.

        Raises
        ------
        TypeError
            for a non-integer ``n_samples`` or a ``generator`` that is not a
            ``torch.Generator``.
        ValueError
            for an unknown option, ``pred_type='nn'`` without ``link_approx='mc'``, or
            ``n_samples < 1``.
        """
        pred_type = parse_option(PredType, pred_type, "pred_type")
        link_approx = parse_option(LinkApprox, link_approx, "link_approx")
        n_samples = check_int("n_samples", n_samples)
        check_generator("generator", generator)
        if pred_type is PredType.NN and link_approx is not LinkApprox.MC:
            raise ValueError("pred_type='nn' needs link_approx='mc'.")
        generator = torch.Generator().manual_seed(0) if generator is None else generator
        x = self.inputs(image_activations, image_residual)
        with torch.no_grad():
            if pred_type is PredType.MAP:
                mean = self.la.predictive_moments(x, pred_type=PredType.MAP)[0]
                var = torch.zeros_like(mean)
                probs, mi = torch.softmax(mean, dim=-1), mean.new_zeros(len(mean))
                return ZeroShotPrediction(probs, mean, var, entropy(probs), mi)
            if pred_type is PredType.NN:  # exact MC: the moments are those of the samples
                f = self.la.functional_samples(x, PredType.NN, n_samples, generator=generator)
                probs = torch.softmax(f, -1).mean(0)
                return ZeroShotPrediction(probs, f.mean(0), f.var(0), entropy(probs),
                                          bald_from_samples(f))  # fmt: skip
            mean, var = self.la.predictive_moments(x, pred_type=pred_type)
            if link_approx is LinkApprox.MC:
                samples = self._logit_samples(x, pred_type, mean, var, n_samples, generator)
                probs, mi = torch.softmax(samples, -1).mean(0), bald_from_samples(samples)
            else:
                probs = self.la(x, pred_type=pred_type, link_approx=link_approx)
                mi = bald_from_samples(sample_logits(mean, var, n_samples, generator))
        return ZeroShotPrediction(probs, mean, var, entropy(probs), mi)

    def _logit_samples(self, x, pred_type, mean, var, n_samples, generator) -> torch.Tensor:
        """`(S, N, C)` logit samples: joint weight-space samples for ``glm``."""
        if pred_type is PredType.GLM:
            return self.la.functional_samples(x, "glm", n_samples, generator=generator)
        return sample_logits(mean, var, n_samples, generator)
