"""The fitted experiment the demo and the benchmark share: posterior, settings and predictions.

:func:`prepare` runs the recipe (splits, trained CLIP, zero-shot posterior), fits the
temperature-scaling baseline on the clean validation split, chooses the pseudo-count of every
Laplace predictive on clean validation NLPD (``evaluation.pseudo_count.select_pseudo_count``;
the prior precision is re-tuned by the marginal likelihood at every ``n``) and, optionally,
adds fixed pseudo-counts such as the paper's ``n = 10``. :meth:`Experiment.predict` then gives
every method's probabilities and uncertainty scores for a batch of image activations.

Methods: ``"map"`` (the deterministic model), ``"temperature"`` and ``"laplace_<pred_type>"``
for the predictives of ``LAPLACE_PREDICTIVES`` (``"laplace_<pred_type>_n10"`` at ``n = 10``).
``laplace_nn`` is the exact Monte Carlo predictive: weights of both heads sampled from the
posterior and pushed through the cosine normalisation (``pred_type="nn", link_approx="mc"``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from laplace_vlm.docstrings import fill_doc
from laplace_vlm.dual_encoder_laplace import DualEncoderLaplace
from laplace_vlm.evaluation.calibration import TemperatureScaling
from laplace_vlm.evaluation.pseudo_count import (
    PSEUDO_COUNTS,
    PosteriorSetting,
    PseudoCountChoice,
    select_pseudo_count,
    tune_prior_at,
)
from laplace_vlm.experiments.recipe import (
    MAX_EVAL,
    MAX_TRAIN,
    SEVERITIES,
    SHIFTS,
    class_text_activations,
    encode_images,
    fit_zero_shot_posterior,
    load_clip,
    load_splits,
)
from laplace_vlm.predictive.uncertainty import entropy
from laplace_vlm.tasks.zeroshot import ZeroShotClassifier

# pred_type -> link of each Laplace predictive: the default, the linearised one, exact MC
LAPLACE_PREDICTIVES: dict[str, str] = {"probcosine": "probit", "glm": "probit", "nn": "mc"}
PAPER_PSEUDO_COUNT = 10.0
MC_SAMPLES = 200

# what every method predicts from
_fill_doc = fill_doc.extend(
    image_acts="""
        image_acts : torch.Tensor
            `(N, d_img)` pre-projection image activations (see :meth:`Experiment.encode`).
        """,
    predict_parameters="""
        Parameters
        ----------
        %(image_acts)s
        """,
)


@dataclass
@fill_doc
class Prediction:
    """One method's output on `N` inputs.

    Attributes
    ----------
    %(probs)s
    logit_mean : torch.Tensor
        `(N, C)` logits (MAP), their posterior mean, or the Monte Carlo mean.
    logit_var : torch.Tensor or None
        `(N, C)` logit variance; None for the deterministic methods.
    %(probs_entropy)s
    mutual_information : torch.Tensor or None
        `(N,)` between label and head weights, nats; None for the deterministic methods.
    """

    probs: torch.Tensor
    logit_mean: torch.Tensor
    logit_var: torch.Tensor | None
    entropy: torch.Tensor
    mutual_information: torch.Tensor | None


def laplace_method(pred_type: str, pseudo_count: float | None = None) -> str:
    """``"laplace_<pred_type>"``, or ``"laplace_<pred_type>_n<n>"`` at a fixed pseudo-count.

    Parameters
    ----------
    pred_type : str
        a key of ``LAPLACE_PREDICTIVES``.
    pseudo_count : float, optional
        a fixed pseudo-count; None for the one chosen on validation.

    Returns
    -------
    str
        the method's name, e.g. ``"laplace_glm"`` or ``"laplace_probcosine_n10"``.
    """
    return f"laplace_{pred_type}" + ("" if pseudo_count is None else f"_n{pseudo_count:g}")


@dataclass
class Experiment:
    """A data set's model, posterior and baselines, ready to predict.

    Attributes
    ----------
    dataset : str
        the data set.
    seed : int
        seed of everything random (split, training, captions, Monte Carlo).
    model : open_clip.model.CLIP
        the trained CLIP.
    la : DualEncoderLaplace
        the fitted posterior (its setting is switched per method by :meth:`predict`).
    classifier : ZeroShotClassifier
        ``la`` with the template-ensembled class activations.
    splits : dict
        ``{"train", "val", "test"}`` -> (images, labels).
    scaler : TemperatureScaling
        fitted on clean validation MAP logits.
    settings : dict of str to (str, PosteriorSetting)
        Laplace method -> its pred_type, and its pseudo-count and prior precision.
    choices : dict of str to PseudoCountChoice
        validation NLPD at every pseudo-count of the grid, per chosen method.
    mc_samples : int
        Monte Carlo samples of ``laplace_nn`` and of the mutual information.
    """

    dataset: str
    seed: int
    model: torch.nn.Module
    la: DualEncoderLaplace
    classifier: ZeroShotClassifier
    splits: dict
    scaler: TemperatureScaling
    settings: dict[str, tuple[str, PosteriorSetting]]
    choices: dict[str, PseudoCountChoice]
    mc_samples: int = MC_SAMPLES

    @property
    def methods(self) -> tuple[str, ...]:
        """All methods, in table order."""
        return ("map", "temperature", *self.settings)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """`(N, 3, 32, 32)` images -> `(N, d_img)` activations of this experiment's model.

        Parameters
        ----------
        images : torch.Tensor
            `(N, 3, 32, 32)` normalised model inputs.

        Returns
        -------
        torch.Tensor
            `(N, d_img)` pre-projection image activations.
        """
        return encode_images(self.model, images)

    @_fill_doc
    def predict(self, image_acts: torch.Tensor) -> dict[str, Prediction]:
        """Every method's prediction for `(N, d_img)` image activations.

        %(predict_parameters)s

        Returns
        -------
        dict of str to Prediction
            in the order of :attr:`methods`.
        """
        out = self.deterministic(image_acts)
        for method, (pred_type, setting) in self.settings.items():
            out[method] = self.laplace(image_acts, pred_type, setting)
        return out

    @_fill_doc
    def deterministic(self, image_acts: torch.Tensor) -> dict[str, Prediction]:
        """``"map"`` and ``"temperature"`` predictions (see :meth:`predict`).

        %(predict_parameters)s

        Returns
        -------
        dict of str to Prediction
            the MAP softmax and its temperature-scaled version, with their entropies.
        """
        logits = self.classifier.predict(image_acts, pred_type="map").logit_mean
        probs = {"map": torch.softmax(logits, -1), "temperature": self.scaler(logits)}
        return {m: Prediction(p, logits, None, entropy(p), None) for m, p in probs.items()}

    @_fill_doc
    def laplace(
        self, image_acts: torch.Tensor, pred_type: str, setting: PosteriorSetting
    ) -> Prediction:
        """One Laplace predictive at one posterior setting.

        Parameters
        ----------
        %(image_acts)s
        pred_type : str
            a key of ``LAPLACE_PREDICTIVES``.
        setting : PosteriorSetting
            pseudo-count and prior precision, applied to :attr:`la` first.

        Returns
        -------
        Prediction
            probabilities and scores; the Monte Carlo draws are seeded with :attr:`seed`, the
            same for every call (common random numbers across conditions).
        """
        setting.apply(self.la)
        generator = torch.Generator().manual_seed(self.seed)
        p = self.classifier.predict(
            image_acts,
            pred_type=pred_type,
            link_approx=LAPLACE_PREDICTIVES[pred_type],
            n_samples=self.mc_samples,
            generator=generator,
        )
        return Prediction(p.probs, p.logit_mean, p.logit_var, p.entropy, p.mutual_information)


def predictive_kwargs(seed: int, mc_samples: int = MC_SAMPLES) -> dict[str, dict]:
    """``la(x, **kwargs)`` of every Laplace predictive, named by method.

    Parameters
    ----------
    seed : int
        seed of the one generator all Monte Carlo predictives draw from.
    mc_samples : int
        samples of the Monte Carlo predictive.

    Returns
    -------
    dict of str to dict
        :func:`laplace_method` -> ``pred_type``, ``link_approx`` and, for Monte Carlo,
        ``n_samples`` and the shared ``generator``.
    """
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for pred_type, link in LAPLACE_PREDICTIVES.items():
        kwargs = {"pred_type": pred_type, "link_approx": link}
        if link == "mc":
            kwargs.update(n_samples=mc_samples, generator=generator)
        out[laplace_method(pred_type)] = kwargs
    return out


@dataclass
@fill_doc
class ExperimentConfig:
    """What :func:`prepare` builds: data set, model cache, pseudo-count grid, Monte Carlo.

    Attributes
    ----------
    %(demo_dataset)s
    seed : int
        seed of the split, the model's training, the captions and the Monte Carlo draws.
    cache_dir : path, optional
        cache of the trained CLIP (see ``recipe.load_clip``).
    data_dir : path, optional
        Fashion-MNIST's folder (see ``recipe.load_splits``).
    progress_bar : bool
        show the training progress.
    train_config : dict, optional
        overrides of the training set-up (tests use a tiny budget).
    pseudo_counts : sequence of float
        the validation grid of ``n``.
    fixed_pseudo_counts : sequence of float
        extra methods ``laplace_<pred_type>_n<n>`` at these ``n`` (the paper's 10 by default;
        empty for none).
    max_train, max_eval : int or None
        subset sizes (see ``recipe.load_splits``).
    mc_samples : int
        Monte Carlo samples.
    """

    dataset: str
    seed: int = 0
    cache_dir: str | os.PathLike | None = None
    data_dir: str | os.PathLike | None = None
    progress_bar: bool = False
    train_config: dict | None = None
    pseudo_counts: Sequence[float] = PSEUDO_COUNTS
    fixed_pseudo_counts: Sequence[float] = (PAPER_PSEUDO_COUNT,)
    max_train: int | None = MAX_TRAIN
    max_eval: int | None = MAX_EVAL
    mc_samples: int = MC_SAMPLES


def prepare(config: ExperimentConfig) -> Experiment:
    """Run the recipe and fit the baselines and the posterior settings.

    Parameters
    ----------
    config : ExperimentConfig
        data set, seed, cache, grid.

    Returns
    -------
    Experiment
        the model, posterior, classifier, splits and every method's fitted setting.
    """
    c = config
    dataset, seed = c.dataset, c.seed
    splits = load_splits(dataset, seed, c.data_dir, c.max_train, c.max_eval)
    model, tokenizer = load_clip(
        dataset, c.cache_dir, c.progress_bar, seed, c.train_config, c.data_dir, c.max_train
    )
    la = fit_zero_shot_posterior(model, tokenizer, *splits["train"], seed=seed, dataset=dataset)
    classifier = ZeroShotClassifier(la, class_text_activations(model, tokenizer, dataset))
    val_x, val_y = splits["val"]
    val_acts = encode_images(model, val_x)
    val_logits = classifier.predict(val_acts, pred_type="map").logit_mean
    scaler = TemperatureScaling().fit(val_logits, val_y)
    choices = select_pseudo_count(
        la,
        classifier.inputs(val_acts),
        val_y,
        predictive_kwargs(seed, c.mc_samples),
        c.pseudo_counts,
    )
    settings = {
        laplace_method(p): (p, choices[laplace_method(p)].setting) for p in LAPLACE_PREDICTIVES
    }
    for n in c.fixed_pseudo_counts:
        setting = tune_prior_at(la, n)
        settings.update({laplace_method(p, n): (p, setting) for p in LAPLACE_PREDICTIVES})
    return Experiment(
        dataset, seed, model, la, classifier, splits, scaler, settings, choices, c.mc_samples
    )


def conditions(
    images: torch.Tensor, seed: int, severities: Sequence[float] = SEVERITIES
) -> Iterator[tuple[str, float, torch.Tensor]]:
    """``(condition, severity, images)``: clean first, then every shift at every severity.

    Parameters
    ----------
    images : torch.Tensor
        `(N, 3, 32, 32)` clean images.
    seed : int
        seed of the shifts' randomness (one generator per shift).
    severities : sequence of float
        in ``(0, 1]``.

    Yields
    ------
    tuple
        ``(condition, severity, images)``: ``"clean"`` or a shift of ``SHIFTS``, its severity
        (0 for clean) and the `(N, 3, 32, 32)` images under it.
    """
    yield "clean", 0.0, images
    for index, (shift, transform) in enumerate(SHIFTS.items()):
        generator = torch.Generator().manual_seed(seed * 1000 + index)
        for severity in severities:
            yield shift, float(severity), transform(images, severity, generator)
