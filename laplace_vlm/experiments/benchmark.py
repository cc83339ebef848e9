"""The benchmark of one data set: calibration, selective and failure prediction, OOD, conformal.

Every number is one row (:mod:`laplace_vlm.evaluation.tables`). Conditions are the clean test
split and every shift of ``SHIFTS`` at every severity. Methods are those of
:mod:`laplace_vlm.experiments.experiment`: ``map``, ``temperature``, ``bayesvlm`` (the paper's
method), each Laplace predictive at the pseudo-count chosen on clean validation NLPD, and the
exact-prior form at its own chosen pseudo-count.

- calibration: ``acc``, ``nlpd``, ``ece15``, ``ece20``, ``brier``;
- selective (``aurc``, ``eaurc``) and failure (``auroc``, ``fpr95``, correct predictions
  positive) with the scores ``msp`` (every method) and ``entropy`` / ``mutual_information``
  (Laplace methods);
- ood: the clean test split against the other data set's test split and against uniform
  noise images. Every score on every model, so that a table separates "which score" from
  "which model": ``msp`` and ``entropy`` (every method; ``temperature``'s MSP is the
  temperature-scaled MSP), ``mcm`` (Ming et al. 2022: softmax of the cosines at temperature 1;
  on the MAP cosines for ``map``, on the posterior's expected cosines for a Laplace method),
  and for the Laplace methods ``mutual_information`` and ``expected_logit_variance``;
- conformal: LAC and APS sets at ``alpha`` calibrated on each method's clean validation
  probabilities (``lac``, ``aps``) and, the shift-aware baseline, recalibrated on
  ``TARGET_LABELS`` labelled validation images of the same condition (``lac_target50``,
  ``aps_target50``: what a user with a few target labels gets); ``coverage``, ``set_size``
  and ``empty_rate`` on every condition.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from laplace_vlm.datasets.images import stratified_subset
from laplace_vlm.datasets.shifts import conditions
from laplace_vlm.evaluation.conformal import SplitConformal
from laplace_vlm.evaluation.detection import expected_logit_variance, mcm, msp
from laplace_vlm.evaluation.metrics import classification_metrics
from laplace_vlm.evaluation.tables import (
    TASKS,
    Row,
    check_rows,
    confidence_scores,
    conformal_values,
    failure_values,
    make_rows,
    ood_values,
    selective_values,
)
from laplace_vlm.experiments.experiment import (
    Experiment,
    ExperimentConfig,
    Prediction,
    prepare,
)
from laplace_vlm.experiments.recipe import (
    SEVERITIES,
    ood_images,
    torch_threads,
)
from laplace_vlm.experiments.run_settings import settings

ALPHA = 0.1
CONFORMAL_SCORES: tuple[str, ...] = ("lac", "aps")
TARGET_LABELS = 50
# the validation images are shifted with their own seeds, never the test images' draws
_VAL_SHIFT_SEED = 7_919


@dataclass
class BenchmarkResult:
    """What :func:`run_benchmark` measured, and what its plots need.

    Attributes
    ----------
    settings : dict
        JSON-safe description of the run (alpha, sizes, chosen pseudo-counts, ...).
    rows : list of dict
        one row per number.
    labels : torch.Tensor
        `(N,)` test labels.
    kept : dict
        ``(condition, severity)`` -> (image activations, method -> Prediction), for the clean
        test split and each shift's strongest severity.
    ood_scores : dict
        OOD set -> ``(method, score)`` -> (in-distribution scores, OOD scores).
    experiment : Experiment
        the fitted experiment.
    """

    settings: dict
    rows: list[Row]
    labels: torch.Tensor
    kept: dict = field(default_factory=dict)
    ood_scores: dict = field(default_factory=dict)
    experiment: Experiment | None = None


def condition_rows(
    dataset: str,
    condition: str,
    severity: float,
    predictions: dict[str, Prediction],
    labels: torch.Tensor,
    tasks: Sequence[str] = TASKS,
    conformal: dict[str, dict[str, SplitConformal]] | None = None,
) -> list[Row]:
    """The calibration, selective, failure and conformal rows of one test condition.

    Parameters
    ----------
    dataset : str
        the data set.
    condition : str
        ``"clean"`` or a shift.
    severity : float
        0 for clean.
    predictions : dict of str to Prediction
        method -> its prediction on the condition's images.
    labels : torch.Tensor
        `(N,)` true labels.
    tasks : sequence of str
        which of ``TASKS`` to compute (``"ood"`` is ignored here).
    conformal : dict, optional
        method -> conformal score -> fitted ``SplitConformal``; needed for ``"conformal"``.

    Returns
    -------
    list of dict
        per method: its calibration rows, its selective and failure rows per confidence
        score, then its conformal rows.
    """
    rows: list[Row] = []
    for method, p in predictions.items():
        key = {"dataset": dataset, "condition": condition, "severity": severity, "method": method}
        if "calibration" in tasks:
            rows += make_rows(classification_metrics(p.probs, labels), task="calibration", **key)
        correct = p.probs.argmax(-1) == labels
        posterior = p.mutual_information is not None  # entropy and MI only for the posterior
        scores = confidence_scores(p.probs, p.entropy if posterior else None, p.mutual_information)
        for score, confidence in scores.items():
            if "selective" in tasks:
                values = selective_values(confidence, correct)
                rows += make_rows(values, task="selective", score=score, **key)
            if "failure" in tasks:
                values = failure_values(confidence, correct)
                rows += make_rows(values, task="failure", score=score, **key)
        for score, predictor in (conformal or {}).get(method, {}).items():
            values = conformal_values(predictor.predict(p.probs), labels)
            rows += make_rows(values, task="conformal", score=score, **key)
    return rows


def ood_scores(predictions: dict[str, Prediction], logit_scale: float) -> dict[tuple, tuple]:
    """Every OOD score of every method: ``(method, score)`` -> (values, higher_is_in).

    Parameters
    ----------
    predictions : dict of str to Prediction
        method -> its prediction on one set of images.
    logit_scale : float
        CLIP's ``exp(logit_scale)``; MCM takes the cosines ``logit_mean / scale`` (the
        expected cosines of a posterior).

    Returns
    -------
    dict of tuple to tuple
        ``(method, score)`` -> ``(values, higher_is_in)``: `(N,)` scores and whether a higher
        score means in-distribution.
    """
    out: dict[tuple, tuple] = {}
    for method, p in predictions.items():
        out[(method, "msp")] = (msp(p.probs), True)
        out[(method, "entropy")] = (p.entropy.double(), False)
        if method != "temperature":  # the same cosines as map
            out[(method, "mcm")] = (mcm(p.logit_mean / logit_scale, temperature=1.0), True)
        if p.mutual_information is not None:
            out[(method, "mutual_information")] = (p.mutual_information.double(), False)
            out[(method, "expected_logit_variance")] = (
                expected_logit_variance(p.logit_var),
                False,
            )
    return out


def ood_rows(
    dataset: str,
    ood_set: str,
    scores_in: dict[tuple, tuple],
    scores_out: dict[tuple, tuple],
) -> list[Row]:
    """``auroc`` and ``fpr95`` rows of every ``(method, score)`` of :func:`ood_scores`.

    Parameters
    ----------
    dataset : str
        the in-distribution data set.
    ood_set : str
        the OOD set's name (the row's condition).
    scores_in, scores_out : dict
        :func:`ood_scores` of the in-distribution test split and of the OOD set.

    Returns
    -------
    list of dict
        two rows (``auroc``, ``fpr95``) per ``(method, score)``, task ``"ood"``.
    """
    rows = []
    for (method, score), (score_in, higher_is_in) in scores_in.items():
        values = ood_values(score_in, scores_out[method, score][0], higher_is_in)
        rows += make_rows(values, dataset, "ood", ood_set, None, method, score)
    return rows


def fit_conformal(
    predictions: dict[str, Prediction],
    labels: torch.Tensor,
    alpha: float,
    seed: int,
    suffix: str = "",
) -> dict[str, dict[str, SplitConformal]]:
    """LAC and APS predictors of every method, calibrated on its labelled probabilities.

    Parameters
    ----------
    predictions : dict of str to Prediction
        method -> its prediction on the calibration images.
    labels : torch.Tensor
        `(M,)` their labels.
    alpha : float
        miscoverage level.
    seed : int
        seed of APS's randomisation (per method).
    suffix : str
        appended to the score names (``"lac" + suffix``).

    Returns
    -------
    dict of str to dict
        method -> ``{"lac" + suffix: ..., "aps" + suffix: ...}`` fitted predictors.
    """
    out: dict[str, dict[str, SplitConformal]] = {}
    for method, p in predictions.items():
        out[method] = {}
        for score in CONFORMAL_SCORES:  # APS is randomised (tight coverage): seeded per method
            generator = None if score == "lac" else torch.Generator().manual_seed(seed)
            predictor = SplitConformal(score, alpha, generator=generator)
            out[method][score + suffix] = predictor.fit(p.probs, labels)
    return out


def target_sample(labels: torch.Tensor, seed: int, size: int = TARGET_LABELS) -> torch.Tensor:
    """Indices of the few labelled target images of the shift-aware conformal baseline.

    Parameters
    ----------
    labels : torch.Tensor
        `(M,)` validation labels.
    seed : int
        seed of the draw.
    size : int
        how many (stratified).

    Returns
    -------
    torch.Tensor
        `(size,)` indices into the validation split.
    """
    return stratified_subset(labels, size, seed)


def run_benchmark(
    config: ExperimentConfig,
    tasks: Sequence[str] = TASKS,
    severities: Sequence[float] = SEVERITIES,
    alpha: float = ALPHA,
) -> BenchmarkResult:
    """Run the benchmark of one data set (prints nothing but an optional progress bar).

    Parameters
    ----------
    config : ExperimentConfig
        the in-distribution data set, seed, model cache, pseudo-count grids, Monte Carlo.
    tasks : sequence of str
        a subset of ``TASKS``.
    severities : sequence of float
        shift severities in ``(0, 1]``.
    alpha : float
        conformal miscoverage level.

    Returns
    -------
    BenchmarkResult
        the checked rows, the settings, and what the figures need.
    """
    unknown = set(tasks) - set(TASKS)
    if unknown or not tasks:
        raise ValueError(f"tasks must be a non-empty subset of {TASKS}, got {tuple(tasks)}.")
    with torch_threads(1):  # the toy model's GEMMs gain nothing from more; they stall on busy cores
        exp = prepare(config)
        test_x, labels = exp.splits["test"]
        val_x, val_y = exp.splits["val"]
        clean_conformal, target = None, target_sample(val_y, config.seed)
        if "conformal" in tasks:
            val_predictions = exp.predict(exp.encode(val_x))
            clean_conformal = fit_conformal(val_predictions, val_y, alpha, config.seed)
        result = BenchmarkResult({}, [], labels, experiment=exp)
        shifted_val = conditions(val_x[target], config.seed + _VAL_SHIFT_SEED, severities)
        for (condition, severity, images), (_, _, val_images) in zip(
            conditions(test_x, config.seed, severities), shifted_val
        ):
            acts = exp.encode(images)
            predictions = exp.predict(acts)
            conformal = None
            if clean_conformal is not None:
                few = exp.predict(exp.encode(val_images))
                target_conformal = fit_conformal(
                    few, val_y[target], alpha, config.seed, f"_target{TARGET_LABELS}"
                )
                conformal = {m: {**clean_conformal[m], **target_conformal[m]} for m in few}
            result.rows += condition_rows(
                config.dataset, condition, severity, predictions, labels, tasks, conformal
            )
            if condition == "clean" or severity == max(severities):
                result.kept[(condition, severity)] = (acts, predictions)
        skipped = _add_ood(result, config.data_dir) if "ood" in tasks else []
    clean_acts = result.kept[("clean", 0.0)][0]
    result.settings = settings(
        exp, alpha, severities, config.pseudo_counts, skipped, TARGET_LABELS, clean_acts
    )
    check_rows(result.rows)
    return result


def _add_ood(result: BenchmarkResult, data_dir: str | os.PathLike | None) -> list[str]:
    """Append the OOD rows and histogram data to ``result``; the skipped sets' reasons."""
    exp = result.experiment
    scale = exp.model.logit_scale.detach().exp().item()
    scores_in = ood_scores(result.kept[("clean", 0.0)][1], scale)
    images, skipped = ood_images(exp.dataset, len(result.labels), exp.seed, data_dir)
    for ood_set, x in images.items():
        scores_out = ood_scores(exp.predict(exp.encode(x)), scale)
        result.rows += ood_rows(exp.dataset, ood_set, scores_in, scores_out)
        result.ood_scores[ood_set] = {k: (scores_in[k][0], v[0]) for k, v in scores_out.items()}
    return skipped
