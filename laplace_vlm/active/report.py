"""Summaries, paired comparisons and plain-text tables of active-learning results.

The figures of the same summaries are in :mod:`laplace_vlm.active.figures`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

Summary = Mapping[str, Mapping[str, Mapping[str, float]]]
"""``{strategy: {budget (str): {"acc_mean", "acc_std", "ece_mean", ...}}}``."""
METRICS: tuple[str, ...] = ("ece", "nlpd", "map_acc", "pseudo_count", "labels_used",
                            "label_entropy")  # fmt: skip


def summarize(results: Mapping[str, Mapping[int, Sequence[Mapping[str, float]]]]) -> dict:
    """``{strategy: {budget: {acc_mean, acc_std, ece_mean, nlpd_mean, map_acc_mean,
    pseudo_count_mean, labels_used_mean, label_entropy_mean, class_counts_mean,
    labels_used_max, n_seeds, acc_per_seed}}}``.

    Budgets become strings (JSON keys); the std is the sample std over seeds (0 for one seed);
    ``acc_per_seed`` (in seed order) allows paired comparisons between strategies.

    Parameters
    ----------
    results : mapping
        ``{strategy: {budget: [metrics of each seed]}}`` (:func:`run_experiment`).

    Returns
    -------
    dict
        a :data:`Summary`: budgets in increasing order, the keys above in every row (a mean
        only where every seed has the metric).
    """
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for strategy, by_budget in results.items():
        summary[strategy] = {}
        for budget in sorted(by_budget):
            runs = by_budget[budget]
            acc = torch.tensor([r["acc"] for r in runs], dtype=torch.float64)
            row = {"acc_mean": acc.mean().item(),
                   "acc_std": acc.std().item() if len(acc) > 1 else 0.0}  # fmt: skip
            for key in METRICS:
                if all(key in r for r in runs):
                    row[f"{key}_mean"] = sum(float(r[key]) for r in runs) / len(runs)
            if all("labels_used" in r for r in runs):
                row["labels_used_max"] = max(int(r["labels_used"]) for r in runs)
            if all("class_counts" in r for r in runs):  # the mean class histogram
                counts = torch.tensor([r["class_counts"] for r in runs], dtype=torch.float64)
                row["class_counts_mean"] = counts.mean(0).tolist()
            row["n_seeds"] = len(runs)
            row["acc_per_seed"] = acc.tolist()
            summary[strategy][str(budget)] = row
    return summary


def paired_difference(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """Mean of ``a - b`` over paired seeds, its standard error and the share of wins.

    ``se = std(a - b, ddof=1) / sqrt(n)`` (0 for one pair); ``wins`` counts ``a > b``.

    Parameters
    ----------
    a, b : sequence of float
        the same seeds in the same order.

    Returns
    -------
    dict
        ``mean`` and ``se`` of ``a - b``, ``wins`` (the count of ``a > b``) and ``n`` pairs.
    """
    if len(a) != len(b) or not a:
        raise ValueError(f"a and b must be paired non-empty sequences, got {len(a)} and {len(b)}.")
    d = torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64)
    se = d.std().item() / math.sqrt(len(d)) if len(d) > 1 else 0.0
    return {"mean": d.mean().item(), "se": se, "wins": int((d > 0).sum()), "n": len(d)}


def paired_differences(summary: Summary, baseline: str) -> dict[str, dict[str, dict[str, float]]]:
    """``{strategy: {budget: paired_difference(strategy, baseline)}}`` at every budget > 0.

    Parameters
    ----------
    summary : mapping
        :func:`summarize`'s output (with ``acc_per_seed``).
    baseline : str
        the strategy subtracted.

    Returns
    -------
    dict
        every strategy but ``baseline`` -> budget (str) -> its :func:`paired_difference`.
    """
    if baseline not in summary:
        raise ValueError(f"baseline {baseline!r} is not among {sorted(summary)}.")
    base = summary[baseline]
    out: dict[str, dict[str, dict[str, float]]] = {}
    for strategy, rows in summary.items():
        if strategy == baseline:
            continue
        out[strategy] = {b: paired_difference(rows[b]["acc_per_seed"], base[b]["acc_per_seed"])
                         for b in rows if b != "0" and b in base}  # fmt: skip
    return out


def format_table(summary: Summary) -> str:
    """Plain-text table of ``acc mean±std (ECE)`` per strategy and budget, with the labels used.

    Parameters
    ----------
    summary : mapping
        :func:`summarize`'s output.

    Returns
    -------
    str
        one line per strategy, one column per budget (``-`` where a strategy lacks it), and a
        last line with the labels used.
    """
    budgets = sorted({b for rows in summary.values() for b in rows}, key=int)
    width = max(len(s) for s in summary) + 2
    lines = ["strategy".ljust(width) + "".join(f"{'n=' + b:>20}" for b in budgets)]
    for strategy, rows in summary.items():
        cells = [f"{r['acc_mean']:.3f}±{r['acc_std']:.3f} ({r['ece_mean']:.3f})"
                 if (r := rows.get(b)) else "-" for b in budgets]  # fmt: skip
        lines.append(strategy.ljust(width) + "".join(f"{c:>20}" for c in cells))
    used = _labels_line(summary, budgets)
    return "\n".join(lines + [f"(acc mean±std over seeds, ECE in brackets; {used})"])


def _labels_line(summary: Summary, budgets: list[str]) -> str:
    used = [max((rows[b].get("labels_used_max", -1) for rows in summary.values() if b in rows),
                default=-1) for b in budgets]  # fmt: skip
    return "labels used in total: " + ", ".join(
        f"n={b}: {int(u)}" if u >= 0 else f"n={b}: ?" for b, u in zip(budgets, used)
    )


def beats_baselines(differences: Mapping[str, Mapping], strategy: str,
                    baselines: Sequence[str]) -> dict[str, bool]:  # fmt: skip
    """Whether ``strategy`` beats every baseline: at every budget, and clearly at the largest.

    Parameters
    ----------
    differences : mapping
        ``{baseline: paired_differences(summary, baseline)}``.
    strategy : str
        the strategy judged.
    baselines : sequence of str
        the baselines it must beat (each a key of ``differences``).

    Returns
    -------
    dict
        ``every_budget``: a positive mean paired difference to every baseline at every budget;
        ``clear_at_largest``: a win (:func:`paired_verdict`: more than two paired standard
        errors) over every baseline at the largest budget.
    """
    rows = [differences[b][strategy] for b in baselines]
    largest = [r[max(r, key=int)] for r in rows]
    return {"every_budget": all(d["mean"] > 0 for r in rows for d in r.values()),
            "clear_at_largest": all(paired_verdict(d) == "win" for d in largest)}  # fmt: skip


def paired_verdict(d: Mapping[str, float]) -> str:
    """``"win"``, ``"loss"`` or ``"tie"``: a paired difference beyond two standard errors.

    Parameters
    ----------
    d : mapping
        :func:`paired_difference`'s ``mean``, ``se`` and ``n``.

    Returns
    -------
    str
        ``win`` where ``mean > 2 se``, ``loss`` where ``mean < -2 se``, else ``tie``; always
        ``tie`` for one pair, whose standard error of 0 would make any difference a claim.
    """
    if d["n"] < 2:
        return "tie"
    return "win" if d["mean"] > 2 * d["se"] else "loss" if d["mean"] < -2 * d["se"] else "tie"


def counted_cells(cells: Sequence[Mapping], min_zero_shot: float) -> list[Mapping]:
    """The sweep cells that ran and have at least ``min_zero_shot`` zero-shot accuracy.

    Parameters
    ----------
    cells : sequence of mapping
        sweep cells (``zero_shot_acc``; ``skipped`` on cells that did not run).
    min_zero_shot : float
        the threshold.

    Returns
    -------
    list of mapping
        those cells, in order.
    """
    return [c for c in cells if not c.get("skipped") and c["zero_shot_acc"] >= min_zero_shot]


def claim_counts(cells: Sequence[Mapping], strategy: str, baseline: str,
                 min_zero_shot: float) -> dict[str, int]:  # fmt: skip
    """Wins and losses (:func:`paired_verdict`) of ``strategy`` against ``baseline`` in a sweep.

    Parameters
    ----------
    cells : sequence of mapping
        sweep cells with ``zero_shot_acc`` and ``differences`` (skipped cells are left out).
    strategy, baseline : str
        the strategy judged and the one subtracted.
    min_zero_shot : float
        only cells with at least this zero-shot accuracy count.

    Returns
    -------
    dict
        ``wins``, ``losses`` and ``n`` over every counted cell and budget; ``wins_largest``,
        ``losses_largest`` and ``n_largest`` at each cell's largest budget.
    """
    out = dict.fromkeys(("wins", "losses", "n", "wins_largest", "losses_largest", "n_largest"), 0)
    for cell in counted_cells(cells, min_zero_shot):
        rows = cell["differences"][baseline][strategy]
        largest = max(rows, key=int)
        for budget, d in rows.items():
            verdict = paired_verdict(d)
            for suffix in ("", "_largest") if budget == largest else ("",):
                out["wins" + suffix] += verdict == "win"
                out["losses" + suffix] += verdict == "loss"
                out["n" + suffix] += 1
    return out


def rank_agreement(a: torch.Tensor, b: torch.Tensor, k: int) -> dict[str, float]:
    """How alike two score vectors rank the same points: Spearman and top-k overlap.

    Parameters
    ----------
    a, b : torch.Tensor
        `(N,)` scores of the same points (e.g. two Monte Carlo seeds of BALD).
    k : int
        the size of the top compared (capped at N).

    Returns
    -------
    dict
        ``spearman`` (scipy's rank correlation), ``top_k_overlap`` (points in both top-k),
        ``k``.
    """
    from scipy.stats import spearmanr

    if a.shape != b.shape or a.dim() != 1:
        raise ValueError(f"a and b must be (N,) of one shape, got {tuple(a.shape)}, "
                         f"{tuple(b.shape)}.")  # fmt: skip
    k = min(int(k), len(a))
    top_a, top_b = set(a.topk(k).indices.tolist()), set(b.topk(k).indices.tolist())
    rho = float(spearmanr(a.double().cpu().numpy(), b.double().cpu().numpy())[0])
    return {"spearman": rho, "top_k_overlap": len(top_a & top_b), "k": k}


def format_balance(summary: Summary) -> str:
    """Plain-text table of the labelled sets' label entropy (nats) per strategy and budget.

    Parameters
    ----------
    summary : mapping
        :func:`summarize`'s output (with ``label_entropy_mean``).

    Returns
    -------
    str
        one line per strategy, one column per budget > 0.
    """
    budgets = sorted({b for rows in summary.values() for b in rows if b != "0"}, key=int)
    width = max(len(s) for s in summary) + 2
    lines = ["label entropy (nats)".ljust(width) + "".join(f"{'n=' + b:>10}" for b in budgets)]
    for strategy, rows in summary.items():
        cells = [f"{r['label_entropy_mean']:.3f}" if (r := rows.get(b)) and
                 "label_entropy_mean" in r else "-" for b in budgets]  # fmt: skip
        lines.append(strategy.ljust(width) + "".join(f"{c:>10}" for c in cells))
    return "\n".join(lines)


def format_differences(differences: Mapping[str, Mapping[str, Mapping[str, float]]],
                       baseline: str) -> str:  # fmt: skip
    """Plain-text table of paired accuracy differences ``mean±se [wins/n]`` to ``baseline``.

    Parameters
    ----------
    differences : mapping
        :func:`paired_differences`'s output.
    baseline : str
        its name, for the header.

    Returns
    -------
    str
        one line per strategy, one column per budget; a note when there is no strategy.
    """
    if not differences:
        return f"(no strategy besides {baseline})"
    budgets = sorted({b for rows in differences.values() for b in rows}, key=int)
    width = max(len(s) for s in differences) + 2
    lines = [f"accuracy minus {baseline}".ljust(width)
             + "".join(f"{'n=' + b:>20}" for b in budgets)]  # fmt: skip
    for strategy, rows in differences.items():
        cells = [f"{r['mean']:+.3f}±{r['se']:.3f} [{r['wins']}/{r['n']}]"
                 if (r := rows.get(b)) else "-" for b in budgets]  # fmt: skip
        lines.append(strategy.ljust(width) + "".join(f"{c:>20}" for c in cells))
    return "\n".join(lines)


def format_agreement(agreement: dict) -> str:
    """One line of a Monte Carlo rank-agreement check (``selection.mc_agreement``).

    Parameters
    ----------
    agreement : dict
        ``{"bald": ..., "epig": ...}`` of :func:`rank_agreement`-style entries (``spearman``,
        ``k``, ``top_k_overlap``), plus ``n_samples`` and ``candidates``.

    Returns
    -------
    str
        Spearman and top-k overlap of BALD and EPIG between two Monte Carlo seeds.
    """
    parts = [f"{s.upper()} Spearman {agreement[s]['spearman']:.3f}, top-{agreement[s]['k']} "
             f"overlap {agreement[s]['top_k_overlap']}/{agreement[s]['k']}"
             for s in ("bald", "epig")]  # fmt: skip
    return (
        f"MC check, round 0 ({agreement['n_samples']} joint samples, "
        f"{agreement['candidates']} candidates, two seeds): " + "; ".join(parts)
    )
