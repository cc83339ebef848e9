"""Active learning on K independently trained stand-ins (``laplace-vlm active --train-seeds K``).

One shipped stand-in is one draw of its training: a strategy that wins by .01 on it may win
by the method or by the draw. Here the cell runs on K stand-ins that differ only in their
training seed (``DemoSetting.train_seed`` ``0 .. K-1``; 0 is the shipped one); the splits,
the shifts, the pools and the active-learning seeds are the same for all of them.

The unit of the statistics is the stand-in: each stand-in's accuracy of a strategy at a budget
is its mean over the paired active-learning seeds, and a paired difference to a baseline is
averaged over the K stand-ins with the standard error ``std(d, ddof=1) / sqrt(K)``. A
difference is a win or a loss only where it exceeds two of those standard errors
(:func:`claims`), as the benchmark's :func:`laplace_vlm.experiments.seeds.win_counts` counts.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from laplace_vlm.active.config import DEFAULT_STRATEGY, ActiveLearningConfig
from laplace_vlm.active.figures import learning_curves_figure, save_figure
from laplace_vlm.active.markdown import cell_markdown
from laplace_vlm.active.report import (
    METRICS,
    Summary,
    format_differences,
    format_table,
    paired_differences,
    paired_verdict,
)
from laplace_vlm.evaluation.markdown import write_new
from laplace_vlm.experiments.active import BASELINES, DemoSetting, describe, run_setting
from laplace_vlm.experiments.processes import run_in_processes
from laplace_vlm.experiments.seeds import mean_se


def run_standin(setting: DemoSetting, config: ActiveLearningConfig) -> dict:
    """The cell on one stand-in (``setting.train_seed``).

    Parameters
    ----------
    setting : DemoSetting
        the cell and the stand-in's training seed.
    config : ActiveLearningConfig
        the experiment.

    Returns
    -------
    dict
        ``train_seed``, ``zero_shot_acc``, ``description``, ``summary`` (over the
        active-learning seeds) and ``seconds``.
    """
    start = time.perf_counter()
    summary, prepared = run_setting(setting, config)
    return {"train_seed": setting.train_seed, "zero_shot_acc": prepared.zero_shot_acc,
            "description": describe(setting, config, prepared.zero_shot_acc),
            "summary": summary, "seconds": time.perf_counter() - start}  # fmt: skip


def standin_summary(summaries: Sequence[Summary]) -> dict:
    """One :data:`~laplace_vlm.active.report.Summary` whose seeds are the stand-ins.

    Parameters
    ----------
    summaries : sequence of Summary
        one per stand-in, with the same strategies and budgets.

    Returns
    -------
    dict
        ``acc_per_seed`` holds each stand-in's mean accuracy (so
        :func:`~laplace_vlm.active.report.paired_differences` pairs stand-ins),
        ``acc_mean`` / ``acc_std`` their mean and std, the other means averaged, and
        ``n_seeds`` the number of stand-ins.
    """
    if not summaries:
        raise ValueError("summaries must hold at least one stand-in's summary.")
    layout = {s: sorted(rows, key=int) for s, rows in summaries[0].items()}
    for i, other in enumerate(summaries[1:], 1):
        if {s: sorted(rows, key=int) for s, rows in other.items()} != layout:
            raise ValueError(f"summaries[{i}] has other strategies or budgets than summaries[0].")
    out: dict = {}
    for strategy, budgets in layout.items():
        out[strategy] = {}
        for budget in budgets:
            rows = [s[strategy][budget] for s in summaries]
            acc = [r["acc_mean"] for r in rows]
            k = len(acc)
            row = {"acc_mean": float(np.mean(acc)),
                   "acc_std": float(np.std(acc, ddof=1)) if k > 1 else 0.0}  # fmt: skip
            for key in (f"{m}_mean" for m in METRICS):
                if all(key in r for r in rows):
                    row[key] = sum(r[key] for r in rows) / len(rows)
            if all("labels_used_max" in r for r in rows):
                row["labels_used_max"] = max(r["labels_used_max"] for r in rows)
            row["n_seeds"], row["acc_per_seed"] = k, acc
            out[strategy][budget] = row
    return out


def claims(differences: Mapping[str, Mapping[str, Mapping[str, float]]]) -> dict:
    """Per strategy and budget: ``win``, ``loss`` or ``tie`` by two standard errors.

    Parameters
    ----------
    differences : mapping
        :func:`~laplace_vlm.active.report.paired_differences` of a stand-in summary.

    Returns
    -------
    dict
        ``{strategy: {budget: "win" | "loss" | "tie"}}``: ``win`` where the mean difference
        exceeds two standard errors, ``loss`` where it is below minus two, ``tie`` for a single
        stand-in (:func:`~laplace_vlm.active.report.paired_verdict`).
    """
    return {s: {b: paired_verdict(d) for b, d in rows.items()} for s, rows in differences.items()}


def format_claims(by_baseline: Mapping[str, Mapping[str, Mapping[str, str]]]) -> str:
    """``strategy vs baseline: win/tie/loss per budget`` lines, the default strategy first.

    Parameters
    ----------
    by_baseline : mapping
        ``{baseline: claims(differences to it)}``.

    Returns
    -------
    str
        one line per baseline and strategy.
    """
    lines = []
    for baseline, table in by_baseline.items():
        order = sorted(table, key=lambda s: (s != DEFAULT_STRATEGY, s))
        for strategy in order:
            cells = ", ".join(f"{b}: {v}" for b, v in sorted(table[strategy].items(),
                                                             key=lambda kv: int(kv[0])))  # fmt: skip
            lines.append(f"{strategy} vs {baseline} (> 2 SE over stand-ins): {cells}")
    return "\n".join(lines)


def report_text(runs: Sequence[dict]) -> tuple[str, dict]:
    """The per-stand-in zero-shot line, the table over stand-ins, differences and claims.

    Parameters
    ----------
    runs : sequence of dict
        :func:`run_standin`'s results.

    Returns
    -------
    text : str
        the report.
    over : dict
        ``{"summary", "differences", "claims"}`` over the stand-ins (the JSON's).
    """
    summary = standin_summary([r["summary"] for r in runs])
    differences = {b: paired_differences(summary, b) for b in BASELINES if b in summary}
    verdicts = {b: claims(d) for b, d in differences.items()}
    zs_mean, zs_se, _ = mean_se([r["zero_shot_acc"] for r in runs])
    zs_se = "-" if zs_se is None else f"{zs_se:.3f}"  # one stand-in has no standard error
    parts = [runs[0]["description"].split(";")[0] + f"; {len(runs)} stand-ins (training seeds "
             f"{', '.join(str(r['train_seed']) for r in runs)}), zero-shot accuracy "
             f"{zs_mean:.3f} ± {zs_se} (SE), per stand-in "
             + ", ".join(f"{r['zero_shot_acc']:.3f}" for r in runs),
             "accuracy over stand-ins (each a stand-in's mean over its paired seeds; ± std "
             "over stand-ins):\n" + format_table(summary)]  # fmt: skip
    parts += [format_differences(d, b) + f"\n(mean ± SE over {len(runs)} stand-ins, [stand-ins "
              "ahead / stand-ins])" for b, d in differences.items()]  # fmt: skip
    parts.append(format_claims(verdicts))
    return "\n\n".join(parts), {"summary": summary, "differences": differences,
                                "claims": verdicts}  # fmt: skip


def main(setting: DemoSetting, config: ActiveLearningConfig, train_seeds: int, workers: int = 1,
         json_path: Path | None = None, out: Path | None = None,
         markdown: Path | None = None) -> int:  # fmt: skip
    """Run the cell on ``train_seeds`` stand-ins and print the report over them.

    Parameters
    ----------
    setting : DemoSetting
        the cell; its ``train_seed`` is the first stand-in's.
    config : ActiveLearningConfig
        the experiment.
    train_seeds : int
        stand-ins, ``>= 1`` (``setting.train_seed ..``, each trained into the cache on first
        use).
    workers : int
        processes running stand-ins at once (one torch thread each).
    json_path : Path, optional
        ``{"config", "setting", "runs": [...], "over_standins": {...}}``, written after every
        stand-in.
    out : Path, optional
        folder for ``curves_over_standins.png``.
    markdown : Path, optional
        a new file for the tables over the stand-ins.

    Returns
    -------
    int
        0.
    """
    if isinstance(train_seeds, bool) or not isinstance(train_seeds, int) or train_seeds < 1:
        raise ValueError(f"train_seeds must be a positive int, got {train_seeds!r}.")
    start = time.perf_counter()
    calls = [(dataclasses.replace(setting, train_seed=setting.train_seed + i), config)
             for i in range(train_seeds)]  # fmt: skip

    def write(done: dict[int, dict]) -> None:
        print(f"[stand-ins: {len(done)} of {train_seeds} after "
              f"{time.perf_counter() - start:.0f} s]", flush=True)  # fmt: skip
        if json_path is None:
            return
        runs = list(done.values())
        payload = {"config": dataclasses.asdict(config), "setting": dataclasses.asdict(setting),
                   "runs": runs, "over_standins": report_text(runs)[1]}  # fmt: skip
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(payload, indent=1))

    runs = run_in_processes(run_standin, calls, workers, write)
    text, over = report_text(runs)
    print(text)
    print(f"[{time.perf_counter() - start:.0f} s]")
    if markdown is not None:
        first_line = text.split("\n", 1)[0]
        write_new(markdown, cell_markdown(over["summary"], first_line, BASELINES, "stand-ins"))
    if out is not None:
        title = f"{setting.dataset}, target = {setting.shift} {setting.severity:g}, " \
                f"{train_seeds} stand-ins"  # fmt: skip
        save_figure(learning_curves_figure(over["summary"], title=title),
                    out / "curves_over_standins.png")  # fmt: skip
    return 0
