"""Metrics against hand-computed numbers and an independent numpy computation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from laplace_vlm.evaluation.metrics import (
    accuracy,
    brier,
    classification_metrics,
    ece,
    nlpd,
    reliability_bins,
)

PROBS = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.5, 0.45, 0.05], [0.2, 0.2, 0.6]])
LABELS = torch.tensor([0, 1, 0, 2])


def numpy_ece(probs: np.ndarray, labels: np.ndarray, n_bins: int) -> float:
    """Top-label L1 ECE with bins (b/n, (b+1)/n], written out independently."""
    conf, pred = probs.max(1), probs.argmax(1)
    total = 0.0
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            total += inside.mean() * abs(
                (pred[inside] == labels[inside]).mean() - conf[inside].mean()
            )
    return total


def test_hand_computed_values():
    # predictions 0, 2, 0, 2: the second input is wrong
    assert accuracy(PROBS, LABELS) == pytest.approx(0.75)
    assert nlpd(PROBS, LABELS) == pytest.approx(
        -(math.log(0.7) + math.log(0.3) + math.log(0.5) + math.log(0.6)) / 4
    )
    brier_rows = [
        0.3**2 + 0.2**2 + 0.1**2,
        0.1**2 + 0.7**2 + 0.6**2,
        0.5**2 + 0.45**2 + 0.05**2,
        0.2**2 + 0.2**2 + 0.4**2,
    ]
    assert brier(PROBS, LABELS) == pytest.approx(sum(brier_rows) / 4)
    # 20 bins: confidences 0.7 (right), 0.6 (wrong), 0.5 (right), 0.6 (right) -> bins 13, 11, 9, 11
    expected_ece = 0.25 * abs(1 - 0.7) + 0.5 * abs(0.5 - 0.6) + 0.25 * abs(1 - 0.5)
    assert ece(PROBS, LABELS) == pytest.approx(expected_ece, abs=1e-6)


def test_against_numpy_on_random_predictions():
    gen = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(500, 7, generator=gen, dtype=torch.float64)
    probs = torch.softmax(logits, -1)
    labels = torch.randint(0, 7, (500,), generator=gen)
    p, y = probs.numpy(), labels.numpy()
    assert accuracy(probs, labels) == pytest.approx((p.argmax(1) == y).mean())
    assert nlpd(probs, labels) == pytest.approx(-np.log(p[np.arange(500), y]).mean())
    assert brier(probs, labels) == pytest.approx(((p - np.eye(7)[y]) ** 2).sum(1).mean())
    assert ece(probs, labels) == pytest.approx(numpy_ece(p, y, 20), abs=1e-5)
    assert ece(probs, labels, n_bins=5) == pytest.approx(numpy_ece(p, y, 5), abs=1e-5)


def test_classification_metrics_name_the_bin_counts():
    gen = torch.Generator().manual_seed(1)
    probs = torch.softmax(3 * torch.randn(400, 5, generator=gen, dtype=torch.float64), -1)
    labels = torch.randint(0, 5, (400,), generator=gen)
    out = classification_metrics(probs, labels)
    p, y = probs.numpy(), labels.numpy()
    assert out["ece15"] == pytest.approx(numpy_ece(p, y, 15), abs=1e-5)
    assert out["ece20"] == pytest.approx(numpy_ece(p, y, 20), abs=1e-5)
    assert out["ece15"] != pytest.approx(out["ece20"], abs=1e-4)  # the bin count matters here
    assert out == {
        "acc": accuracy(probs, labels),
        "nlpd": nlpd(probs, labels),
        "ece15": ece(probs, labels, 15),
        "ece20": ece(probs, labels, 20),
        "brier": brier(probs, labels),
    }


@pytest.mark.parametrize(
    "probs, labels, match",
    [
        (torch.ones(4), LABELS, "probs"),
        (PROBS, LABELS[:3], "labels"),
        (PROBS, torch.tensor([0, 1, 3, 0]), "labels"),
    ],
)
def test_bad_input_names_the_argument(probs, labels, match):
    with pytest.raises(ValueError, match=match):
        nlpd(probs, labels)


@pytest.mark.parametrize("n_bins", [5, 15, 20])
def test_ece_and_its_bins_match_torchmetrics(n_bins):
    """One binning for the metric and the plot, checked against another library: the ECE
    of our bins equals torchmetrics' ``MulticlassCalibrationError``, and the bin counts equal
    a numpy histogram of the confidences on the same edges."""
    from torchmetrics.classification import MulticlassCalibrationError

    from laplace_vlm.evaluation.plots import reliability_bins as plotted_bins

    gen = torch.Generator().manual_seed(2)
    probs = torch.softmax(2 * torch.randn(300, 4, generator=gen, dtype=torch.float64), -1)
    labels = torch.randint(0, 4, (300,), generator=gen)
    metric = MulticlassCalibrationError(num_classes=4, n_bins=n_bins, norm="l1")
    assert ece(probs, labels, n_bins) == pytest.approx(metric(probs, labels).item(), abs=1e-6)
    conf, acc, count = reliability_bins(probs, labels, n_bins)
    assert plotted_bins is reliability_bins  # the plot reads the metric's bins
    confidence = probs.max(-1).values.numpy()
    hist, _ = np.histogram(confidence, bins=np.linspace(0, 1, n_bins + 1))
    np.testing.assert_array_equal(count.numpy(), hist)
    filled = count > 0
    for b in filled.nonzero().flatten().tolist():
        inside = (confidence > b / n_bins) & (confidence <= (b + 1) / n_bins)
        assert conf[b].item() == pytest.approx(confidence[inside].mean())
        right = probs.argmax(-1).numpy()[inside] == labels.numpy()[inside]
        assert acc[b].item() == pytest.approx(right.mean())


def test_from_logits_scores_the_softmax():
    gen = torch.Generator().manual_seed(3)
    logits = 4 * torch.randn(200, 6, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 6, (200,), generator=gen)
    assert nlpd(logits, labels, from_logits=True) == pytest.approx(
        torch.nn.functional.cross_entropy(logits, labels).item()
    )
    probs = torch.softmax(logits, -1)
    ours = classification_metrics(logits, labels, from_logits=True)
    assert ours == pytest.approx(classification_metrics(probs, labels))
