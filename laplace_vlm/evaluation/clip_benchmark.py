"""Benchmark rows as CLIP_benchmark's result JSON, so results sit beside its leaderboards.

CLIP_benchmark (LAION) writes one JSON object per evaluation:
``{"dataset", "model", "pretrained", "task", "metrics", "language"}``, with ``task``
``"zeroshot_classification"`` and ``metrics`` holding ``acc1`` (and ``acc5``,
``mean_per_class_recall``); its ``build`` command collects such objects into a table.
:func:`clip_benchmark_records` makes one object per (condition, method) of the benchmark's
calibration rows: ``acc`` becomes ``acc1``, and the calibration metrics (``nlpd``, ``ece15``,
``ece20``, ``brier``) and, where the rows hold them, the MSP-based selective and failure metrics
(``aurc``, ``eaurc``, ``failure_auroc``, ``failure_fpr95``) are added to ``metrics``. The
rows carry no top-5 accuracy or per-class recall, so those keys are absent rather than made up.

A shifted condition is a data set of its own, named ``"<dataset>/<condition>_<severity>"``
(``"digits/rotation_1"``); the clean test set keeps the data set's name. The post-hoc method
(``"map"``, ``"temperature"``, ``"laplace_probcosine"``, ...) goes into ``pretrained``, so
that every record of a file has its own (model, pretrained) pair, and into ``method``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

from laplace_vlm.evaluation.tables import Row, check_rows

TASK = "zeroshot_classification"
# (row task, row score) -> prefix of the metric names in CLIP_benchmark's "metrics"
_SECTIONS = {("calibration", None): "", ("selective", "msp"): "", ("failure", "msp"): "failure_"}
_RENAME = {"acc": "acc1"}


def dataset_name(dataset: str, condition: str, severity: float | None) -> str:
    """CLIP_benchmark's ``dataset`` of one test condition.

    Parameters
    ----------
    dataset : str
        the in-distribution data set (``"digits"``).
    condition : str
        ``"clean"`` or a shift name.
    severity : float or None
        the shift's severity (None for clean).

    Returns
    -------
    str
        ``dataset`` for the clean condition, else ``"<dataset>/<condition>_<severity>"``.
    """
    if condition == "clean":
        return dataset
    return (
        f"{dataset}/{condition}_{severity:g}" if severity is not None else f"{dataset}/{condition}"
    )


def clip_benchmark_records(
    rows: Iterable[Row], model: str, language: str = "en"
) -> list[dict[str, Any]]:
    """One CLIP_benchmark result object per (data set, condition, severity, method).

    Parameters
    ----------
    rows : iterable of dict
        benchmark rows (:func:`laplace_vlm.evaluation.tables.check_rows` checks them).
    model : str
        CLIP_benchmark's ``model``: the model the methods post-process.
    language : str, default='en'
        CLIP_benchmark's ``language`` (of the prompts).

    Returns
    -------
    list of dict
        ``{"dataset", "model", "pretrained", "task", "metrics", "language", "method",
        "condition", "severity"}`` in the order the conditions first appear; ``metrics`` maps
        names to floats (None where a metric is undefined). Conditions without calibration
        rows (OOD pairs, conformal sets) make no record.

    Raises
    ------
    ValueError
        for rows that :func:`check_rows` refuses, or a ``model`` that is not a non-empty
        string.
    """
    if not isinstance(model, str) or not model:
        raise ValueError(f"model must be a non-empty string, got {model!r}.")
    rows = check_rows(rows)
    records: dict[tuple, dict[str, Any]] = {}
    for row in rows:  # a record per condition and method that has calibration rows
        if row["task"] == "calibration":
            records.setdefault(_key(row), _record(row, model, language))
    for row in rows:
        prefix = _SECTIONS.get((row["task"], row["score"]))
        if prefix is not None and _key(row) in records:
            name = prefix + _RENAME.get(row["metric"], row["metric"])
            records[_key(row)]["metrics"][name] = row["value"]
    return list(records.values())


def _key(row: Row) -> tuple:
    return row["dataset"], row["condition"], row["severity"], row["method"]


def _record(row: Row, model: str, language: str) -> dict[str, Any]:
    return {
        "dataset": dataset_name(row["dataset"], row["condition"], row["severity"]),
        "model": model,
        "pretrained": row["method"],
        "task": TASK,
        "metrics": {},
        "language": language,
        "method": row["method"],
        "condition": row["condition"],
        "severity": row["severity"],
    }


def write_clip_benchmark(path: str | os.PathLike, rows: Iterable[Row], model: str) -> Path:
    """Write :func:`clip_benchmark_records` as strict JSON (a list of result objects).

    Parameters
    ----------
    path : str or os.PathLike
        the file (its folder is created); an existing file of that name is replaced, as the
        benchmark's ``--json`` does.
    rows : iterable of dict
        benchmark rows.
    model : str
        CLIP_benchmark's ``model``.

    Returns
    -------
    Path
        the file written.
    """
    path = Path(path)
    text = json.dumps(clip_benchmark_records(rows, model), indent=1, allow_nan=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")
    return path
