"""Active few-shot adaptation of a dual encoder with Laplace uncertainty (paper section 2.2).

One experiment: a **pool** of unlabelled images (source and shifted domains) and a **target**
domain whose unlabelled test inputs are the queries (their labels are used only for
evaluation, as in the paper's reference code). With ``protocol="rounds"`` every round

1. restricts the pool to the unique nearest neighbours of the target inputs (expected cosine
   or 2-Wasserstein between the Gaussian image embeddings; :mod:`laplace_vlm.active.targeting`),
2. scores the candidates (:mod:`laplace_vlm.active.selection`) and labels a batch, top-k or
   sampled (:mod:`laplace_vlm.active.acquisition`),
3. adapts (:func:`adapt`): fine-tunes the image projection on everything labelled so far,
   from the pretrained weights, with the epoch chosen by cross-validation on the labelled
   set; moves the zero-shot posterior there and adds the labelled images' C-way curvature;
   chooses the pseudo-count by the cross-validated NLPD (the one selection,
   :func:`laplace_vlm.evaluation.pseudo_count.select_pseudo_count`, on every fold), and
4. evaluates accuracy, ECE (20 bins) and NLPD of the Laplace predictive on the target test set.

``protocol="reference"`` is the reference scripts' one-shot selection
(:mod:`laplace_vlm.active.reference`). Only labels bought with the budget are used
(``validation="support"``); every result row records ``labels_used``. Strategies:
:class:`laplace_vlm.active.acquisition.Strategy`.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from laplace_vlm.active.acquisition import Strategy
from laplace_vlm.active.adaptation import Labelled, cv_folds, finetune_image_projection
from laplace_vlm.active.config import ActiveLearningConfig, ActiveLearningProblem
from laplace_vlm.active.posterior_update import update_posterior
from laplace_vlm.active.selection import class_counts, select_batch
from laplace_vlm.docstrings import fill_doc
from laplace_vlm.evaluation.metrics import accuracy, ece, nlpd
from laplace_vlm.evaluation.pseudo_count import select_pseudo_count, tune_prior_at
from laplace_vlm.predictive.uncertainty import entropy


class LabelOracle:
    """The only way to a pool label: reveals labels and counts the distinct points asked.

    Parameters
    ----------
    labels : torch.Tensor
        `(N,)` the pool's labels.
    """

    def __init__(self, labels: torch.Tensor) -> None:
        self._labels = labels
        self.revealed = torch.zeros(len(labels), dtype=torch.bool)

    def __call__(self, indices: torch.Tensor) -> torch.Tensor:
        """Reveal the labels of ``indices`` and mark them as asked.

        Parameters
        ----------
        indices : torch.Tensor
            `(n,)` pool indices to label.

        Returns
        -------
        torch.Tensor
            the labels of ``indices``.
        """
        self.revealed[indices] = True
        return self._labels[indices]

    @property
    def count(self) -> int:
        """Distinct pool points labelled so far."""
        return int(self.revealed.sum())


def evaluate(
    la, problem: ActiveLearningProblem, pred_type: str = "probcosine", mean_logits: bool = False
) -> dict[str, float]:
    """Accuracy, ECE, NLPD (Laplace predictive, probit) and MAP accuracy on the target test set.

    Parameters
    ----------
    la : DualEncoderLaplace
        the posterior to evaluate.
    problem : ActiveLearningProblem
        its test inputs, test labels and class texts.
    pred_type : str
        the predictive of ``la(x, pred_type=...)``.
    mean_logits : bool
        the softmax of the mean logits of ``pred_type`` instead of the probit predictive (the
        reference scripts' test predictions).

    Returns
    -------
    dict
        ``acc``, ``ece``, ``nlpd``, ``map_acc``.
    """
    x = {"image": problem.test, "text": problem.class_text}
    y = problem.test_labels
    with torch.no_grad():
        if mean_logits:
            probs = torch.softmax(la.predictive_moments(x, pred_type=pred_type)[0], -1)
        else:
            probs = la(x, pred_type=pred_type)
        map_probs = la(x, pred_type="map")
    return {"acc": accuracy(probs, y), "ece": ece(probs, y), "nlpd": nlpd(probs, y),
            "map_acc": accuracy(map_probs, y)}  # fmt: skip


@fill_doc
def posterior_at(la_init, projection, support: Labelled, class_text: torch.Tensor):
    """A copy of the zero-shot posterior moved to ``projection``, with ``support`` added.

    Parameters
    ----------
    %(zero_shot_posterior)s
    projection : nn.Linear
        the fine-tuned image projection, the new mean.
    support : tuple of torch.Tensor
        ``(activations, labels)`` whose C-way curvature is added.
    %(class_text)s

    Returns
    -------
    DualEncoderLaplace
        a deep copy of ``la_init`` with the new mean and the added curvature.
    """
    la = copy.deepcopy(la_init)
    update_posterior(la, projection, support, class_text)
    return la


def _cv_pseudo_count(la_init, fit, support: Labelled, folds, problem, config) -> float:
    """The pseudo-count of lowest held-out NLPD, summed over the folds.

    Fold f's posterior is the zero-shot one at fold f's projection (``fit``) with the labels
    outside the fold added; :func:`select_pseudo_count` scores the fold's held-out labels on
    it, at every value of ``config.pseudo_counts``. ``la_init``, ``support``, ``folds`` and
    ``problem`` are those of :func:`adapt`.
    """
    total: dict[float, float] = {}
    predictive = {"laplace": {"pred_type": config.pred_type}}
    for projection, held_out in zip(fit.fold_projections, folds):
        train = torch.ones(len(support[1]), dtype=torch.bool)
        train[held_out] = False
        la_f = posterior_at(la_init, projection, (support[0][train], support[1][train]),
                            problem.class_text)  # fmt: skip
        x = {"image": support[0][held_out], "text": problem.class_text}
        choice = select_pseudo_count(la_f, x, support[1][held_out], predictive,
                                     config.pseudo_counts)["laplace"]  # fmt: skip
        for n, value in choice.nlpd_by_pseudo_count.items():
            total[n] = total.get(n, 0.0) + value * len(held_out)
    return min(total, key=total.get)


@fill_doc
def finetune_on_support(la_init, support: Labelled, problem: ActiveLearningProblem,
                        config: ActiveLearningConfig, generator: torch.Generator):  # fmt: skip
    """Fine-tune the image projection on ``support``, early-stopped as ``config.validation`` says.

    Parameters
    ----------
    %(zero_shot_posterior)s
    support : tuple of torch.Tensor
        ``(activations, labels)`` of everything labelled.
    problem : ActiveLearningProblem
        class texts (and the validation split with ``validation='target_split'``).
    config : ActiveLearningConfig
        fine-tuning and validation settings.
    generator : torch.Generator
        folds and minibatches.

    Returns
    -------
    fit : FinetuneResult
        the fine-tuned projections.
    folds : list of torch.Tensor or None
        the cross-validation folds (None with ``validation='target_split'``).
    validation_labels : int
        labels used beyond ``support`` (the target split's size, or 0).
    """
    settings, text = config.finetune, problem.class_text
    if config.validation == "target_split":
        if problem.val is None:
            raise ValueError("validation='target_split' needs a problem with val, val_labels.")
        val = (problem.val, problem.val_labels)
        fit = finetune_image_projection(la_init.heads, support, text, val=val,
                                        settings=settings, generator=generator)  # fmt: skip
        return fit, None, len(val[1])
    folds = cv_folds(support[1], config.cv_folds, generator)
    fit = finetune_image_projection(la_init.heads, support, text, folds=folds,
                                    settings=settings, generator=generator)  # fmt: skip
    return fit, folds, 0


@fill_doc
def adapt(
    la_init,
    support: Labelled,
    problem: ActiveLearningProblem,
    config: ActiveLearningConfig,
    generator: torch.Generator,
) -> tuple[Any, dict[str, float]]:
    """Fine-tune on ``support``, move and update the posterior, choose its pseudo-count.

    Parameters
    ----------
    %(zero_shot_posterior)s
    support : tuple of torch.Tensor
        ``(activations, labels)`` of everything labelled.
    problem : ActiveLearningProblem
        class texts (and the validation split with ``validation='target_split'``).
    config : ActiveLearningConfig
        fine-tuning, validation and pseudo-count settings.
    generator : torch.Generator
        folds and minibatches.

    Returns
    -------
    la : DualEncoderLaplace
        the adapted posterior.
    info : dict
        ``pseudo_count``, ``best_epoch`` and ``validation_labels`` (labels beyond ``support``).
    """
    fit, folds, extra = finetune_on_support(la_init, support, problem, config, generator)
    la = posterior_at(la_init, fit.projection, support, problem.class_text)
    if folds is None:
        x_val = {"image": problem.val, "text": problem.class_text}
        choice = select_pseudo_count(la, x_val, problem.val_labels,
                                     {"laplace": {"pred_type": config.pred_type}},
                                     config.pseudo_counts)["laplace"]  # fmt: skip
        n = choice.setting.pseudo_count
    else:
        n = _cv_pseudo_count(la_init, fit, support, folds, problem, config)
    tune_prior_at(la, n)
    return la, {"pseudo_count": n, "best_epoch": fit.best_epoch, "validation_labels": extra}


def label_balance(labels: torch.Tensor, n_classes: int) -> dict:
    """The class histogram of labelled points and the entropy of their label distribution.

    Parameters
    ----------
    labels : torch.Tensor
        `(M,)` labels of the labelled points.
    n_classes : int
        C.

    Returns
    -------
    dict
        ``class_counts`` (list of C ints) and ``label_entropy`` (nats; ``log C`` is balanced,
        0 one class; 0 for no label).
    """
    counts = class_counts(labels, n_classes)
    share = counts.double() / max(int(counts.sum()), 1)
    return {"class_counts": counts.tolist(), "label_entropy": entropy(share).item()}


def result_row(
    la, problem, config, oracle: LabelOracle, info: dict[str, float], mean_logits: bool = False
) -> dict[str, float]:
    """:func:`evaluate` plus ``info``, ``labels_used`` and the labelled set's class balance.

    Parameters
    ----------
    la : DualEncoderLaplace
        the adapted posterior.
    problem : ActiveLearningProblem
        the test set it is evaluated on.
    config : ActiveLearningConfig
        its ``pred_type``.
    oracle : LabelOracle
        counts the pool labels used.
    info : dict
        from :func:`adapt` (``validation_labels`` is added to the count).
    mean_logits : bool
        evaluate the softmax of the mean logits (:func:`evaluate`).

    Returns
    -------
    dict of str to float
        :func:`evaluate`'s metrics, ``info``, ``labels_used`` (the distinct pool labels asked
        plus the validation labels) and :func:`label_balance` of the pool labels asked.
    """
    row = evaluate(la, problem, config.pred_type, mean_logits)
    row.update(info, labels_used=oracle.count + info.get("validation_labels", 0))
    asked = problem.pool_labels[oracle.revealed]
    row.update(label_balance(asked, len(problem.class_text)))
    return row


def zero_shot_row(
    la_init, problem: ActiveLearningProblem, config, mean_logits: bool = False
) -> dict[str, float]:
    """Budget 0: the zero-shot posterior, no label used.

    Parameters
    ----------
    la_init : DualEncoderLaplace
        the zero-shot posterior.
    problem : ActiveLearningProblem
        the test set.
    config : ActiveLearningConfig
        its ``pred_type``.
    mean_logits : bool
        evaluate the softmax of the mean logits (:func:`evaluate`).

    Returns
    -------
    dict of str to float
        the :func:`result_row` of ``la_init``: pseudo-count ``1 / temperature``, epoch 0 and
        no label used.
    """
    info = {"pseudo_count": 1.0 / la_init.temperature, "best_epoch": 0, "validation_labels": 0}
    oracle = LabelOracle(problem.pool_labels)
    return result_row(la_init, problem, config, oracle, info, mean_logits)


@fill_doc
def run_rounds(
    la_init, problem: ActiveLearningProblem, strategy: Strategy, seed: int, config
) -> dict[int, dict[str, float]]:
    """The rounds protocol for one strategy and seed: ``{budget: metrics}``, 0 = zero-shot.

    Every round labels ``config.budget`` more pool points with the current posterior and
    adapts from the zero-shot one on all labelled so far; a round with no point left to label
    ends the run early.

    %(protocol_run)s
    """
    generator = torch.Generator().manual_seed(int(seed))
    oracle = LabelOracle(problem.pool_labels)
    la, labelled = la_init, torch.empty(0, dtype=torch.long)
    results = {0: zero_shot_row(la_init, problem, config)}
    for budget in config.budgets:
        new = select_batch(la, problem, strategy, labelled, budget - len(labelled), config,
                           generator, problem.pool_labels[oracle.revealed])  # fmt: skip
        if len(new) == 0:
            break
        labelled = torch.cat([labelled, new])
        support = (problem.pool[labelled], oracle(labelled))
        la, info = adapt(la_init, support, problem, config, generator)
        results[len(labelled)] = result_row(la, problem, config, oracle, info)
    return results
