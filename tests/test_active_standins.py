"""Active learning over training seeds: the aggregation against numpy, the runner with a fake cell."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from laplace_vlm.cli.main import main as cli_main
from laplace_vlm.experiments import active_standins
from laplace_vlm.experiments.active import DemoSetting
from laplace_vlm.experiments.processes import run_in_processes

STRATEGIES = ("random", "map_entropy", "epig")
BUDGETS = ("0", "20", "40")


def fake_summary(rng: np.random.Generator, lift: float, seeds: int = 3) -> dict:
    """A stand-in's summary: accuracy per AL seed, EPIG ``lift`` above random at every budget."""
    out = {}
    base = {b: rng.uniform(0.5, 0.7, seeds) for b in BUDGETS}
    for s in STRATEGIES:
        out[s] = {}
        for b in BUDGETS:
            acc = base[b] + (lift if s == "epig" and b != "0" else 0.0) + 0.01 * rng.normal(
                size=seeds) * (b != "0")  # fmt: skip
            out[s][b] = {"acc_mean": float(acc.mean()), "acc_std": float(acc.std(ddof=1)),
                         "nlpd_mean": float(1 - acc.mean()), "ece_mean": 0.1, "n_seeds": seeds,
                         "labels_used_max": int(b),
                         "acc_per_seed": acc.tolist()}  # fmt: skip
    return out


def test_standin_summary_pairs_stand_ins_and_claims_need_two_se():
    rng = np.random.default_rng(0)
    summaries = [fake_summary(rng, lift=0.02 + 0.005 * rng.normal()) for _ in range(5)]
    over = active_standins.standin_summary(summaries)
    for s in STRATEGIES:
        for b in BUDGETS:
            means = np.array([x[s][b]["acc_mean"] for x in summaries])
            assert over[s][b]["acc_per_seed"] == pytest.approx(means.tolist(), abs=0)
            assert over[s][b]["acc_mean"] == pytest.approx(means.mean(), rel=1e-12)
            assert over[s][b]["acc_std"] == pytest.approx(means.std(ddof=1), rel=1e-12)
            assert over[s][b]["nlpd_mean"] == pytest.approx(1 - means.mean(), rel=1e-12)
            assert over[s][b]["n_seeds"] == 5 and over[s][b]["labels_used_max"] == int(b)
    text, result = active_standins.report_text(
        [{"train_seed": i, "zero_shot_acc": 0.5 + 0.01 * i, "summary": x,
          "description": "digits, target = rotation 0.2 (zero-shot accuracy 0.5); protocol"}
         for i, x in enumerate(summaries)])  # fmt: skip
    d = np.array([x["epig"]["40"]["acc_mean"] - x["random"]["40"]["acc_mean"] for x in summaries])
    got = result["differences"]["random"]["epig"]["40"]
    assert got["mean"] == pytest.approx(d.mean(), rel=1e-12)
    assert got["se"] == pytest.approx(d.std(ddof=1) / math.sqrt(5), rel=1e-12)
    # a lift of .02 with stand-in noise .005 is a win; map entropy equals random: a tie
    assert result["claims"]["random"]["epig"] == {"20": "win", "40": "win"}
    assert result["claims"]["random"]["map_entropy"] == {"20": "tie", "40": "tie"}
    assert "5 stand-ins (training seeds 0, 1, 2, 3, 4)" in text
    assert "labels used in total: n=0: 0, n=20: 20, n=40: 40" in text
    assert "epig vs random (> 2 SE over stand-ins): 20: win, 40: win" in text
    # a loss is claimed the same way, and one stand-in claims nothing
    worse = [fake_summary(rng, lift=-0.03) for _ in range(4)]
    diffs = active_standins.report_text(
        [{"train_seed": i, "zero_shot_acc": 0.5, "summary": x, "description": "x; y"}
         for i, x in enumerate(worse)])[1]["claims"]  # fmt: skip
    assert set(diffs["random"]["epig"].values()) == {"loss"}
    single = active_standins.claims({"epig": {"20": {"mean": 0.5, "se": 0.0, "n": 1}}})
    assert single == {"epig": {"20": "tie"}}


def test_standin_summary_refuses_mismatched_layouts():
    rng = np.random.default_rng(1)
    a, b = fake_summary(rng, 0.0), fake_summary(rng, 0.0)
    del b["epig"]
    with pytest.raises(ValueError, match=r"summaries\[1\] has other strategies"):
        active_standins.standin_summary([a, b])
    with pytest.raises(ValueError, match="at least one"):
        active_standins.standin_summary([])


def test_main_runs_each_training_seed_and_writes_the_json(tmp_path, monkeypatch, capsys):
    """Every stand-in is the cell at its own train_seed; the JSON holds the runs and the means."""
    rng = np.random.default_rng(2)
    seen = []

    class Prepared:
        zero_shot_acc = 0.55

    def fake_run_setting(setting, config):
        seen.append(setting.train_seed)
        return fake_summary(rng, lift=0.01), Prepared()

    monkeypatch.setattr(active_standins, "run_setting", fake_run_setting)
    from laplace_vlm.active.config import ActiveLearningConfig

    path = tmp_path / "standins.json"
    setting = DemoSetting(train_seed=2)
    assert active_standins.main(setting, ActiveLearningConfig(seeds=(0, 1, 2)), 3,
                                json_path=path) == 0  # fmt: skip
    assert seen == [2, 3, 4]
    payload = json.loads(path.read_text())
    assert [r["train_seed"] for r in payload["runs"]] == [2, 3, 4]
    means = [r["summary"]["epig"]["20"]["acc_mean"] for r in payload["runs"]]
    over = payload["over_standins"]["summary"]["epig"]["20"]
    assert over["acc_mean"] == pytest.approx(np.mean(means), rel=1e-12)
    assert "3 stand-ins (training seeds 2, 3, 4)" in capsys.readouterr().out
    with pytest.raises(ValueError, match="train_seeds must be a positive int"):
        active_standins.main(setting, ActiveLearningConfig(), 0)
    with pytest.raises(ValueError, match="train_seed must be an int >= 0"):
        DemoSetting(train_seed=-1)


@pytest.mark.parametrize("argv, message", [
    (["active", "--train-seeds", "0"], "--train-seeds must be >= 1, got 0"),
    (["active", "--sweep", "--json", "x.json", "--train-seeds", "2"],
     "--train-seeds runs one cell on several stand-ins"),
])  # fmt: skip
def test_cli_refuses_bad_train_seeds(capsys, argv, message):
    assert cli_main(argv) == 2
    assert message in capsys.readouterr().err


def test_run_in_processes_in_process_order_and_errors():
    finished = []
    out = run_in_processes(math.pow, [(2, 3), (3, 2), (2, 0.5)], 1,
                           lambda done: finished.append(sorted(done)), order=[2, 0, 1])  # fmt: skip
    assert out == [8.0, 9.0, math.sqrt(2)] and finished == [[2], [0, 2], [0, 1, 2]]
    with pytest.raises(ValueError, match="workers must be a positive int"):
        run_in_processes(math.pow, [(2, 3)], 0)
    with pytest.raises(ValueError, match="order must be a permutation"):
        run_in_processes(math.pow, [(2, 3)], 1, order=[1])


@pytest.mark.slow
def test_run_in_processes_spawned_workers_give_the_same_results():
    calls = [(float(i), 1.5) for i in range(5)]
    assert run_in_processes(math.pow, calls, 2) == [math.pow(*c) for c in calls]
