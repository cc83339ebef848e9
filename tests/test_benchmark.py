"""The benchmark: each row against an independent computation, the JSON schema, the CLI."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from laplace_vlm.evaluation.conformal import SplitConformal
from laplace_vlm.evaluation.tables import (
    METRICS,
    ROW_KEYS,
    TASKS,
    check_rows,
    make_rows,
    value,
    write_json,
)
from laplace_vlm.experiments.benchmark import condition_rows, ood_rows, ood_scores
from laplace_vlm.experiments.experiment import Prediction

TINY_TRAINING = {"epochs": 1}


def numpy_auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(pos > neg) + P(pos = neg) / 2 over all pairs."""
    return float((pos[:, None] > neg[None]).mean() + 0.5 * (pos[:, None] == neg[None]).mean())


def numpy_fpr95(pos: np.ndarray, neg: np.ndarray) -> float:
    """Smallest fraction of negatives accepted by a threshold accepting >= 95% of positives."""
    return min((neg >= t).mean() for t in np.unique(pos) if (pos >= t).mean() >= 0.95)


def numpy_aurc(confidence: np.ndarray, correct: np.ndarray) -> float:
    """Mean over k of the error rate of the k most confident (no ties in the test data)."""
    order = np.argsort(-confidence)
    errors = np.cumsum(~correct[order])
    return float(np.mean(errors / np.arange(1, len(order) + 1)))


def synthetic_prediction(n: int, seed: int, laplace: bool, scale: float = 3.0) -> Prediction:
    gen = torch.Generator().manual_seed(seed)
    logits = scale * torch.randn(n, 4, generator=gen, dtype=torch.float64)
    probs = torch.softmax(logits, -1)
    entropy = -(probs * probs.log()).sum(-1)
    if not laplace:
        return Prediction(probs, logits, None, entropy, None)
    var = torch.rand(n, 4, generator=gen, dtype=torch.float64)
    mi = torch.rand(n, generator=gen, dtype=torch.float64)
    return Prediction(probs, logits, var, entropy, mi)


@pytest.fixture(scope="module")
def predictions():
    return {
        "map": synthetic_prediction(300, 0, False),
        "laplace_glm": synthetic_prediction(300, 1, True),
    }


def test_condition_rows_equal_independent_computations(predictions):
    labels = torch.randint(0, 4, (300,), generator=torch.Generator().manual_seed(5))
    cal = synthetic_prediction(200, 7, False)
    cal_labels = torch.randint(0, 4, (200,), generator=torch.Generator().manual_seed(8))
    lac = {m: {"lac": SplitConformal("lac", 0.1).fit(cal.probs, cal_labels)} for m in predictions}
    rows = check_rows(condition_rows("toy", "blur", 0.4, predictions, labels, conformal=lac))
    assert {(r["dataset"], r["condition"], r["severity"]) for r in rows} == {("toy", "blur", 0.4)}
    for method, p in predictions.items():
        probs, y = p.probs.numpy(), labels.numpy()
        correct = probs.argmax(1) == y
        get = lambda **k: value(rows, method=method, **k)  # noqa: E731
        assert get(task="calibration", metric="acc") == pytest.approx(correct.mean())
        assert get(task="calibration", metric="nlpd") == pytest.approx(
            -np.log(probs[np.arange(300), y]).mean()
        )
        onehot = np.eye(4)[y]
        assert get(task="calibration", metric="brier") == pytest.approx(
            ((probs - onehot) ** 2).sum(1).mean()
        )
        scores = {"msp": probs.max(1)}
        if method != "map":  # entropy and MI are the posterior's scores only
            scores.update(
                entropy=-p.entropy.numpy(), mutual_information=-p.mutual_information.numpy()
            )
        assert {
            r["score"] for r in rows if r["method"] == method and r["task"] == "failure"
        } == set(scores)
        for score, confidence in scores.items():
            assert get(task="selective", score=score, metric="aurc") == pytest.approx(
                numpy_aurc(confidence, correct)
            )
            pos, neg = confidence[correct], confidence[~correct]
            assert get(task="failure", score=score, metric="auroc") == pytest.approx(
                numpy_auroc(pos, neg)
            )
            assert get(task="failure", score=score, metric="fpr95") == pytest.approx(
                numpy_fpr95(pos, neg)
            )
        # LAC by hand: the ceil((n + 1) 0.9)-th smallest calibration score 1 - p_y
        cal_scores = np.sort(1 - cal.probs.numpy()[np.arange(200), cal_labels.numpy()])
        q_hat = cal_scores[math.ceil(201 * 0.9) - 1]
        sets = probs >= 1 - q_hat
        assert get(task="conformal", score="lac", metric="coverage") == pytest.approx(
            sets[np.arange(300), y].mean()
        )
        assert get(task="conformal", score="lac", metric="set_size") == pytest.approx(
            sets.sum(1).mean()
        )


def test_failure_rows_are_null_without_errors(predictions):
    p = predictions["map"]
    rows = condition_rows("toy", "clean", 0.0, {"map": p}, p.probs.argmax(-1), tasks=("failure",))
    assert {r["value"] for r in rows} == {None}
    assert json.loads(json.dumps(rows)) == rows  # strict JSON: null, not NaN


def test_ood_rows_score_every_model_with_every_score(predictions):
    out = {
        "map": synthetic_prediction(150, 3, False, 1.0),
        "laplace_glm": synthetic_prediction(150, 4, True, 1.0),
    }
    scale = 2.0
    rows = check_rows(
        ood_rows("toy", "noise-images", ood_scores(predictions, scale), ood_scores(out, scale))
    )
    scores = {(r["method"], r["score"]) for r in rows}
    assert scores == {
        ("map", "msp"),
        ("map", "entropy"),
        ("map", "mcm"),
        ("laplace_glm", "msp"),
        ("laplace_glm", "entropy"),
        ("laplace_glm", "mcm"),
        ("laplace_glm", "mutual_information"),
        ("laplace_glm", "expected_logit_variance"),
    }
    assert all(r["severity"] is None and r["condition"] == "noise-images" for r in rows)

    def in_confidence(p: Prediction, score: str) -> np.ndarray:  # higher = more in-distribution
        if score == "msp":
            return p.probs.max(-1).values.numpy()
        if score == "mcm":  # softmax of the (expected) cosines, temperature 1
            return torch.softmax(p.logit_mean / scale, -1).max(-1).values.numpy()
        if score == "expected_logit_variance":
            return -p.logit_var.mean(-1).numpy()
        return -(p.entropy if score == "entropy" else p.mutual_information).numpy()

    for method, score in scores:
        pos = in_confidence(predictions[method], score)
        neg = in_confidence(out[method], score)
        got = value(rows, method=method, score=score, metric="auroc")
        assert got == pytest.approx(numpy_auroc(pos, neg)), (method, score)
        got = value(rows, method=method, score=score, metric="fpr95")
        assert got == pytest.approx(numpy_fpr95(pos, neg)), (method, score)


def test_rows_and_json_follow_the_schema(tmp_path):
    rows = make_rows(
        {"coverage": 0.9, "set_size": 1.5},
        "digits",
        "conformal",
        "clean",
        0,
        "bayesvlm",
        "aps",
    )
    assert [tuple(r) for r in rows] == [ROW_KEYS, ROW_KEYS]
    assert rows[0]["severity"] == 0.0 and isinstance(rows[0]["severity"], float)
    with pytest.raises(ValueError, match="task"):
        make_rows({"acc": 1.0}, "digits", "retrieval", "clean", 0, "map")
    with pytest.raises(ValueError, match="values"):
        make_rows({"aurc": 0.1}, "digits", "calibration", "clean", 0, "map")
    with pytest.raises(ValueError, match="keys"):
        check_rows([{k: rows[0][k] for k in reversed(ROW_KEYS)}])
    path = write_json(tmp_path / "sub" / "rows.json", {"alpha": 0.1}, rows)
    assert json.loads(path.read_text()) == {"settings": {"alpha": 0.1}, "rows": rows}


def test_cli_knows_the_recipes_data_sets():
    from laplace_vlm.cli import benchmark as cli_benchmark
    from laplace_vlm.experiments.recipe import DATASETS

    assert cli_benchmark.DATASETS == DATASETS


def test_cli_missing_fashion_files_is_one_line(tmp_path, capsys):
    from laplace_vlm.cli.main import main

    assert main(["benchmark", "--dataset", "fashion-mnist", "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--data-dir" in err and "train-images-idx3-ubyte.gz" in err
    assert main(["benchmark", "--data-dir", str(tmp_path / "none")]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert main(["benchmark", "--alpha", "1.5"]) == 2


def test_plots_leave_pyplot_alone_and_create_their_folder(tmp_path, predictions):
    import matplotlib
    import matplotlib.pyplot as plt  # torchmetrics imports pyplot anyway: check its state

    from laplace_vlm.evaluation.plots import reliability_diagram

    backend, figures = matplotlib.get_backend(), plt.get_fignums()
    labels = predictions["map"].probs.argmax(-1)
    path = reliability_diagram(
        {m: p.probs for m, p in predictions.items()}, labels, tmp_path / "new" / "folder" / "r.png"
    )
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert matplotlib.get_backend() == backend and plt.get_fignums() == figures


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    from laplace_vlm.experiments.benchmark import run_benchmark
    from laplace_vlm.experiments.experiment import ExperimentConfig

    cache = tmp_path_factory.mktemp("bench_cache")
    config = ExperimentConfig(
        "digits",
        cache_dir=cache,
        train_config=TINY_TRAINING,
        pseudo_counts=(10.0, 1000.0),
        mc_samples=50,
    )
    return run_benchmark(config, severities=(1.0,))


METHOD = re.compile(
    r"^(map|temperature|bayesvlm|laplace_(probcosine|glm|nn)|laplace_probcosine_exact)$"
)


def test_mini_benchmark_schema(mini, tmp_path):
    from laplace_vlm.datasets.fashion_mnist import available

    path = write_json(tmp_path / "b.json", mini.settings, mini.rows)
    stored = json.loads(path.read_text())
    assert set(stored) == {"settings", "rows"} and stored["settings"]["alpha"] == 0.1
    rows = stored["rows"]
    assert {r["task"] for r in rows} == set(TASKS)
    assert {r["method"] for r in rows} == {
        "map",
        "temperature",
        "bayesvlm",
        "laplace_probcosine",
        "laplace_glm",
        "laplace_nn",
        "laplace_probcosine_exact",
    }
    for r in rows:
        assert tuple(r) == ROW_KEYS and METHOD.match(r["method"]), r
        assert r["metric"] in METRICS[r["task"]] and r["metric"] == r["metric"].lower()
        assert (r["score"] is None) == (r["task"] == "calibration"), r
        assert (r["severity"] is None) == (r["task"] == "ood"), r
        assert r["value"] is None or math.isfinite(r["value"])
    ood_sets = {r["condition"] for r in rows if r["task"] == "ood"}
    if available():
        assert ood_sets == {"uniform-noise", "fashion-mnist"}
    else:
        assert ood_sets == {"uniform-noise"} and "fashion-mnist" in mini.settings["skipped"][0]


def test_mini_benchmark_settings_and_predictives(mini):
    exp = mini.experiment
    for method, choice in exp.choices.items():  # the grid point of lowest validation NLPD
        by_n = choice.nlpd_by_pseudo_count
        assert mini.settings["pseudo_counts"][method] == min(by_n, key=by_n.get)
    assert mini.settings["pseudo_counts"]["bayesvlm"] == 10.0
    assert mini.settings["laplace_methods"]["bayesvlm"]["form"] == "symmetric"
    assert mini.settings["laplace_methods"]["laplace_probcosine_exact"]["form"] == "exact"
    # laplace_nn is laplace's exact MC predictive with the same draws
    acts, preds = mini.kept[("clean", 0.0)]
    setting = exp.settings["laplace_nn"].setting
    setting.apply(exp.la)
    x = exp.classifier.inputs(acts)
    probs = exp.la(
        x,
        pred_type="nn",
        link_approx="mc",
        n_samples=50,
        generator=torch.Generator().manual_seed(exp.seed),
    )
    torch.testing.assert_close(preds["laplace_nn"].probs, probs)
    # temperature scaling: fitted on clean validation logits computed with open_clip directly
    from laplace_vlm.datasets.prompts import PROMPTS
    from laplace_vlm.evaluation.calibration import TemperatureScaling
    from laplace_vlm.standins.training import clip_tokenizer

    val_x, val_y = exp.splits["val"]
    prompts = PROMPTS["digits"]
    text = [t.format(c) for c in prompts.classnames for t in prompts.templates]
    with torch.no_grad():
        u = exp.model.encode_image(val_x, normalize=True)
        t = exp.model.encode_text(clip_tokenizer()(text)).reshape(10, len(prompts.templates), -1)
        logits = exp.model.logit_scale.exp() * u @ F.normalize(t.mean(1), dim=-1).T
    assert mini.settings["temperature"] == pytest.approx(
        TemperatureScaling().fit(logits, val_y).temperature, rel=1e-3
    )


def test_mini_benchmark_bayesvlm_is_the_papers_method_written_out(mini):
    """The ``bayesvlm`` probabilities from the released method's formulas, by hand: the symmetric
    Kronecker posterior of each head at n = 10 from the curvature pairs' factor sums, the full
    ProbCosine moments and the probit softmax."""
    exp = mini.experiment
    acts, preds = mini.kept[("clean", 0.0)]
    la = exp.la
    sums, N = la.factor_sums(), float(la.n_data)
    prior = torch.as_tensor(mini.settings["prior_precision"]["bayesvlm"], dtype=torch.float64)
    n = 10.0

    def head_cov(B_sum, A_sum, lam):  # (sqrt(n) B/sqrt(N) + sqrt(l) I)^-1, the same for A
        inv = lambda M: torch.linalg.inv(  # noqa: E731
            n**0.5 * M.double() / N**0.5 + lam**0.5 * torch.eye(len(M), dtype=torch.float64)
        )
        return inv(B_sum), inv(A_sum)

    S_Bi, S_Ai = head_cov(sums.B_image, sums.A_image, prior[0])
    S_Bt, S_At = head_cov(sums.B_text, sums.A_text, prior[-1])
    W_i = la.heads.image_projection.weight.double()
    W_t = la.heads.text_projection.weight.double()
    a_i, a_t = acts.double(), exp.classifier.class_activations.double()
    z, t = a_i @ W_i.T, a_t @ W_t.T
    q_i = torch.einsum("nd,de,ne->n", a_i, S_Ai, a_i)  # Cov[z_n] = q_i[n] S_Bi
    q_t = torch.einsum("cd,de,ce->c", a_t, S_At, a_t)
    num_var = (
        q_t[None] * torch.einsum("nd,de,ne->n", z, S_Bt, z)[:, None]
        + q_i[:, None] * torch.einsum("cd,de,ce->c", t, S_Bi, t)[None]
        + q_i[:, None] * q_t[None] * (S_Bi * S_Bt).sum()
    )
    norm2_z = z.square().sum(-1) + q_i * S_Bi.trace()
    norm2_t = t.square().sum(-1) + q_t * S_Bt.trace()
    denom = norm2_z[:, None] * norm2_t[None]
    s = la.heads.scale.double()
    mean, var = s * (z @ t.T) / denom.sqrt(), s**2 * num_var / denom
    probs = torch.softmax(mean / (1 + torch.pi / 8 * var).sqrt(), -1)
    torch.testing.assert_close(preds["bayesvlm"].probs.double(), probs, rtol=1e-4, atol=1e-6)
    assert exp.settings["bayesvlm"].setting.pseudo_count == n


def test_mini_benchmark_target_recalibrated_conformal_is_split_conformal_on_50_images(mini):
    """``lac_target50`` on the clean condition: LAC calibrated on the 50 drawn validation
    images alone, evaluated on the test split; and ``empty_rate`` counted by a loop."""
    from laplace_vlm.experiments.benchmark import TARGET_LABELS, target_sample

    exp = mini.experiment
    val_x, val_y = exp.splits["val"]
    target = target_sample(val_y, exp.seed)
    assert len(target) == TARGET_LABELS == 50
    few = exp.predict(exp.encode(val_x[target]))["map"].probs
    predictor = SplitConformal("lac", 0.1).fit(few, val_y[target])
    # LAC by hand: threshold = the ceil(51 * 0.9)-th smallest of 1 - p_y on the 50 images
    scores = (1 - few[torch.arange(50), val_y[target]]).sort().values
    threshold = scores[math.ceil(51 * 0.9) - 1]
    test_probs = mini.kept[("clean", 0.0)][1]["map"].probs
    sets = 1 - test_probs <= threshold
    torch.testing.assert_close(predictor.predict(test_probs), sets)
    get = {r["metric"]: r["value"] for r in mini.rows
           if r["task"] == "conformal" and r["condition"] == "clean" and r["method"] == "map"
           and r["score"] == "lac_target50"}  # fmt: skip
    labels = mini.labels
    assert get["coverage"] == pytest.approx(
        sets[torch.arange(len(labels)), labels].double().mean().item()
    )
    empty = sum(1 for row in sets.tolist() if not any(row)) / len(sets)
    assert get["empty_rate"] == pytest.approx(empty)
