"""The active-learning sweep (``laplace-vlm active --sweep``): where does each strategy win?

Cells: every data set, clean (severity 0) and every shift at increasing severities; a cell
whose zero-shot accuracy on the target is below ``min_zero_shot`` is prepared but not run.
Cells, not shifts, are the units of work of the worker processes, so the load of the sweep
is balanced to within one cell. Every cell runs every strategy on the same paired seeds; the
report gives, for every strategy and budget, the paired accuracy difference to targeted
random and to MAP entropy with its standard error, and plots them against the cell's
zero-shot accuracy.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from laplace_vlm.active.config import (
    DEFAULT_STRATEGY,
    ActiveLearningConfig,
    comma_list,
    option,
    positive_int,
)
from laplace_vlm.active.experiment import run_experiment
from laplace_vlm.active.figures import (
    differences_vs_zero_shot_figure,
    learning_curves_figure,
    save_figure,
)
from laplace_vlm.active.markdown import sweep_markdown
from laplace_vlm.active.report import (
    beats_baselines,
    format_agreement,
    format_balance,
    format_differences,
    paired_differences,
    summarize,
)
from laplace_vlm.active.selection import mc_agreement
from laplace_vlm.docstrings import fill_doc
from laplace_vlm.evaluation.markdown import write_new
from laplace_vlm.experiments import recipe
from laplace_vlm.experiments.active import (
    BASELINES,
    DemoSetting,
    describe,
    prepare,
)
from laplace_vlm.experiments.processes import run_in_processes

# the runs are single-threaded, 1.3 GB each (measured): a few processes fill a laptop's cores
DEFAULT_WORKERS = min(4, os.cpu_count() or 1)
Cell = tuple[str, str, float]
"""``(dataset, shift, severity)``; severity 0 is the clean target."""

# what every cell of a sweep shares
_fill_doc = fill_doc.extend(
    cell_config="""
        config : ActiveLearningConfig
            the experiment of every cell.
        """,
    base_setting="""
        base : DemoSetting
            sizes and folders (data set, shift and severity are each cell's).
        """,
)


def severity_grid(text: str) -> dict[str, tuple[float, ...]]:
    """``"rotation:0.1,0.2;noise:0.4"`` -> ``{"rotation": (0.1, 0.2), "noise": (0.4,)}``.

    Parameters
    ----------
    text : str
        ``shift:severities`` parts separated by ``;``; a ``ValueError`` names ``grid``.

    Returns
    -------
    dict of str to tuple of float
        shift -> its severities, sorted, in the order the shifts are given.
    """
    grid = {}
    for chunk in (c for c in text.split(";") if c.strip()):
        shift, _, values = chunk.partition(":")
        shift = shift.strip()
        if shift not in recipe.SHIFTS or not values.strip():
            raise ValueError(f"grid: expected shift:severities with a shift of "
                             f"{tuple(recipe.SHIFTS)}, got {chunk!r}")  # fmt: skip
        grid[shift] = tuple(sorted(float(v) for v in comma_list(values)))
    return grid


@dataclass
class SweepSetting:
    """The cells of the sweep.

    Attributes
    ----------
    datasets : tuple of str
        from :data:`laplace_vlm.experiments.recipe.DATASETS`.
    grid : str
        ``"shift:s1,s2;shift:..."`` severities (> 0) per shift, in increasing order.
    clean : bool
        also run severity 0 (once per data set).
    min_zero_shot : float
        a cell with zero-shot accuracy below this is not run (recorded as skipped).
    workers : int
        processes, one torch thread each (default: the CPU count, at most 4): cells at once;
        on the command line also the stand-ins of ``--train-seeds``, or the groups of paired
        seeds of one cell. Results do not depend on it.
    """

    datasets: tuple[str, ...] = field(default=recipe.DATASETS, metadata=option(
        "data sets of the sweep", type=comma_list))  # fmt: skip
    grid: str = field(default="rotation:0.1,0.2,0.3,0.4;noise:0.4,1.0", metadata=option(
        "severities per shift, 'shift:s1,s2;shift:...'"))  # fmt: skip
    clean: bool = field(default=True, metadata=option("also run the unshifted target"))
    min_zero_shot: float = field(
        default=0.3,
        metadata=option("skip every cell with zero-shot accuracy below this"),
    )
    workers: int = field(default=DEFAULT_WORKERS, metadata=option(
        "processes, one torch thread each: cells (--sweep), stand-ins "
        "(--train-seeds) or groups of paired seeds (one cell); results do not depend on it",
        type=positive_int))  # fmt: skip

    def __post_init__(self) -> None:
        unknown = [d for d in self.datasets if d not in recipe.DATASETS]
        if unknown or not self.datasets:
            raise ValueError(f"datasets must be among {recipe.DATASETS}, got {self.datasets}.")
        severity_grid(self.grid)
        if not 0.0 <= self.min_zero_shot < 1.0:
            raise ValueError(f"min_zero_shot must lie in [0, 1), got {self.min_zero_shot}.")

    def cells(self) -> list[Cell]:
        """The cells, clean ones first.

        Returns
        -------
        list of Cell
            ``(dataset, shift, severity)``: with :attr:`clean`, one severity-0 cell per data
            set first (named by the first shift of :attr:`grid`), then every data set x shift x
            severity of :attr:`grid`, severities increasing.
        """
        grid = severity_grid(self.grid)
        clean = [(d, next(iter(grid)), 0.0) for d in self.datasets if self.clean and grid]
        shifted = [(d, shift, severity) for d in self.datasets
                   for shift, severities in grid.items() for severity in severities]  # fmt: skip
        return clean + shifted


@_fill_doc
def run_cell(cell: Cell, base: DemoSetting, config: ActiveLearningConfig,
             min_zero_shot: float) -> dict:  # fmt: skip
    """One cell: every strategy on every paired seed, unless its zero-shot accuracy is too low.

    Parameters
    ----------
    cell : tuple
        ``(dataset, shift, severity)``.
    %(base_setting)s
    %(cell_config)s
    min_zero_shot : float
        below this zero-shot accuracy the cell is recorded as skipped, not run.

    Returns
    -------
    dict
        ``dataset``, ``shift`` (``"none"`` at severity 0), ``severity``, ``zero_shot_acc``,
        then ``summary``, ``differences``, ``mc_agreement``, ``description`` and ``seconds``;
        or ``skipped: True`` (with the shift as given).
    """
    dataset, shift, severity = cell
    start = time.perf_counter()
    setting = dataclasses.replace(base, dataset=dataset, shift=shift, severity=severity)
    prepared = prepare(setting, config)
    zero_shot = prepared.zero_shot_acc
    if zero_shot < min_zero_shot:
        return {"dataset": dataset, "shift": shift, "severity": severity,
                "zero_shot_acc": zero_shot, "skipped": True}  # fmt: skip
    summary = summarize(run_experiment(prepared.la, prepared.problem, config))
    return {
        "dataset": dataset, "shift": "none" if severity == 0 else shift,
        "severity": severity, "zero_shot_acc": zero_shot, "summary": summary,
        "differences": {b: paired_differences(summary, b) for b in BASELINES if b in summary},
        "mc_agreement": mc_agreement(prepared.la, prepared.problem(0), config),
        "description": describe(setting, config, zero_shot),
        "seconds": time.perf_counter() - start,
    }  # fmt: skip


@_fill_doc
def run_sweep(sweep: SweepSetting, config: ActiveLearningConfig, base: DemoSetting,
              on_cell=None) -> list[dict]:  # fmt: skip
    """Every cell of ``sweep``, in ``sweep.workers`` processes; ``on_cell(cells)`` after each.

    Parameters
    ----------
    sweep : SweepSetting
        the cells and workers.
    %(cell_config)s
    %(base_setting)s
    on_cell : callable, optional
        called with all cells finished so far (in :meth:`SweepSetting.cells` order), after
        every cell.

    Returns
    -------
    list of dict
        the cells in :meth:`SweepSetting.cells` order (skipped cells flagged
        ``"skipped": True``).
    """

    def finished(done: dict[int, dict]) -> None:
        if on_cell:
            on_cell(list(done.values()))

    calls = [(cell, base, config, sweep.min_zero_shot) for cell in sweep.cells()]
    return run_in_processes(run_cell, calls, sweep.workers, finished)


def posterior_strategies(config: ActiveLearningConfig) -> list[str]:
    """The strategies whose scores come from the posterior (BALD, EPIG, entropies of it).

    Parameters
    ----------
    config : ActiveLearningConfig
        its strategies.

    Returns
    -------
    list of str
        the names of the targeted strategies not scored by ``random`` or ``map_entropy``.
    """
    return [s.name for s in config.parsed_strategies
            if s.targeted and s.score not in ("random", "map_entropy")]  # fmt: skip


def verdicts(cells: list[dict], config: ActiveLearningConfig) -> list[str]:
    """Per cell, the default strategy's verdict and the posterior strategies that beat both.

    "Beat" is a positive mean paired difference to both baselines at every budget; "clear" adds
    more than two paired SEs above both at the largest budget
    (:func:`laplace_vlm.active.report.beats_baselines`).

    Parameters
    ----------
    cells : list of dict
        sweep cells with ``differences``.
    config : ActiveLearningConfig
        which strategies are posterior-based.

    Returns
    -------
    list of str
        ``"<dataset> <shift> <severity> (zero-shot <acc>): default <verdict>; beat both:
        <strategies>"`` per cell run with both baselines.
    """
    lines = []
    for cell in (c for c in cells if not c.get("skipped")):
        diffs = cell["differences"]
        if not all(b in diffs for b in BASELINES):
            continue
        judged = {s: beats_baselines(diffs, s, BASELINES) for s in posterior_strategies(config)}
        wins = [s + (" (clear)" if v["clear_at_largest"] else "")
                for s, v in judged.items() if v["every_budget"]]  # fmt: skip
        name = f"{cell['dataset']} {cell['shift']} {cell['severity']:g}"
        default = judged.get(DEFAULT_STRATEGY)
        head = ("" if default is None else f"{DEFAULT_STRATEGY} every budget "
                f"{default['every_budget']}, clear at largest {default['clear_at_largest']}; ")  # fmt: skip
        lines.append(f"{name} (zero-shot {cell['zero_shot_acc']:.3f}): {head}beat both: "
                     + (", ".join(wins) if wins else "none"))  # fmt: skip
    return lines


def write_outputs(cells: list[dict], config, json_path: Path, out: Path | None) -> None:
    """The sweep JSON and, with ``out``, the difference plots and every cell's curves.

    Parameters
    ----------
    cells : list of dict
        the cells so far.
    config : ActiveLearningConfig
        written with them; its budgets and strategies label the plots.
    json_path : Path
        the JSON file.
    out : Path, optional
        the plot folder.
    """
    json_path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"config": dataclasses.asdict(config), "cells": cells}
    json_path.write_text(json.dumps(payload, indent=1))
    if out is None:
        return
    ran = [c for c in cells if not c.get("skipped")]
    budgets = [str(b) for b in config.budgets]
    for baseline in BASELINES:
        if ran and all(baseline in c["differences"] for c in ran):
            strategies = [s for s in config.strategies if s != baseline]
            fig = differences_vs_zero_shot_figure(ran, baseline, budgets, strategies)
            save_figure(fig, out / f"differences_vs_{baseline}.png")
    for c in ran:
        title = (
            f"{c['dataset']}, {c['shift']} {c['severity']:g} (zero-shot {c['zero_shot_acc']:.2f})"
        )
        name = f"curves_{c['dataset']}_{c['shift']}_{c['severity']:g}.png"
        save_figure(learning_curves_figure(c["summary"], title=title), out / name)


@_fill_doc
def main(sweep: SweepSetting, config: ActiveLearningConfig, base: DemoSetting, json_path: Path,
         out: Path | None = None, progress_bar: bool = True,
         markdown: Path | None = None) -> int:  # fmt: skip
    """Run the sweep, writing the JSON (and plots) after every cell; print the differences.

    Parameters
    ----------
    sweep : SweepSetting
        the cells.
    %(cell_config)s
    %(base_setting)s
    json_path : Path
        ``{"config": ..., "cells": [...]}``.
    out : Path, optional
        folder of the plots.
    progress_bar : bool
        print progress after every cell.
    markdown : Path, optional
        a new file for the tables (:func:`laplace_vlm.active.markdown.sweep_markdown`).

    Returns
    -------
    %(exit_status)s
    """
    start = time.perf_counter()

    def on_cell(cells: list[dict]) -> None:
        write_outputs(cells, config, json_path, out)
        if progress_bar:
            print(f"[sweep: {len(cells)} cells after {time.perf_counter() - start:.0f} s]",
                  flush=True)  # fmt: skip

    cells = run_sweep(sweep, config, base, on_cell)
    for cell in (c for c in cells if not c.get("skipped")):
        print(f"\n{cell['description']} [{cell['seconds']:.0f} s]")
        print(format_agreement(cell["mc_agreement"]))
        print(format_balance(cell["summary"]))
        for baseline, diffs in cell["differences"].items():
            print(format_differences(diffs, baseline))
    print("\nposterior strategies beating targeted random and MAP entropy at every budget:")
    print("\n".join(verdicts(cells, config)))
    print(f"[sweep: {time.perf_counter() - start:.0f} s; {json_path}]")
    if markdown is not None:
        write_new(markdown, sweep_markdown(cells, DEFAULT_STRATEGY, BASELINES,
                                           posterior_strategies(config)))  # fmt: skip
    return 0
