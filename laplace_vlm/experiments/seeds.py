"""Results over training seeds: the benchmark on K independently trained stand-ins.

One shipped stand-in is one draw of its training: a difference of 0.003 between two methods on
it may be the method or the draw. :func:`run_over_seeds` runs the benchmark on K stand-ins that
differ only in their training seed (initialisation, batch order, captions); the split, the
shifts, the curvature captions and the Monte Carlo draws stay at the config's seed, so the K
runs differ by the training draw alone. Training seed ``config.seed`` is the shipped model.

Every method is evaluated on the same K models, so a comparison is paired:
:func:`paired_differences` takes the per-seed difference of two methods and its standard error
``std(d, ddof=1) / sqrt(K)``, and :func:`win_counts` counts a win or loss only where the mean
difference exceeds two of those standard errors.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from laplace_vlm.evaluation.tables import ROW_KEYS, Row, check_rows
from laplace_vlm.experiments.benchmark import BenchmarkResult, run_benchmark
from laplace_vlm.experiments.experiment import ExperimentConfig

# a row's identity: every key but its value
_IDENTITY = tuple(k for k in ROW_KEYS if k != "value")
# the wins the README reports: (method, baseline, task, score, metric, higher is better)
COMPARISONS: tuple[tuple[str, str, str, str | None, str, bool], ...] = tuple(
    (method, baseline, "calibration", None, metric, False)
    for method, baseline in (
        ("bayesvlm", "map"),
        ("bayesvlm", "temperature"),
        ("laplace_probcosine", "map"),
        ("laplace_probcosine", "temperature"),
        ("laplace_glm", "temperature"),
        ("laplace_nn", "temperature"),
        ("laplace_probcosine_exact", "temperature"),
    )
    for metric in ("nlpd", "ece15")
) + (
    ("bayesvlm", "map", "selective", "msp", "aurc", False),
    ("temperature", "map", "selective", "msp", "aurc", False),
    *(("bayesvlm", "map", "ood", score, "auroc", True) for score in ("msp", "entropy", "mcm")),
    ("temperature", "map", "ood", "msp", "auroc", True),
)

CONFORMAL_METRICS = ("coverage", "set_size", "empty_rate")
CONFORMAL_METHODS = ("map", "temperature", "bayesvlm")
CONFORMAL_CAPTIONS = {
    "lac": "Conformal LAC (alpha = 0.1) calibrated on clean validation, coverage / set size / "
    "empty rate:",
    "lac_target50": "The same recalibrated on 50 labelled images of each condition "
    "(`lac_target50`):",
}


def seed_configs(config: ExperimentConfig, k: int) -> list[ExperimentConfig]:
    """``k`` copies of ``config`` with training seeds ``config.seed .. config.seed + k - 1``.

    Parameters
    ----------
    config : ExperimentConfig
        the experiment; its ``train_config`` overrides are kept.
    k : int
        number of training seeds, ``>= 1``.

    Returns
    -------
    list of ExperimentConfig
        the first trains (or loads) the stand-in at ``config.seed``, the shipped one at the
        defaults.
    """
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}.")
    if k < 1:
        raise ValueError(f"k must be a positive number of training seeds, got {k}.")
    base = dict(config.train_config or {})
    first = int(base.pop("seed", config.seed))
    return [dataclasses.replace(config, train_config={**base, "seed": first + s}) for s in range(k)]


def run_over_seeds(
    config: ExperimentConfig,
    k: int,
    run: Callable[..., BenchmarkResult] = run_benchmark,
    **kwargs,
) -> list[BenchmarkResult]:
    """The benchmark on ``k`` stand-ins that differ only in their training seed.

    Parameters
    ----------
    config : ExperimentConfig
        the experiment (data set, split seed, cache, ...).
    k : int
        number of training seeds (models not shipped or cached are trained, minutes each).
    run : callable
        ``run(config, **kwargs) -> BenchmarkResult`` (tests pass a cheaper one).
    **kwargs
        passed to ``run`` (tasks, severities, alpha).

    Returns
    -------
    list of BenchmarkResult
        one per training seed, in seed order; ``settings["train_seed"]`` says which.
    """
    results = []
    for c in seed_configs(config, k):
        results.append(run(c, **kwargs))
        results[-1].settings["train_seed"] = c.train_config["seed"]
    return results


def _values(rows_per_seed: Sequence[Sequence[Row]]) -> dict[tuple, list[float | None]]:
    """Row identity -> its value in each seed's rows (every seed must have the same rows)."""
    table: dict[tuple, list[float | None]] = {}
    for i, rows in enumerate(rows_per_seed):
        for row in rows:
            values = table.setdefault(tuple(row[k] for k in _IDENTITY), [])
            if len(values) != i:
                raise ValueError(f"rows_per_seed: seed {i} repeats or misses {row}.")
            values.append(row["value"])
    if any(len(v) != len(rows_per_seed) for v in table.values()):
        raise ValueError("rows_per_seed: the seeds' runs do not hold the same rows.")
    return table


def mean_se(values: Sequence[float | None]) -> tuple[float | None, float | None, int]:
    """Mean, standard error ``std(ddof=1) / sqrt(n)`` and ``n`` of the defined values.

    Parameters
    ----------
    values : sequence of float or None
        one value per seed; None (undefined) is left out.

    Returns
    -------
    mean : float or None
        None where no value is defined.
    se : float or None
        None where fewer than two values are defined.
    n : int
        the number of defined values.
    """
    x = np.array([v for v in values if v is not None], dtype=np.float64)
    if len(x) == 0:
        return None, None, 0
    se = float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else None
    return float(x.mean()), se, len(x)


def summarise(rows_per_seed: Sequence[Sequence[Row]]) -> list[Row]:
    """One row per row identity: ``value`` the mean over seeds, plus ``se`` and ``k``.

    Parameters
    ----------
    rows_per_seed : sequence of list of dict
        each seed's benchmark rows (the same rows in each).

    Returns
    -------
    list of dict
        rows with the keys ``ROW_KEYS`` + ``("se", "k")``, in the first seed's order.
    """
    out = []
    for identity, values in _values(rows_per_seed).items():
        mean, se, n = mean_se(values)
        out.append({**dict(zip(_IDENTITY, identity)), "value": mean, "se": se, "k": n})
    return out


def paired_differences(
    rows_per_seed: Sequence[Sequence[Row]],
    method: str,
    baseline: str,
    task: str,
    metric: str,
    score: str | None = None,
) -> list[dict]:
    """Per condition: mean and standard error over seeds of ``method - baseline``.

    Parameters
    ----------
    rows_per_seed : sequence of list of dict
        each seed's benchmark rows.
    method, baseline : str
        the two methods compared on the same stand-ins.
    task, metric : str
        e.g. ``"calibration"``, ``"nlpd"``.
    score : str, optional
        the rows' score (None: rows without one).

    Returns
    -------
    list of dict
        ``{"condition", "severity", "diff", "se", "k"}`` per condition, in row order.
    """
    values = _values(rows_per_seed)
    out = []
    for identity, a in values.items():
        row = dict(zip(_IDENTITY, identity))
        if (row["method"], row["task"], row["metric"], row["score"]) != (
            method,
            task,
            metric,
            score,
        ):
            continue
        b = values.get(tuple({**row, "method": baseline}[k] for k in _IDENTITY))
        if b is None:
            raise ValueError(f"baseline: no {baseline!r} rows beside {method!r}.")
        d = [x - y if x is not None and y is not None else None for x, y in zip(a, b)]
        diff, se, n = mean_se(d)
        out.append(
            {"condition": row["condition"], "severity": row["severity"], "diff": diff}
            | {"se": se, "k": n}
        )
    if not out:
        raise ValueError(f"method: no {method!r} rows of {task}/{metric}/{score}.")
    return out


def win_counts(
    rows_per_seed: Sequence[Sequence[Row]],
    comparison: tuple[str, str, str, str | None, str, bool],
) -> dict[str, int]:
    """Conditions where ``method`` beats / loses to ``baseline`` by more than two SE.

    Parameters
    ----------
    rows_per_seed : sequence of list of dict
        each seed's benchmark rows, at least two seeds.
    comparison : tuple
        ``(method, baseline, task, score, metric, higher_is_better)`` (see ``COMPARISONS``).

    Returns
    -------
    dict
        ``{"wins", "losses", "ties", "conditions"}``: a tie is a difference within 2 SE.
    """
    if len(rows_per_seed) < 2:
        raise ValueError("rows_per_seed: a standard error needs at least two seeds.")
    method, baseline, task, score, metric, higher = comparison
    counts = {"wins": 0, "losses": 0, "ties": 0, "conditions": 0}
    for d in paired_differences(rows_per_seed, method, baseline, task, metric, score):
        counts["conditions"] += 1
        if d["diff"] is None or d["se"] is None or abs(d["diff"]) <= 2 * d["se"]:
            counts["ties"] += 1
        else:
            counts["wins" if (d["diff"] > 0) == higher else "losses"] += 1
    return counts


def comparisons_in(rows: Sequence[Row]) -> list[tuple]:
    """The ``COMPARISONS`` whose two methods both have rows of its task, score and metric.

    A run with fewer tasks or methods reports the comparisons it has.

    Parameters
    ----------
    rows : sequence of dict
        one seed's benchmark rows.

    Returns
    -------
    list of tuple
        the comparisons, in ``COMPARISONS`` order.
    """
    have = {(r["method"], r["task"], r["score"], r["metric"]) for r in rows}
    return [c for c in COMPARISONS if {(m, *c[2:5]) for m in c[:2]} <= have]


def markdown_report(results: Sequence[BenchmarkResult]) -> str:
    """The README's result tables of one data set, from the rows (mean ± SE over seeds).

    Parameters
    ----------
    results : sequence of BenchmarkResult
        one per training seed (:func:`run_over_seeds`); one result gives its plain values.

    Returns
    -------
    str
        markdown: a heading, the calibration, selective, conformal and OOD tables, the chosen
        pseudo-counts and, for two or more seeds, the wins beyond two standard errors.
    """
    from laplace_vlm.evaluation import markdown as md

    rows_per_seed = [r.rows for r in results]
    k = len(results)
    rows = summarise(rows_per_seed) if k > 1 else list(rows_per_seed[0])
    dataset = rows[0]["dataset"]
    seeds = [r.settings.get("train_seed") for r in results]
    what = f"mean ± SE over K = {k} training seeds {seeds}" if k > 1 else "the shipped stand-in"
    acc = md._lookup(rows, task="calibration", score=None).get(("map", "clean", 0.0, "acc"))
    parts = [
        f"#### {dataset}: {what}",
        f"NLPD / ECE15 (clean MAP test accuracy {md.cell(acc['value'], acc.get('se'))}):",
        md.method_table(rows, "calibration", ("nlpd", "ece15")),
        "Selective prediction, AURC (MSP):",
        md.method_table(rows, "selective", ("aurc",), score="msp"),
        *(
            part
            for score, caption in CONFORMAL_CAPTIONS.items()
            for part in (
                caption,
                md.method_table(
                    rows, "conformal", CONFORMAL_METRICS, score, methods=CONFORMAL_METHODS
                ),
            )
        ),
        "OOD, AUROC / FPR95 (MCM on the MAP cosines for `map`, on the expected cosines for "
        "`bayesvlm`; `temperature`'s MSP is temperature-scaled):",
        md.ood_table(rows, CONFORMAL_METHODS),
        "Chosen pseudo-counts: "
        + "; ".join(
            ", ".join(f"{m} {n:g}" for m, n in r.settings["pseudo_counts"].items()) for r in results
        ),
    ]
    if k > 1:
        counts = [(c, win_counts(rows_per_seed, c)) for c in comparisons_in(rows)]
        parts += ["Wins over all conditions, beyond two paired standard errors:"]
        parts.append(md.wins_table(counts, k))
    return "\n\n".join(parts) + "\n"


def write_seed_json(path: str | os.PathLike, results: Sequence[BenchmarkResult]) -> Path:
    """Write every seed's settings and rows, the summary rows and the win counts as JSON.

    Parameters
    ----------
    path : path
        the file (its folder is created); an existing file of that name is replaced, as
        ``--json`` does for one seed.
    results : sequence of BenchmarkResult
        one per training seed, at least two.

    Returns
    -------
    Path
        the file written: ``{"settings": [...], "rows": [[...], ...], "summary": [...],
        "wins": [...]}``.
    """
    rows_per_seed = [check_rows(r.rows) for r in results]
    wins = [
        {"comparison": list(c), **win_counts(rows_per_seed, c)}
        for c in comparisons_in(rows_per_seed[0])
    ]
    blob = {
        "settings": [r.settings for r in results],
        "rows": rows_per_seed,
        "summary": summarise(rows_per_seed),
        "wins": wins,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(blob, indent=1, allow_nan=False) + "\n")
    return path
