"""CLIP_benchmark's result JSON from benchmark rows, and ``benchmark --format clip_benchmark``."""

from __future__ import annotations

import json
import types

import pytest

from laplace_vlm.cli.main import main
from laplace_vlm.evaluation.clip_benchmark import clip_benchmark_records, write_clip_benchmark
from laplace_vlm.evaluation.tables import make_rows

MODEL = "laplace-vlm stand-in CLIP (digits)"
CAL = {"acc": 0.9, "nlpd": 0.3, "ece15": 0.05, "ece20": 0.06, "brier": 0.12}


def _rows():
    rows = []
    for condition, severity, shift in (("clean", None, 0.0), ("rotation", 1.0, 0.2)):
        for method in ("map", "laplace_probcosine"):
            bump = shift + (0.01 if method == "map" else 0.0)
            # selective and failure rows before calibration: the order must not matter
            rows += make_rows({"aurc": 0.02 + bump, "eaurc": 0.01}, "digits", "selective",
                              condition, severity, method, score="msp")  # fmt: skip
            rows += make_rows({"auroc": 0.8 - bump, "fpr95": 0.5}, "digits", "failure",
                              condition, severity, method, score="msp")  # fmt: skip
            rows += make_rows({"auroc": 0.7, "fpr95": 0.6}, "digits", "failure",
                              condition, severity, method, score="entropy")  # fmt: skip
            rows += make_rows({k: v - bump for k, v in CAL.items()}, "digits", "calibration",
                              condition, severity, method)  # fmt: skip
    rows += make_rows({"coverage": 0.9, "set_size": 1.2, "empty_rate": 0.0}, "digits",
                      "conformal", "clean", None, "map", score="lac")  # fmt: skip
    rows += make_rows({"auroc": 0.9, "fpr95": 0.3}, "digits", "ood", "fashion-mnist", None,
                      "map", score="msp")  # fmt: skip
    return rows


def test_records_written_out():
    records = clip_benchmark_records(_rows(), MODEL)
    by_key = {(r["dataset"], r["pretrained"]): r for r in records}
    assert sorted(by_key) == [("digits", "laplace_probcosine"), ("digits", "map"),
                              ("digits/rotation_1", "laplace_probcosine"),
                              ("digits/rotation_1", "map")]  # fmt: skip
    rot_map = by_key["digits/rotation_1", "map"]
    assert rot_map == {
        "dataset": "digits/rotation_1", "model": MODEL, "pretrained": "map",
        "task": "zeroshot_classification", "language": "en", "method": "map",
        "condition": "rotation", "severity": 1.0,
        "metrics": {"acc1": pytest.approx(0.69), "nlpd": pytest.approx(0.09),
                    "ece15": pytest.approx(-0.16), "ece20": pytest.approx(-0.15),
                    "brier": pytest.approx(-0.09), "aurc": pytest.approx(0.23), "eaurc": 0.01,
                    "failure_auroc": pytest.approx(0.59), "failure_fpr95": 0.5},
    }  # fmt: skip
    assert by_key["digits", "laplace_probcosine"]["metrics"]["acc1"] == 0.9


def test_bad_rows_and_model_are_refused():
    rows = _rows()
    rows[0] = {**rows[0], "metric": "acc5"}
    with pytest.raises(ValueError, match="metric 'acc5'"):
        clip_benchmark_records(rows, MODEL)
    with pytest.raises(ValueError, match="model must be"):
        clip_benchmark_records(_rows(), "")


def test_cli_format_clip_benchmark(tmp_path, monkeypatch, capsys):
    import laplace_vlm.cli.benchmark as cli_benchmark
    import laplace_vlm.experiments.benchmark as benchmark
    import laplace_vlm.experiments.experiment as experiment

    # the benchmark itself is tested elsewhere: here only the flag and the file it writes
    result = types.SimpleNamespace(rows=_rows(), settings={"skipped": []})
    monkeypatch.setattr(experiment, "ExperimentConfig", lambda *a, **k: None)
    monkeypatch.setattr(benchmark, "run_benchmark", lambda config, alpha: result)
    monkeypatch.setattr(cli_benchmark, "summary", lambda result: "")
    try:  # runs over several training seeds, where the benchmark has them
        import laplace_vlm.experiments.seeds as seeds

        monkeypatch.setattr(seeds, "run_over_seeds", lambda config, k, run, **kw: [result])
    except ImportError:
        pass
    path = tmp_path / "clip_benchmark.json"
    assert main(["benchmark", "--json", str(path), "--format", "clip_benchmark"]) == 0
    assert json.loads(path.read_text()) == json.loads(
        json.dumps(clip_benchmark_records(_rows(), MODEL))
    )
    assert main(["benchmark", "--format", "clip_benchmark"]) == 2
    assert "--format clip_benchmark needs --json" in capsys.readouterr().err


def test_write_clip_benchmark_is_strict_json(tmp_path):
    rows = make_rows({**CAL, "ece15": float("nan")}, "digits", "calibration", "clean", None, "map")
    path = write_clip_benchmark(tmp_path / "out" / "r.json", rows, MODEL)
    assert json.loads(path.read_text())[0]["metrics"]["ece15"] is None  # NaN -> None in rows
