"""Markdown tables of active-learning results: the README's tables, generated, never typed.

``laplace-vlm active --markdown PATH`` writes them for one cell, for K stand-ins
(``--train-seeds``) and for the sweep; every number is read from the same summaries that the
plain-text report prints (:mod:`laplace_vlm.active.report`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from laplace_vlm.active.report import (
    Summary,
    beats_baselines,
    claim_counts,
    counted_cells,
    paired_differences,
)
from laplace_vlm.evaluation.markdown import markdown_table


def _budgets(rows: Mapping[str, Mapping]) -> list[str]:
    return sorted({b for by_budget in rows.values() for b in by_budget}, key=int)


def accuracy_table(summary: Summary, unit: str = "seeds") -> str:
    """``strategy | acc at every budget`` as ``mean ± std``.

    Parameters
    ----------
    summary : Summary
        :func:`laplace_vlm.active.report.summarize` (or a summary over stand-ins).
    unit : str
        what the std is over, for the header (``"seeds"``, ``"stand-ins"``).

    Returns
    -------
    str
        a markdown table, one line per strategy in the summary's order.
    """
    budgets = _budgets(summary)
    header = [f"strategy (accuracy, mean ± std over {unit})", *budgets]
    body = [[s, *(f"{r['acc_mean']:.3f} ± {r['acc_std']:.3f}" if (r := rows.get(b)) else "–"
                  for b in budgets)] for s, rows in summary.items()]  # fmt: skip
    return markdown_table(header, body)


def differences_table(differences: Mapping[str, Mapping[str, Mapping]], baseline: str,
                      unit: str = "seeds") -> str:  # fmt: skip
    """``strategy | paired difference to baseline at every budget`` as ``mean ± SE [ahead/n]``.

    Parameters
    ----------
    differences : mapping
        :func:`laplace_vlm.active.report.paired_differences`'s output.
    baseline : str
        its name, for the header.
    unit : str
        what is paired (``"seeds"``, ``"stand-ins"``).

    Returns
    -------
    str
        a markdown table.
    """
    budgets = _budgets(differences)
    header = [f"minus {baseline} (mean ± SE over paired {unit} [ahead / n])", *budgets]
    body = [[s, *(f"{d['mean']:+.3f} ± {d['se']:.3f} [{d['wins']}/{d['n']}]"
                  if (d := rows.get(b)) else "–" for b in budgets)]
            for s, rows in differences.items()]  # fmt: skip
    return markdown_table(header, body)


def label_entropy_table(summary: Summary) -> str:
    """``strategy | label entropy of the picks at every labelled budget`` (nats).

    Parameters
    ----------
    summary : Summary
        with ``label_entropy_mean`` in its rows.

    Returns
    -------
    str
        a markdown table; ``–`` where a row has no label entropy.
    """
    budgets = [b for b in _budgets(summary) if b != "0"]
    body = [[s, *(f"{r['label_entropy_mean']:.2f}" if "label_entropy_mean" in (r := rows.get(b, {}))
                  else "–" for b in budgets)] for s, rows in summary.items()]  # fmt: skip
    return markdown_table(["strategy (label entropy, nats)", *budgets], body)


def cell_markdown(summary: Summary, description: str, baselines: Sequence[str],
                  unit: str = "seeds") -> str:  # fmt: skip
    """One cell's description, accuracy, paired differences and label entropy tables.

    Parameters
    ----------
    summary : Summary
        the cell's summary (over seeds, or over stand-ins).
    description : str
        the line naming the cell.
    baselines : sequence of str
        the strategies subtracted, each in its own table.
    unit : str
        ``"seeds"`` or ``"stand-ins"``.

    Returns
    -------
    str
        the tables, blank-line separated.
    """
    parts = [description, accuracy_table(summary, unit)]
    parts += [differences_table(paired_differences(summary, b), b, unit)
              for b in baselines if b in summary]  # fmt: skip
    if any("label_entropy_mean" in r for rows in summary.values() for r in rows.values()):
        parts.append(label_entropy_table(summary))
    return "\n\n".join(parts) + "\n"


# the goal: beat both baselines wherever the zero-shot accuracy is at least this
GOAL_ZERO_SHOT = 0.5


def claims_table(cells: Sequence[Mapping], strategies: Sequence[str], baselines: Sequence[str],
                 min_zero_shot: float = GOAL_ZERO_SHOT) -> str:  # fmt: skip
    """``strategy | wins / losses of n against each baseline`` over the sweep's cells.

    Parameters
    ----------
    cells : sequence of mapping
        sweep cells.
    strategies : sequence of str
        the rows; a strategy is not judged against itself.
    baselines : sequence of str
        the columns.
    min_zero_shot : float
        only cells with at least this zero-shot accuracy count.

    Returns
    -------
    str
        a markdown table: per baseline, wins / losses (beyond two paired SE) over all counted
        cells and budgets, and in brackets at the largest budget.
    """
    n_cells = len(counted_cells(cells, min_zero_shot))
    header = [f"strategy ({n_cells} cells with zero-shot >= {min_zero_shot:g})"]
    header += [f"vs {b}: wins / losses of n (at the largest budget)" for b in baselines]
    body = []
    for strategy in strategies:
        row = [strategy]
        for baseline in baselines:
            if strategy == baseline:
                row.append("")
                continue
            k = claim_counts(cells, strategy, baseline, min_zero_shot)
            row.append(f"{k['wins']} / {k['losses']} of {k['n']} "
                       f"({k['wins_largest']} / {k['losses_largest']} of {k['n_largest']})")  # fmt: skip
        body.append(row)
    return markdown_table(header, body)


def agreement_table(cells: Sequence[Mapping]) -> str:
    """``cell | BALD and EPIG rank agreement of two Monte Carlo seeds`` at round 0.

    Parameters
    ----------
    cells : sequence of mapping
        sweep cells with ``mc_agreement`` (:func:`laplace_vlm.active.selection.mc_agreement`).

    Returns
    -------
    str
        a markdown table: samples, candidates, and per score the Spearman and top-k overlap.
    """
    body = []
    for c in (c for c in cells if not c.get("skipped")):
        a = c["mc_agreement"]
        body.append([f"{c['dataset']} {c['shift']} {c['severity']:g}", str(a["n_samples"]),
                     str(a["candidates"]),
                     *(f"{a[s]['spearman']:.3f}, {a[s]['top_k_overlap']}/{a[s]['k']}"
                       for s in ("bald", "epig"))])  # fmt: skip
    header = ["cell", "samples", "candidates", "BALD Spearman, top-k", "EPIG Spearman, top-k"]
    return markdown_table(header, body)


def sweep_markdown(cells: Sequence[Mapping], strategy: str, baselines: Sequence[str],
                   posterior_strategies: Sequence[str]) -> str:  # fmt: skip
    """The sweep: ``strategy`` minus each baseline per cell, and who beats both in each cell.

    Parameters
    ----------
    cells : sequence of mapping
        sweep cells (``dataset``, ``shift``, ``severity``, ``zero_shot_acc``, ``differences``;
        skipped cells are left out).
    strategy : str
        the strategy of the difference tables (the default one).
    baselines : sequence of str
        the baselines.
    posterior_strategies : sequence of str
        the strategies judged in the last table.

    Returns
    -------
    str
        one table per baseline (a line per cell, a column per budget), a table of the
        posterior strategies ahead of every baseline at every budget (``clear``: by more
        than two paired SE at the largest), the wins and losses of every strategy where
        zero-shot accuracy is at least :data:`GOAL_ZERO_SHOT` (:func:`claims_table`), and the
        Monte Carlo agreement of every cell (:func:`agreement_table`).
    """
    ran = [c for c in cells if not c.get("skipped")]
    name = [f"{c['dataset']} {c['shift']} {c['severity']:g}" for c in ran]
    parts = []
    for baseline in baselines:
        rows = [c["differences"][baseline][strategy] for c in ran]
        budgets = _budgets({n: r for n, r in zip(name, rows)})
        body = [[n, f"{c['zero_shot_acc']:.3f}",
                 *(f"{r[b]['mean']:+.3f} ± {r[b]['se']:.3f}" for b in budgets)]
                for n, c, r in zip(name, ran, rows)]  # fmt: skip
        parts.append(markdown_table([f"cell: {strategy} minus {baseline}", "zero-shot",
                                     *budgets], body))  # fmt: skip
    body = []
    for n, c in zip(name, ran):
        judged = {s: beats_baselines(c["differences"], s, baselines) for s in posterior_strategies}
        wins = [s + (" (clear)" if v["clear_at_largest"] else "")
                for s, v in judged.items() if v["every_budget"]]  # fmt: skip
        body.append([n, f"{c['zero_shot_acc']:.3f}", ", ".join(wins) or "none"])
    parts.append(markdown_table(["cell", "zero-shot", "ahead of " + " and ".join(baselines)
                                 + " at every budget"], body))  # fmt: skip
    every = list(ran[0]["differences"][baselines[0]]) if ran else []  # all but baselines[0]
    parts.append(claims_table(ran, every, baselines))
    if all("mc_agreement" in c for c in ran):
        parts.append(agreement_table(ran))
    return "\n\n".join(parts) + "\n"
