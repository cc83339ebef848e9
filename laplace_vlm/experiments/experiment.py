"""The fitted experiment the demo and the benchmark share: posterior, settings and predictions.

:func:`prepare` runs the recipe (splits, stand-in CLIP, the posterior's curvature on the
held-out curvature pairs), fits the temperature-scaling baseline on the clean validation split
and sets up every Laplace method. :meth:`Experiment.predict` then gives every method's
probabilities and uncertainty scores for a batch of image activations.

Methods:

- ``"map"`` (the deterministic model) and ``"temperature"`` (temperature scaling);
- ``"bayesvlm"``: the paper's method exactly, the symmetric posterior form at the pseudo-count
  ``n = 10``, prior precision by marginal likelihood, ProbCosine with the probit link;
- ``"laplace_<pred_type>"`` for the predictives of ``LAPLACE_PREDICTIVES``, in the same form at
  the pseudo-count chosen on clean validation NLPD (prior re-tuned at every ``n``);
  ``laplace_nn`` is exact Monte Carlo through the cosine normalisation;
- ``"laplace_probcosine_exact"``: laplace's exact-prior form at its own chosen pseudo-count,
  for comparison.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from laplace_vlm.docstrings import fill_doc
from laplace_vlm.dual_encoder_laplace import DualEncoderLaplace
from laplace_vlm.evaluation.calibration import TemperatureScaling
from laplace_vlm.evaluation.pseudo_count import (
    PSEUDO_COUNTS,
    PseudoCountChoice,
    select_pseudo_count,
    tune_prior_at,
)
from laplace_vlm.experiments.methods import (
    EXACT_METHOD,
    FORMS,
    LAPLACE_PREDICTIVES,
    MC_SAMPLES,
    PAPER_METHOD,
    PAPER_PSEUDO_COUNT,
    LaplaceMethod,
    laplace_method,
    predictive_kwargs,
)
from laplace_vlm.experiments.recipe import (
    MAX_EVAL,
    MAX_TRAIN,
    class_text_activations,
    encode_images,
    fit_zero_shot_posterior,
    in_form,
    load_clip,
    load_splits,
)
from laplace_vlm.predictive.uncertainty import entropy
from laplace_vlm.tasks.zeroshot import ZeroShotClassifier

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
    classifiers : dict of str to ZeroShotClassifier
        posterior form -> the fitted posterior in that form (same curvature) with the
        template-ensembled class activations; its setting is switched per method.
    splits : dict
        ``{"train", "curvature", "val", "test"}`` -> (images, labels).
    scaler : TemperatureScaling
        fitted on clean validation MAP logits.
    settings : dict of str to LaplaceMethod
        Laplace method -> its predictive, form, pseudo-count and prior precision.
    choices : dict of str to PseudoCountChoice
        validation NLPD at every pseudo-count of the grid, per chosen method.
    mc_samples : int
        Monte Carlo samples of ``laplace_nn`` and of the mutual information.
    curvature_pairs : str
        the split the curvature was fitted on (see ``ExperimentConfig``).
    """

    dataset: str
    seed: int
    model: torch.nn.Module
    classifiers: dict[str, ZeroShotClassifier]
    splits: dict
    scaler: TemperatureScaling
    settings: dict[str, LaplaceMethod]
    choices: dict[str, PseudoCountChoice]
    mc_samples: int = MC_SAMPLES
    curvature_pairs: str = "curvature"

    @property
    def la(self) -> DualEncoderLaplace:
        """The posterior in the paper's form (the class default)."""
        return self.classifiers["symmetric"].la

    @property
    def classifier(self) -> ZeroShotClassifier:
        """:attr:`la` as a zero-shot classifier."""
        return self.classifiers["symmetric"]

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
        for name, method in self.settings.items():
            out[name] = self.laplace(image_acts, method)
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
    def laplace(self, image_acts: torch.Tensor, method: LaplaceMethod) -> Prediction:
        """One Laplace method's prediction.

        Parameters
        ----------
        %(image_acts)s
        method : LaplaceMethod
            predictive, form and setting (applied to that form's posterior first).

        Returns
        -------
        Prediction
            probabilities and scores; the Monte Carlo draws are seeded with :attr:`seed`, the
            same for every call (common random numbers across conditions).
        """
        classifier = self.classifiers[method.form]
        method.setting.apply(classifier.la)
        generator = torch.Generator().manual_seed(self.seed)
        p = classifier.predict(
            image_acts,
            pred_type=method.pred_type,
            link_approx=method.link_approx,
            n_samples=self.mc_samples,
            generator=generator,
        )
        return Prediction(p.probs, p.logit_mean, p.logit_var, p.entropy, p.mutual_information)


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
    curvature_pairs : {'curvature', 'train'}
        the split the curvature is fitted on: the held-out ``"curvature"`` pairs (default:
        the stand-in never trained on them) or the stand-in's own training pairs (to measure
        what memorised pairs do to the posterior).
    max_train, max_eval : int or None
        subset sizes (see ``recipe.load_splits``).
    mc_samples : int
        Monte Carlo samples.
    retrain : bool
        train the stand-in here even where it is shipped or cached (see ``recipe.load_clip``).
    """

    dataset: str
    seed: int = 0
    cache_dir: str | os.PathLike | None = None
    data_dir: str | os.PathLike | None = None
    progress_bar: bool = False
    train_config: dict | None = None
    pseudo_counts: Sequence[float] = PSEUDO_COUNTS
    curvature_pairs: str = "curvature"
    max_train: int | None = MAX_TRAIN
    max_eval: int | None = MAX_EVAL
    mc_samples: int = MC_SAMPLES
    retrain: bool = False


def prepare(config: ExperimentConfig) -> Experiment:
    """Run the recipe and fit the baselines and the posterior settings.

    Parameters
    ----------
    config : ExperimentConfig
        data set, seed, cache, grid, curvature pairs.

    Returns
    -------
    Experiment
        the model, posteriors, classifiers, splits and every method's fitted setting.
    """
    c = config
    if c.curvature_pairs not in ("curvature", "train"):
        raise ValueError(
            f"curvature_pairs must be 'curvature' or 'train', got {c.curvature_pairs!r}."
        )
    splits = load_splits(c.dataset, c.seed, c.data_dir, c.max_train, c.max_eval)
    model, tokenizer = load_clip(
        c.dataset,
        c.cache_dir,
        c.progress_bar,
        c.seed,
        c.train_config,
        c.data_dir,
        c.max_train,
        retrain=c.retrain,
    )
    la = fit_zero_shot_posterior(
        model, tokenizer, *splits[c.curvature_pairs], seed=c.seed, dataset=c.dataset
    )
    class_acts = class_text_activations(model, tokenizer, c.dataset)
    classifiers = {
        form: ZeroShotClassifier(la if damping == "symmetric" else in_form(la, damping), class_acts)
        for form, damping in FORMS.items()
    }
    val_x, val_y = splits["val"]
    val_acts = encode_images(model, val_x)
    val_logits = classifiers["symmetric"].predict(val_acts, pred_type="map").logit_mean
    scaler = TemperatureScaling().fit(val_logits, val_y)
    settings, choices = _laplace_methods(classifiers, val_acts, val_y, c)
    return Experiment(
        c.dataset,
        c.seed,
        model,
        classifiers,
        splits,
        scaler,
        settings,
        choices,
        c.mc_samples,
        c.curvature_pairs,
    )


def _laplace_methods(
    classifiers: dict[str, ZeroShotClassifier],
    val_acts: torch.Tensor,
    val_y: torch.Tensor,
    c: ExperimentConfig,
) -> tuple[dict[str, LaplaceMethod], dict[str, PseudoCountChoice]]:
    """The paper's method, each predictive at its chosen n, the exact form at its own n."""
    symmetric, exact = classifiers["symmetric"], classifiers["exact"]
    methods = {
        PAPER_METHOD: LaplaceMethod(
            "probcosine", "symmetric", tune_prior_at(symmetric.la, PAPER_PSEUDO_COUNT)
        )
    }
    kwargs = predictive_kwargs(c.seed, c.mc_samples)
    choices = select_pseudo_count(
        symmetric.la, symmetric.inputs(val_acts), val_y, kwargs, c.pseudo_counts
    )
    for pred_type in LAPLACE_PREDICTIVES:
        name = laplace_method(pred_type)
        methods[name] = LaplaceMethod(pred_type, "symmetric", choices[name].setting)
    exact_kwargs = {EXACT_METHOD: kwargs[laplace_method("probcosine")]}
    exact_choice = select_pseudo_count(
        exact.la, exact.inputs(val_acts), val_y, exact_kwargs, c.pseudo_counts
    )
    choices.update(exact_choice)
    methods[EXACT_METHOD] = LaplaceMethod("probcosine", "exact", exact_choice[EXACT_METHOD].setting)
    return methods, choices
