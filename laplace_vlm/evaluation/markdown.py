"""Markdown tables of benchmark rows: the README's result tables, generated, never typed.

Rows are those of :mod:`laplace_vlm.evaluation.tables`; a row may carry ``se`` (a standard
error over training seeds, see :mod:`laplace_vlm.experiments.seeds`), shown as ``mean ± se``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from laplace_vlm.evaluation.tables import Row, condition_label

# the README's conditions: clean and each shift's strongest severity
HEADLINE_SEVERITY = 1.0


def markdown_table(header: Sequence[str], body: Iterable[Sequence[str]]) -> str:
    """A GitHub-flavoured markdown table.

    Parameters
    ----------
    header : sequence of str
        the column titles.
    body : iterable of sequence of str
        one sequence of cells per line, as long as ``header``.

    Returns
    -------
    str
        header, rule and lines, joined by newlines.
    """
    lines = [list(header), ["---"] * len(header)]
    for cells in body:
        if len(cells) != len(header):
            raise ValueError(f"body: a line has {len(cells)} cells, the header {len(header)}.")
        lines.append(list(cells))
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def write_new(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to a new file ``path`` (its folders made); an existing file is refused.

    Parameters
    ----------
    path : path
        the file; ``FileExistsError`` if it exists, also if made meanwhile (mode ``"x"``).
    text : str
        the contents.

    Returns
    -------
    Path
        ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "x") as f:  # "x": a file made meanwhile is never replaced
        f.write(text)
    return path


def cell(value: float | None, se: float | None = None, digits: int = 3) -> str:
    """``0.152`` or, with a standard error, ``0.152 ± 0.004``; ``–`` where undefined.

    Parameters
    ----------
    value : float or None
        the number (a mean over seeds where ``se`` is given).
    se : float, optional
        its standard error.
    digits : int
        decimals.

    Returns
    -------
    str
        the cell text.
    """
    if value is None:
        return "–"
    return f"{value:.{digits}f}" + ("" if se is None else f" ± {se:.{digits}f}")


def _lookup(rows: Iterable[Row], **where) -> dict[tuple, Row]:
    """(method, condition, severity, metric) -> row, for the rows matching ``where``."""
    return {
        (r["method"], r["condition"], r["severity"], r["metric"]): r
        for r in rows
        if all(r[k] == v for k, v in where.items())
    }


def _cells(found: Mapping[tuple, Row], key: tuple, metrics: Sequence[str]) -> str:
    parts = []
    for metric in metrics:
        row = found.get((*key, metric))
        parts.append("–" if row is None else cell(row["value"], row.get("se")))
    return " / ".join(parts)


def headline_conditions(rows: Iterable[Row], task: str = "calibration") -> list[tuple]:
    """The (condition, severity) pairs of the README: clean and each shift at severity 1.

    Parameters
    ----------
    rows : iterable of dict
        benchmark rows.
    task : str
        whose conditions.

    Returns
    -------
    list of tuple
        ``(condition, severity)`` in row order.
    """
    keys = (
        (r["condition"], r["severity"])
        for r in rows
        if r["task"] == task and (r["condition"] == "clean" or r["severity"] == HEADLINE_SEVERITY)
    )
    return list(dict.fromkeys(keys))


def method_table(
    rows: Iterable[Row],
    task: str,
    metrics: Sequence[str],
    score: str | None = None,
    conditions: Sequence[tuple] | None = None,
    methods: Sequence[str] | None = None,
) -> str:
    """Lines per condition, a column per method, cells ``metric1 / metric2``.

    Parameters
    ----------
    rows : iterable of dict
        benchmark rows of one data set (optionally with ``se``).
    task : str
        e.g. ``"calibration"``.
    metrics : sequence of str
        shown in each cell, in order.
    score : str, optional
        the rows' score (None: rows without one).
    conditions : sequence of tuple, optional
        ``(condition, severity)`` lines; :func:`headline_conditions` if None.
    methods : sequence of str, optional
        the columns; every method of the rows, in row order, if None.

    Returns
    -------
    str
        the markdown table.
    """
    rows = list(rows)
    found = _lookup(rows, task=task, score=score)
    if methods is None:
        methods = list(dict.fromkeys(k[0] for k in found))
    if conditions is None:
        conditions = headline_conditions(rows, task)
    body = [
        [condition_label(c, s)] + [_cells(found, (m, c, s), metrics) for m in methods]
        for c, s in conditions
    ]
    return markdown_table(["condition", *methods], body)


def ood_table(
    rows: Iterable[Row],
    methods: Sequence[str] = ("map", "bayesvlm"),
    metrics: Sequence[str] = ("auroc", "fpr95"),
) -> str:
    """OOD lines per (OOD set, score), a column per method, cells ``AUROC / FPR95``.

    Parameters
    ----------
    rows : iterable of dict
        benchmark rows of one data set.
    methods : sequence of str
        the columns.
    metrics : sequence of str
        shown in each cell.

    Returns
    -------
    str
        the markdown table.
    """
    rows = [r for r in rows if r["task"] == "ood"]
    pairs = list(dict.fromkeys((r["condition"], r["score"]) for r in rows))
    body = []
    for condition, score in pairs:
        found = _lookup(rows, condition=condition, score=score)
        key = (condition, next(r["severity"] for r in rows if r["condition"] == condition))
        body.append(
            [f"{condition}, {score}"] + [_cells(found, (m, *key), metrics) for m in methods]
        )
    return markdown_table(["out-of-distribution set, score", *methods], body)


def wins_table(counts: Iterable[tuple[tuple, Mapping[str, int]]], k: int) -> str:
    """Wins / ties / losses per comparison, counted beyond two standard errors over ``k`` seeds.

    Parameters
    ----------
    counts : iterable of (tuple, dict)
        ``(method, baseline, task, score, metric, higher_is_better)`` -> ``{"wins", "ties",
        "losses", "conditions"}`` (see :func:`laplace_vlm.experiments.seeds.win_counts`).
    k : int
        the number of training seeds.

    Returns
    -------
    str
        the markdown table.
    """
    body = []
    for (method, baseline, task, score, metric, _), c in counts:
        what = f"{task} {metric}" + (f" ({score})" if score else "")
        body.append(
            [f"{method} vs {baseline}", what]
            + [str(c[x]) for x in ("wins", "ties", "losses", "conditions")]
        )
    header = ["comparison", "metric", f"wins (> 2 SE, K = {k})", "ties", "losses", "conditions"]
    return markdown_table(header, body)
