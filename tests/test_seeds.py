"""Results over training seeds: mean and SE against numpy, paired wins against a loop."""

from __future__ import annotations

import math

import numpy as np
import pytest

from laplace_vlm.experiments import seeds
from laplace_vlm.experiments.benchmark import BenchmarkResult
from laplace_vlm.experiments.experiment import ExperimentConfig


def row(method, condition, value, metric="nlpd", severity=1.0):
    return {
        "dataset": "digits",
        "task": "calibration",
        "condition": condition,
        "severity": severity,
        "method": method,
        "score": None,
        "metric": metric,
        "value": value,
    }


def seed_rows(rng, k=4, conditions=("noise", "rotation", "blur")):
    """k seeds of map / bayesvlm rows with random values (bayesvlm shifted per condition)."""
    shift = {"noise": -0.5, "rotation": 0.0, "blur": 0.5}
    out = []
    for _ in range(k):
        rows = []
        for c in conditions:
            base = float(rng.normal())
            rows.append(row("map", c, base))
            rows.append(row("bayesvlm", c, base + shift[c] + 0.05 * float(rng.normal())))
        out.append(rows)
    return out


def test_mean_se_equals_numpy():
    x = np.random.default_rng(0).normal(size=7)
    mean, se, n = seeds.mean_se([*x.tolist(), None])
    assert n == 7 and mean == pytest.approx(np.mean(x))
    assert se == pytest.approx(np.std(x, ddof=1) / math.sqrt(7))
    assert seeds.mean_se([1.0]) == (1.0, None, 1)
    assert seeds.mean_se([None]) == (None, None, 0)


def test_summarise_equals_a_loop():
    per_seed = seed_rows(np.random.default_rng(1))
    summary = seeds.summarise(per_seed)
    assert len(summary) == len(per_seed[0])
    for i, s in enumerate(summary):
        values = np.array([rows[i]["value"] for rows in per_seed])
        assert (s["method"], s["condition"]) == (
            per_seed[0][i]["method"],
            per_seed[0][i]["condition"],
        )
        assert s["value"] == pytest.approx(values.mean())
        assert s["se"] == pytest.approx(values.std(ddof=1) / 2)
        assert s["k"] == 4


def test_paired_wins_equal_a_loop():
    per_seed = seed_rows(np.random.default_rng(2))
    comparison = ("bayesvlm", "map", "calibration", None, "nlpd", False)
    counts = seeds.win_counts(per_seed, comparison)
    expected = {"wins": 0, "losses": 0, "ties": 0, "conditions": 3}
    for c in ("noise", "rotation", "blur"):
        d = np.array(
            [
                next(r["value"] for r in rows if r["method"] == "bayesvlm" and r["condition"] == c)
                - next(r["value"] for r in rows if r["method"] == "map" and r["condition"] == c)
                for rows in per_seed
            ]
        )
        se = d.std(ddof=1) / math.sqrt(len(d))
        key = "ties" if abs(d.mean()) <= 2 * se else ("wins" if d.mean() < 0 else "losses")
        expected[key] += 1
    assert counts == expected
    # the shifts were built so: noise a win, rotation a tie, blur a loss
    assert counts == {"wins": 1, "ties": 1, "losses": 1, "conditions": 3}
    higher = seeds.win_counts(per_seed, (*comparison[:5], True))
    assert (higher["wins"], higher["losses"]) == (1, 1)


def test_unpaired_spread_does_not_hide_a_paired_win():
    """Model draws move both methods together: the paired SE sees a win the spread hides."""
    per_seed = [[row("map", "noise", v), row("bayesvlm", "noise", v - 0.01)] for v in (0, 1, 2)]
    counts = seeds.win_counts(per_seed, ("bayesvlm", "map", "calibration", None, "nlpd", False))
    assert counts["wins"] == 1


def test_bad_input_is_named():
    per_seed = seed_rows(np.random.default_rng(3))
    with pytest.raises(ValueError, match="rows_per_seed"):
        seeds.win_counts(per_seed[:1], ("bayesvlm", "map", "calibration", None, "nlpd", False))
    with pytest.raises(ValueError, match="rows_per_seed"):
        seeds.summarise([per_seed[0], per_seed[1][:-1]])
    with pytest.raises(ValueError, match="baseline"):
        seeds.paired_differences(per_seed, "bayesvlm", "temperature", "calibration", "nlpd")
    config = ExperimentConfig("digits")
    with pytest.raises(ValueError, match="k"):
        seeds.seed_configs(config, 0)
    with pytest.raises(TypeError, match="k"):
        seeds.seed_configs(config, 2.0)


def test_only_the_training_seed_varies():
    config = ExperimentConfig("digits", seed=3, train_config={"epochs": 1})
    seen = []

    def fake_run(c, **kwargs):
        seen.append((c.seed, c.train_config, kwargs))
        return BenchmarkResult({}, [], None)

    results = seeds.run_over_seeds(config, 3, fake_run, alpha=0.2)
    assert [s[0] for s in seen] == [3, 3, 3]  # split, shifts, MC draws: the config's seed
    assert [s[1] for s in seen] == [{"epochs": 1, "seed": s} for s in (3, 4, 5)]
    assert all(s[2] == {"alpha": 0.2} for s in seen)
    assert [r.settings["train_seed"] for r in results] == [3, 4, 5]
    assert config.train_config == {"epochs": 1}  # the caller's config is left alone


def full_rows(rng, methods=("map", "temperature", "bayesvlm")):
    """One seed's rows of every table markdown_report writes, random values."""
    spec = [
        ("calibration", None, "clean", 0.0, ("acc", "nlpd", "ece15")),
        ("calibration", None, "noise", 1.0, ("acc", "nlpd", "ece15")),
        ("selective", "msp", "clean", 0.0, ("aurc",)),
        ("conformal", "lac", "clean", 0.0, ("coverage", "set_size", "empty_rate")),
        ("conformal", "lac_target50", "clean", 0.0, ("coverage", "set_size", "empty_rate")),
        ("ood", "msp", "uniform-noise", None, ("auroc", "fpr95")),
    ]
    rows = []
    for task, score, condition, severity, metrics in spec:
        for method in methods:
            for metric in metrics:
                rows.append(
                    {**row(method, condition, float(rng.uniform()), metric, severity)}
                    | {"task": task, "score": score}
                )
    return rows


def test_cli_train_seeds_writes_mean_se_tables_and_keeps_a_file(tmp_path, monkeypatch, capsys):
    from laplace_vlm.cli import benchmark as cli
    from laplace_vlm.cli.main import main

    rng = np.random.default_rng(5)
    per_seed = [full_rows(rng) for _ in range(3)]
    calls = []

    def fake_over_seeds(config, k, run, **kwargs):
        calls.append(k)
        settings = {"pseudo_counts": {"bayesvlm": 10.0}, "skipped": []}
        return [
            BenchmarkResult({**settings, "train_seed": s}, rows, None)
            for s, rows in enumerate(per_seed[:k])
        ]

    monkeypatch.setattr(seeds, "run_over_seeds", fake_over_seeds)
    monkeypatch.setattr(cli, "summary", lambda result: "")
    path = tmp_path / "tables.md"
    argv = ["benchmark", "--train-seeds", "3", "--markdown", str(path), "--no-progress"]
    assert main(argv) == 0 and calls == [3]
    text = path.read_text()
    assert "mean ± SE over K = 3 training seeds [0, 1, 2]" in text
    nlpd = np.array([r["value"] for rows in per_seed for r in rows if r["metric"] == "nlpd"
                     and r["method"] == "map" and r["condition"] == "clean"])  # fmt: skip
    ece = np.array([r["value"] for rows in per_seed for r in rows if r["metric"] == "ece15"
                    and r["method"] == "map" and r["condition"] == "clean"])  # fmt: skip
    cell = " / ".join(f"{x.mean():.3f} ± {x.std(ddof=1) / math.sqrt(3):.3f}" for x in (nlpd, ece))
    assert f"| clean | {cell} |" in text
    assert "bayesvlm vs map" in text and "laplace_glm" not in text  # only comparisons it has
    capsys.readouterr()
    assert main(argv) == 2  # an existing file is kept
    assert "--markdown" in capsys.readouterr().err and path.read_text() == text
    with pytest.raises(SystemExit):
        main(["benchmark", "--train-seeds", "0"])
