"""Summaries, paired differences, figures and the sweep's cell logic (no experiment runs)."""

from __future__ import annotations

import math

import pytest
import torch
from matplotlib.figure import Figure

from laplace_vlm.active import figures, report
from laplace_vlm.active.config import ActiveLearningConfig


def _runs(accs, ece=0.1):
    return [{"acc": a, "ece": ece, "nlpd": 1.0, "map_acc": a, "labels_used": 20} for a in accs]


def test_paired_difference_against_the_direct_formula():
    a, b = [0.61, 0.70, 0.55, 0.68], [0.60, 0.64, 0.58, 0.61]
    d = [x - y for x, y in zip(a, b)]
    mean = sum(d) / 4
    se = math.sqrt(sum((v - mean) ** 2 for v in d) / 3) / 2
    got = report.paired_difference(a, b)
    assert got["mean"] == pytest.approx(mean, abs=1e-15) and got["se"] == pytest.approx(se)
    assert got["wins"] == 3 and got["n"] == 4
    assert report.paired_difference([0.3], [0.1])["se"] == 0.0
    with pytest.raises(ValueError, match="paired"):
        report.paired_difference([0.1, 0.2], [0.1])


def test_summary_and_differences_keep_the_seed_pairing():
    results = {"random": {0: _runs([0.5, 0.5]), 20: _runs([0.6, 0.7])},
               "bald": {0: _runs([0.5, 0.5]), 20: _runs([0.65, 0.68])}}  # fmt: skip
    summary = report.summarize(results)
    assert summary["bald"]["20"]["acc_per_seed"] == [0.65, 0.68]
    assert summary["bald"]["20"]["acc_std"] == pytest.approx(math.sqrt(0.00045))
    assert summary["random"]["20"]["labels_used_max"] == 20
    diffs = report.paired_differences(summary, "random")
    assert list(diffs) == ["bald"] and list(diffs["bald"]) == ["20"]  # budget 0 is no contest
    assert diffs["bald"]["20"]["mean"] == pytest.approx(0.015) and diffs["bald"]["20"]["wins"] == 1
    assert "+0.015" in report.format_differences(diffs, "random")
    table = report.format_table(summary)
    assert "labels used in total: n=0: 20, n=20: 20" in table
    with pytest.raises(ValueError, match="baseline"):
        report.paired_differences(summary, "epig")


def test_figures_are_figure_objects_and_save(tmp_path):
    results = {"random": {0: _runs([0.5]), 20: _runs([0.6])},
               "bald": {0: _runs([0.5]), 20: _runs([0.65])}}  # fmt: skip
    summary = report.summarize(results)
    fig = figures.learning_curves_figure(summary, title="t")
    assert isinstance(fig, Figure)
    png = figures.save_figure(fig, tmp_path / "a" / "curves.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    diffs = {"random": report.paired_differences(summary, "random")}
    cells = [{"zero_shot_acc": z, "dataset": ds, "differences": diffs}
             for z, ds in ((0.6, "digits"), (0.7, "fashion-mnist"))]  # fmt: skip
    fig = figures.differences_vs_zero_shot_figure(cells, "random", ["20"], ["bald"])
    assert len(fig.axes) == 1 and fig.axes[0].get_xlabel().startswith("zero-shot")


def test_sweep_cells_grid_and_verdicts():
    from laplace_vlm.experiments.active_sweep import SweepSetting, severity_grid, verdicts

    assert severity_grid("rotation:0.2,0.1;noise:1") == {"rotation": (0.1, 0.2), "noise": (1.0,)}
    for bad in ("spin:0.1", "rotation:"):
        with pytest.raises(ValueError, match="grid"):
            severity_grid(bad)
    sweep = SweepSetting(datasets=("digits",), grid="rotation:0.1;noise:0.5")
    assert sweep.cells() == [("digits", "rotation", 0.0), ("digits", "rotation", 0.1),
                             ("digits", "noise", 0.5)]  # fmt: skip
    two = SweepSetting(datasets=("digits", "fashion-mnist"), grid="noise:1,0.5", clean=False)
    assert two.cells() == [("digits", "noise", 0.5), ("digits", "noise", 1.0),
                           ("fashion-mnist", "noise", 0.5), ("fashion-mnist", "noise", 1.0)]  # fmt: skip
    d = lambda m, n=10: {"mean": m, "se": 0.01, "n": n}  # noqa: E731
    diff = lambda m: {"20": d(m), "40": d(0.02)}  # noqa: E731
    cell = {"dataset": "digits", "shift": "rotation", "severity": 0.2, "zero_shot_acc": 0.6,
            "differences": {"random": {"bald": diff(0.01), "epig": diff(-0.01)},
                            "map_entropy": {"bald": diff(0.03), "epig": diff(0.03)}}}  # fmt: skip
    config = ActiveLearningConfig(strategies=("random", "map_entropy", "bald", "epig"))
    # bald beats both at every budget, but at 40 labels by 2 SE only (not more): not clear
    assert verdicts([cell], config) == [
        "digits rotation 0.2 (zero-shot 0.600): epig every budget False, clear at largest "
        "False; beat both: bald"
    ]
    cell["differences"]["random"]["bald"]["40"] = d(0.05)
    cell["differences"]["map_entropy"]["bald"]["40"] = d(0.021)
    assert verdicts([cell], config)[0].endswith("beat both: bald (clear)")
    # one seed: its standard error of 0 makes no claim (report.paired_verdict)
    cell["differences"]["map_entropy"]["bald"]["40"] = d(0.021, n=1)
    assert verdicts([cell], config)[0].endswith("beat both: bald")


def test_paired_verdict_and_claim_counts_by_two_standard_errors():
    d = lambda m, se, n=10: {"mean": m, "se": se, "n": n}  # noqa: E731
    assert [report.paired_verdict(d(m, 0.01)) for m in (0.021, 0.02, -0.02, -0.021)] == [
        "win", "tie", "tie", "loss"]  # fmt: skip
    assert report.paired_verdict(d(0.5, 0.0, n=1)) == "tie"  # one pair: se 0, no claim
    rows = {"20": d(0.03, 0.01), "40": d(-0.03, 0.01)}
    cells = [{"zero_shot_acc": z, "differences": {"random": {"epig": rows}}} for z in (0.6, 0.4)]
    cells.append({"zero_shot_acc": 0.9, "skipped": True})
    assert report.claim_counts(cells, "epig", "random", 0.5) == {
        "wins": 1,
        "losses": 1,
        "n": 2,
        "wins_largest": 0,
        "losses_largest": 1,
        "n_largest": 1,
    }
    one_seed = {"20": d(0.03, 0.0, n=1)}
    cells = [{"zero_shot_acc": 0.6, "differences": {"random": {"epig": one_seed}}}]
    assert report.claim_counts(cells, "epig", "random", 0.5)["wins"] == 0


def test_label_balance_rank_agreement_and_class_histograms():
    from scipy.stats import spearmanr

    from laplace_vlm.active.loop import label_balance

    got = label_balance(torch.tensor([0, 0, 1, 2]), 4)
    share = [0.5, 0.25, 0.25]
    assert got["class_counts"] == [2, 1, 1, 0]
    assert got["label_entropy"] == pytest.approx(-sum(q * math.log(q) for q in share))
    runs = [dict(r, class_counts=c, label_entropy=e)
            for r, c, e in zip(_runs([0.5, 0.6]), ([2, 0], [1, 1]), (0.0, math.log(2)))]  # fmt: skip
    row = report.summarize({"bald": {20: runs}})["bald"]["20"]
    assert row["class_counts_mean"] == [1.5, 0.5]
    assert row["label_entropy_mean"] == pytest.approx(math.log(2) / 2)
    assert "0.347" in report.format_balance({"bald": {"0": {}, "20": row}})
    a = torch.tensor([0.9, 0.1, 0.5, 0.7, 0.3])
    b = torch.tensor([0.8, 0.2, 0.6, 0.4, 0.1])
    agree = report.rank_agreement(a, b, 2)
    assert agree["top_k_overlap"] == 1 and agree["k"] == 2  # {0, 3} against {0, 2}
    assert agree["spearman"] == pytest.approx(spearmanr(a.numpy(), b.numpy())[0])
    with pytest.raises(ValueError, match="a and b"):
        report.rank_agreement(a, b[:3], 2)
