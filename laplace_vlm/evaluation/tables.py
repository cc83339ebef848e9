"""Benchmark rows (one number per row, in CLIP_benchmark's spirit) and text tables of them.

A row is a dict with the keys ``ROW_KEYS``: ``{"dataset", "task", "condition", "severity",
"method", "score", "metric", "value"}``. ``task`` is one of ``TASKS``; ``score`` names the
uncertainty score where a task has several (``"msp"``, ``"entropy"``, ...; the conformal score
``"lac"`` / ``"aps"``), else None; ``value`` is a float, or None where the metric is undefined
(a failure AUROC with no errors). The functions here turn predictions into the values of one
task by calling the metric functions, so a row always equals a direct call.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from laplace_vlm.docstrings import fill_doc
from laplace_vlm.evaluation.conformal import coverage, empty_rate, mean_set_size
from laplace_vlm.evaluation.detection import ood_metrics
from laplace_vlm.evaluation.selective import aurc, excess_aurc, failure_auroc, failure_fpr95

ROW_KEYS: tuple[str, ...] = (
    "dataset",
    "task",
    "condition",
    "severity",
    "method",
    "score",
    "metric",
    "value",
)
TASKS: tuple[str, ...] = ("calibration", "selective", "failure", "ood", "conformal")
METRICS: dict[str, tuple[str, ...]] = {
    "calibration": ("acc", "nlpd", "ece15", "ece20", "brier"),
    "selective": ("aurc", "eaurc"),
    "failure": ("auroc", "fpr95"),
    "ood": ("auroc", "fpr95"),
    "conformal": ("coverage", "set_size", "empty_rate"),
}

Row = dict[str, Any]

_fill_doc = fill_doc.extend(
    where_parameters="""
        Parameters
        ----------
        rows : iterable of dict
            benchmark rows.
        **where
            row key -> wanted value.
        """,
)


def make_rows(
    values: Mapping[str, float | None],
    dataset: str,
    task: str,
    condition: str,
    severity: float | None,
    method: str,
    score: str | None = None,
) -> list[Row]:
    """One row per entry of ``values``, all sharing the other keys.

    Parameters
    ----------
    values : mapping of str to float or None
        metric name -> value; the names must be those of ``METRICS[task]``.
    dataset : str
        e.g. ``"digits"``.
    task : str
        one of ``TASKS``.
    condition : str
        ``"clean"``, a shift name, or the OOD set.
    severity : float or None
        0 for clean data, the shift's severity, None where there is none (OOD).
    method : str
        e.g. ``"map"``, ``"laplace_probcosine"``.
    score : str, optional
        the uncertainty score where the task has several.

    Returns
    -------
    list of dict
        one row per metric of ``values``, in its order (NaN values become None).
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}.")
    unknown = set(values) - set(METRICS[task])
    if unknown:
        raise ValueError(f"values: {sorted(unknown)} are not metrics of task {task!r}.")
    severity = None if severity is None else float(severity)
    base = {
        "dataset": dataset,
        "task": task,
        "condition": condition,
        "severity": severity,
        "method": method,
        "score": score,
    }
    return [{**base, "metric": m, "value": _plain(v)} for m, v in values.items()]


def condition_label(condition: str, severity: float | None) -> str:
    """``"clean"``, ``"rotation 1"`` or an OOD set's name: a row's condition in figures and text.

    Parameters
    ----------
    condition : str
        the row's condition.
    severity : float or None
        the row's severity (0 and None are not shown).

    Returns
    -------
    str
        ``condition``, followed by the severity where it is neither 0 nor None.
    """
    return condition if not severity else f"{condition} {severity:g}"


def _plain(value: float | None) -> float | None:
    """A JSON-safe float: NaN (undefined) becomes None."""
    return None if value is None or math.isnan(value) else float(value)


def confidence_scores(
    probs: torch.Tensor,
    entropy: torch.Tensor | None = None,
    mutual_information: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Confidences (higher = more likely correct) for selective and failure prediction.

    Parameters
    ----------
    probs : torch.Tensor
        `(N, C)` predictive probabilities; ``"msp"`` is their maximum.
    entropy : torch.Tensor, optional
        `(N,)` predictive entropy; ``"entropy"`` is its negative.
    mutual_information : torch.Tensor, optional
        `(N,)` mutual information; ``"mutual_information"`` is its negative.

    Returns
    -------
    dict of str to torch.Tensor
        score name -> `(N,)` confidence, for the scores given.
    """
    scores = {"msp": probs.detach().double().amax(-1)}
    for name, uncertainty in (("entropy", entropy), ("mutual_information", mutual_information)):
        if uncertainty is not None:
            scores[name] = -uncertainty.detach().double()
    return scores


@fill_doc
def selective_values(confidence: torch.Tensor, correct: torch.Tensor) -> dict[str, float]:
    """``aurc`` and ``eaurc`` (excess over the oracle) of a confidence.

    %(selective_parameters)s

    Returns
    -------
    dict of str to float
        ``{"aurc", "eaurc"}`` (:func:`aurc`, :func:`excess_aurc`).
    """
    return {"aurc": aurc(confidence, correct), "eaurc": excess_aurc(confidence, correct)}


@fill_doc
def failure_values(confidence: torch.Tensor, correct: torch.Tensor) -> dict[str, float]:
    """``auroc`` and ``fpr95`` of telling correct from wrong predictions; NaN without both.

    %(selective_parameters)s

    Returns
    -------
    dict of str to float
        ``{"auroc", "fpr95"}`` (:func:`failure_auroc`, :func:`failure_fpr95`), both NaN when
        every prediction is correct or none is.
    """
    if bool(correct.all()) or not bool(correct.any()):
        return {"auroc": math.nan, "fpr95": math.nan}
    return {
        "auroc": failure_auroc(confidence, correct),
        "fpr95": failure_fpr95(confidence, correct),
    }


def ood_values(
    score_in: torch.Tensor, score_out: torch.Tensor, higher_is_in: bool
) -> dict[str, float]:
    """``auroc`` and ``fpr95`` of separating in- from out-of-distribution inputs.

    Parameters
    ----------
    score_in, score_out : torch.Tensor
        `(N_in,)`, `(N_out,)` scores.
    higher_is_in : bool
        True for a confidence (MSP, MCM), False for an uncertainty (entropy, ...).

    Returns
    -------
    dict of str to float
        ``{"auroc", "fpr95"}`` of :func:`~laplace_vlm.evaluation.detection.ood_metrics`, ID as
        the positive class.
    """
    return ood_metrics(score_in, score_out, higher_is_in=higher_is_in)


@fill_doc
def conformal_values(sets: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """``coverage``, ``set_size`` and ``empty_rate`` of `(N, C)` boolean prediction sets.

    Parameters
    ----------
    sets : torch.Tensor
        `(N, C)` bool, from ``SplitConformal.predict``.
    %(labels)s

    Returns
    -------
    dict of str to float
        ``{"coverage", "set_size", "empty_rate"}``: the fraction of sets holding the label, in
        ``[0, 1]``, the mean number of classes per set and the fraction of empty sets.
    """
    return {
        "coverage": coverage(sets, labels),
        "set_size": mean_set_size(sets),
        "empty_rate": empty_rate(sets),
    }


def check_rows(rows: Iterable[Row]) -> list[Row]:
    """Raise a ``ValueError`` unless every row has exactly the schema's keys and types.

    Parameters
    ----------
    rows : iterable of dict
        benchmark rows.

    Returns
    -------
    list of dict
        the rows.
    """
    rows = list(rows)
    for i, row in enumerate(rows):
        if tuple(row) != ROW_KEYS:
            raise ValueError(f"rows[{i}] has keys {tuple(row)}, expected {ROW_KEYS}.")
        if row["task"] not in TASKS or row["metric"] not in METRICS[row["task"]]:
            raise ValueError(f"rows[{i}]: metric {row['metric']!r} of task {row['task']!r}.")
        if row["value"] is not None and not isinstance(row["value"], float):
            raise ValueError(f"rows[{i}]: value must be a float or None, got {row['value']!r}.")
    return rows


def write_json(path: str | os.PathLike, settings: Mapping[str, Any], rows: Iterable[Row]) -> Path:
    """Write ``{"settings": settings, "rows": rows}`` as strict JSON (no NaN).

    Parameters
    ----------
    path : path
        the file (its folder is created); an existing file of that name is replaced.
    settings : mapping
        JSON-serialisable description of the run.
    rows : iterable of dict
        benchmark rows, checked with :func:`check_rows`.

    Returns
    -------
    Path
        ``path`` as a ``pathlib.Path``, the file written.
    """
    path = Path(path)
    text = json.dumps(
        {"settings": dict(settings), "rows": check_rows(rows)}, indent=1, allow_nan=False
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")
    return path


@_fill_doc
def select(rows: Iterable[Row], **where: Any) -> list[Row]:
    """The rows whose keys equal every ``where`` item, e.g. ``select(rows, metric="nlpd")``.

    %(where_parameters)s

    Returns
    -------
    list of dict
        the matching rows, in their order; empty if none matches.
    """
    unknown = set(where) - set(ROW_KEYS)
    if unknown:
        raise ValueError(f"where: {sorted(unknown)} are not row keys {ROW_KEYS}.")
    return [row for row in rows if all(row[k] == v for k, v in where.items())]


@_fill_doc
def value(rows: Iterable[Row], **where: Any) -> float | None:
    """The value of the one row matching ``where`` (a ``ValueError`` unless exactly one).

    %(where_parameters)s

    Returns
    -------
    float or None
        that row's ``"value"`` (None where the metric is undefined).
    """
    found = select(rows, **where)
    if len(found) != 1:
        raise ValueError(f"where: {where} matches {len(found)} rows, expected 1.")
    return found[0]["value"]


def pivot_table(rows: Iterable[Row], metrics: tuple[str, ...], score: str | None = None) -> str:
    """A text table: one line per (task, condition, severity), one column per method.

    Each cell holds the ``metrics`` values joined by ``/``, e.g. ``0.017/0.077``.

    Parameters
    ----------
    rows : iterable of dict
        benchmark rows of one data set.
    metrics : tuple of str
        the metrics shown in each cell, in order.
    score : str, optional
        keep only rows of this score (None: rows without a score).

    Returns
    -------
    str
        the table's lines joined by newlines: a title, the header of methods, a rule, then one
        line per (task, condition, severity).
    """
    rows = [r for r in rows if r["metric"] in metrics and r["score"] == score]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    lines: dict[tuple, dict[str, dict[str, float | None]]] = {}
    for r in rows:
        key = (r["task"], r["condition"], r["severity"])
        lines.setdefault(key, {}).setdefault(r["method"], {})[r["metric"]] = r["value"]
    width = max([len(m) for m in methods] + [6 * len(metrics)]) + 2
    header = f"{'condition':<22}" + "".join(f"{m:>{width}}" for m in methods)
    out = [f"{'/'.join(metrics)}" + (f" ({score})" if score else ""), header, "-" * len(header)]
    for (_, condition, severity), by_method in lines.items():
        label = condition_label(condition, severity)
        cells = ("/".join(_cell(by_method.get(m, {}).get(k)) for k in metrics) for m in methods)
        out.append(f"{label:<22}" + "".join(f"{c:>{width}}" for c in cells))
    return "\n".join(out)


def _cell(value: float | None) -> str:
    return "nan" if value is None else f"{value:.3f}"
