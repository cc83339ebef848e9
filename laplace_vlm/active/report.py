"""Summaries, paired comparisons, tables and figures of active-learning results.

Figures are ``matplotlib.figure.Figure`` objects (no pyplot state, no backend switch): save
them with :func:`save_figure` or ``fig.savefig``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from matplotlib.figure import Figure

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
        ``clear_at_largest``: more than two paired standard errors above every baseline at the
        largest budget.
    """
    rows = [differences[b][strategy] for b in baselines]
    largest = [r[max(r, key=int)] for r in rows]
    return {"every_budget": all(d["mean"] > 0 for r in rows for d in r.values()),
            "clear_at_largest": all(d["mean"] > 2 * d["se"] for d in largest)}  # fmt: skip


def claim_counts(cells: Sequence[Mapping], strategy: str, baseline: str,
                 min_zero_shot: float) -> dict[str, int]:  # fmt: skip
    """Wins and losses (beyond two paired SE) of ``strategy`` against ``baseline`` in a sweep.

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
    for cell in cells:
        if cell.get("skipped") or cell["zero_shot_acc"] < min_zero_shot:
            continue
        rows = cell["differences"][baseline][strategy]
        largest = max(rows, key=int)
        for budget, d in rows.items():
            win, loss = d["mean"] > 2 * d["se"], d["mean"] < -2 * d["se"]
            for suffix in ("", "_largest") if budget == largest else ("",):
                out["wins" + suffix] += win
                out["losses" + suffix] += loss
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


def learning_curves_figure(summary: Summary, metric: str = "acc", title: str | None = None):
    """Mean ``metric`` (± std over seeds) vs labelled budget, one line per strategy.

    Parameters
    ----------
    summary : mapping
        :func:`summarize`'s output.
    metric : str
        ``"acc"`` or a key with ``_mean`` in the rows (``"ece"``, ``"nlpd"``, ...).
    title : str, optional
        the axes' title.

    Returns
    -------
    matplotlib.figure.Figure
        one axes with a line (and a ± std band where the rows have one) per strategy.
    """
    fig = Figure(figsize=(6.5, 4.2))
    ax = fig.add_subplot()
    for strategy, rows in summary.items():
        budgets = sorted(rows, key=int)
        xs, mean = [int(b) for b in budgets], [rows[b][f"{metric}_mean"] for b in budgets]
        line = ax.plot(xs, mean, marker="o", label=strategy)[0]
        if f"{metric}_std" in rows[budgets[0]]:
            std = [rows[b][f"{metric}_std"] for b in budgets]
            ax.fill_between(xs, [m - s for m, s in zip(mean, std)],
                            [m + s for m, s in zip(mean, std)], alpha=0.12,
                            color=line.get_color())  # fmt: skip
    ax.set(xlabel="labelled budget", ylabel=metric, title=title or f"{metric} on the target")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def differences_vs_zero_shot_figure(cells: Sequence[Mapping], baseline: str, budgets: Sequence[str],
                                    strategies: Sequence[str]):  # fmt: skip
    """Paired accuracy difference to ``baseline`` (± SE) against each cell's zero-shot accuracy.

    Parameters
    ----------
    cells : sequence of mapping
        sweep cells with ``zero_shot_acc``, ``dataset``, ``shift`` and
        ``differences[baseline][strategy][budget]``.
    baseline : str
        e.g. ``"random"`` or ``"map_entropy"``.
    budgets : sequence of str
        one panel per budget.
    strategies : sequence of str
        one series per strategy.

    Returns
    -------
    matplotlib.figure.Figure
        one panel per budget, at most three in a row; the legend in a spare panel if any.
    """
    ncols = min(3, len(budgets))
    nrows = math.ceil(len(budgets) / ncols)
    fig = Figure(figsize=(4.5 * ncols, 3.6 * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False, sharey=True).flatten()
    for ax in axes[len(budgets) :]:
        ax.set_visible(False)
    markers = {"digits": "o", "fashion-mnist": "s"}
    for ax, budget in zip(axes, budgets):
        named: set[str] = set()
        for j, strategy in enumerate(strategies):
            pts = sorted((c["zero_shot_acc"], c["differences"][baseline][strategy][budget],
                          c["dataset"]) for c in cells
                         if strategy in c["differences"].get(baseline, {}))  # fmt: skip
            for dataset in markers:
                sel = [(x, d) for x, d, ds in pts if ds == dataset]
                if sel:  # one legend entry per strategy, whichever data set comes first
                    label = None if strategy in named else strategy
                    named.add(strategy)
                    ax.errorbar([x + 0.003 * j for x, _ in sel], [d["mean"] for _, d in sel],
                                yerr=[d["se"] for _, d in sel], fmt=markers[dataset], ms=4,
                                color=f"C{j}", capsize=2, label=label)  # fmt: skip
        ax.axhline(0.0, color="k", lw=0.8)
        ax.axvspan(0.5, 0.8, color="0.9", zorder=0)
        ax.set(xlabel="zero-shot accuracy on the target", title=f"{budget} labels")
        ax.grid(alpha=0.3)
    for ax in axes[::ncols]:
        ax.set_ylabel(f"accuracy - {baseline} (paired ± SE)")
    handles, labels = axes[0].get_legend_handles_labels()
    spare = axes[len(budgets)] if len(budgets) < len(axes) else None
    if spare is not None:  # the legend in the empty panel, clear of the data
        spare.set_visible(True)
        spare.axis("off")
    (spare or axes[0]).legend(handles, labels, loc="center" if spare else "best", fontsize=7,
                              title="o digits, s fashion-mnist", title_fontsize=7)  # fmt: skip
    fig.tight_layout()
    return fig


def save_figure(fig, path: str | Path, dpi: int = 120) -> Path:
    """Write ``fig`` as PNG to ``path`` (creating the folder); returns the path.

    Parameters
    ----------
    fig : matplotlib.figure.Figure
        the figure.
    path : str or Path
        the PNG file.
    dpi : int
        resolution.

    Returns
    -------
    Path
        ``path``, written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


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
