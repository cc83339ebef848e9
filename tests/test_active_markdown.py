"""Active-learning markdown tables: every cell parsed back equals the summary it came from."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from test_markdown import parse_table

from laplace_vlm.active import markdown as amd
from laplace_vlm.active.config import ActiveLearningConfig
from laplace_vlm.active.report import paired_differences, summarize
from laplace_vlm.cli.main import main as cli_main
from laplace_vlm.evaluation.markdown import write_new
from laplace_vlm.experiments.active import DemoSetting, prepare

STRATEGIES = ("random", "map_entropy", "epig")


def results(rng: np.random.Generator, seeds: int = 4) -> dict:
    """run_experiment's layout: strategy -> budget -> metrics of every seed."""
    out = {}
    for s in STRATEGIES:
        out[s] = {0: [{"acc": 0.5, "ece": 0.2} for _ in range(seeds)]}
        for b in (10, 20):
            out[s][b] = [{"acc": float(rng.uniform(0.5, 0.8)), "ece": 0.1,
                          "label_entropy": float(rng.uniform(1, 2.3))} for _ in range(seeds)]  # fmt: skip
    return out


def numbers(cell: str) -> list[float]:
    """The numbers of a cell such as ``+0.012 ± 0.004 [3/4]`` or ``0.612 ± 0.020``."""
    return [float(x) for x in cell.replace("[", " ").replace("]", " ").replace("/", " ")
            .replace("±", " ").split()]  # fmt: skip


def test_accuracy_differences_and_entropy_tables_equal_the_summary():
    summary = summarize(results(np.random.default_rng(0)))
    header, body = parse_table(amd.accuracy_table(summary))
    assert header[1:] == ["0", "10", "20"] and list(body) == list(STRATEGIES)
    for s in STRATEGIES:
        for b, cell in zip(header[1:], body[s]):
            row = summary[s][b]
            np.testing.assert_allclose(numbers(cell), [row["acc_mean"], row["acc_std"]], atol=5e-4)
    diffs = paired_differences(summary, "random")
    header, body = parse_table(amd.differences_table(diffs, "random"))
    assert header[1:] == ["10", "20"] and list(body) == ["map_entropy", "epig"]
    for s, cells in body.items():
        for b, cell in zip(header[1:], cells):
            d = diffs[s][b]
            np.testing.assert_allclose(numbers(cell), [d["mean"], d["se"], d["wins"], d["n"]],
                                       atol=5e-4)  # fmt: skip
    header, body = parse_table(amd.label_entropy_table(summary))
    assert header[1:] == ["10", "20"]
    for s, cells in body.items():
        np.testing.assert_allclose([float(c) for c in cells],
                                   [summary[s][b]["label_entropy_mean"] for b in ("10", "20")],
                                   atol=5e-3)  # fmt: skip
    text = amd.cell_markdown(summary, "digits, target = rotation 0.2", ("random", "map_entropy"))
    rules = [line for line in text.splitlines() if line.startswith("| ---")]
    assert text.startswith("digits, target = rotation 0.2\n\n") and len(rules) == 4


def test_sweep_tables_list_every_cell_that_ran():
    rng = np.random.default_rng(1)
    cells = []
    for severity, lift in ((0.1, 0.05), (0.2, -0.05)):
        res = results(rng)
        for b in (10, 20):  # epig ahead of both by `lift` at every budget and seed
            for i, m in enumerate(res["epig"][b]):
                m["acc"] = max(res["random"][b][i]["acc"], res["map_entropy"][b][i]["acc"]) + lift
        summary = summarize(res)
        cells.append({"dataset": "digits", "shift": "rotation", "severity": severity,
                      "zero_shot_acc": 0.6, "differences": {
                          b: paired_differences(summary, b) for b in ("random", "map_entropy")}})  # fmt: skip
    cells.append({"dataset": "digits", "shift": "rotation", "severity": 0.4, "zero_shot_acc": 0.2,
                  "skipped": True})  # fmt: skip
    cells[0]["mc_agreement"] = {"n_samples": 200, "candidates": 50,
                                "bald": {"spearman": 0.91, "top_k_overlap": 7, "k": 10},
                                "epig": {"spearman": 0.5, "top_k_overlap": 3, "k": 10}}  # fmt: skip
    text = amd.sweep_markdown(cells, "epig", ("random", "map_entropy"), ("epig",))
    tables = text.strip().split("\n\n")
    assert len(tables) == 4  # one cell without an MC check: no agreement table
    header, body = parse_table(tables[0])
    assert list(body) == ["digits rotation 0.1", "digits rotation 0.2"]
    for name, cell in zip(body, cells):
        d = cell["differences"]["random"]["epig"]
        np.testing.assert_allclose([numbers(c) for c in body[name][1:]],
                                   [[d[b]["mean"], d[b]["se"]] for b in ("10", "20")], atol=5e-4)  # fmt: skip
    _, verdict = parse_table(tables[2])
    assert verdict["digits rotation 0.1"][1].startswith("epig")
    assert verdict["digits rotation 0.2"][1] == "none"
    # the claims, counted here by hand from the differences
    _, claims = parse_table(tables[3])
    for baseline, column in (("random", 0), ("map_entropy", 1)):
        rows = [c["differences"][baseline]["epig"] for c in cells[:2]]
        wins = sum(d["mean"] > 2 * d["se"] for r in rows for d in r.values())
        losses = sum(d["mean"] < -2 * d["se"] for r in rows for d in r.values())
        at_20 = [r["20"]["mean"] / r["20"]["se"] for r in rows]
        assert claims["epig"][column] == (f"{wins} / {losses} of 4 ({sum(z > 2 for z in at_20)}"
                                          f" / {sum(z < -2 for z in at_20)} of 2)")  # fmt: skip
    assert claims["map_entropy"][1] == ""  # not judged against itself
    cells[1]["mc_agreement"] = cells[0]["mc_agreement"]
    tables = amd.sweep_markdown(cells, "epig", ("random", "map_entropy"), ("epig",)).split("\n\n")
    _, agreement = parse_table(tables[4])
    assert agreement["digits rotation 0.1"] == ["200", "50", "0.910, 7/10", "0.500, 3/10"]


def test_cli_refuses_an_existing_markdown_file(tmp_path, capsys):
    path = tmp_path / "tables.md"
    path.write_text("kept")
    assert cli_main(["active", "--markdown", str(path)]) == 2
    assert "--markdown:" in capsys.readouterr().err and path.read_text() == "kept"


def test_write_new_never_replaces_a_file(tmp_path):
    path = write_new(tmp_path / "a" / "b.md", "x")
    assert path.read_text() == "x"
    with pytest.raises(FileExistsError):
        write_new(path, "y")
    assert path.read_text() == "x"


def test_readme_active_tables_start_where_the_code_starts_now():
    """The README's generated default-cell table: its budget-0 column and zero-shot accuracy.

    Budget 0 is the zero-shot posterior of every strategy, so this slice of the table is
    recomputed here from the shipped stand-in (probit of the ProbCosine moments, written out),
    and a stale README number fails.
    """
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start = text.index("<!-- generated: laplace-vlm active --markdown PATH -->")
    block = text[start : text.index("<!-- end generated", start)]
    shown_zero_shot = float(re.search(r"zero-shot accuracy ([0-9.]+)\)", block).group(1))
    header, body = parse_table(block[block.index("| strategy") :])
    column = header.index("0") - 1
    config = ActiveLearningConfig()
    prepared = prepare(DemoSetting(), config)
    problem = prepared.problem(0)
    x = {"image": problem.test, "text": problem.class_text}
    with torch.no_grad():
        mean, var = prepared.la.predictive_moments(x, pred_type=config.pred_type)
        probs = torch.softmax(mean / torch.sqrt(1 + math.pi / 8 * var), -1)
    acc = float((probs.argmax(-1) == problem.test_labels).double().mean())
    assert shown_zero_shot == pytest.approx(prepared.zero_shot_acc, abs=5e-4 + 1e-9)
    assert len(body) == len(config.strategies)
    for strategy, cells in body.items():
        assert numbers(cells[column])[0] == pytest.approx(acc, abs=5e-4 + 1e-9), strategy
