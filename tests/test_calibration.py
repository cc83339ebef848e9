"""Temperature scaling recovers the temperature that generated the labels."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from laplace_vlm.evaluation.calibration import TemperatureScaling


@pytest.mark.parametrize("true_temperature", [0.5, 2.5])
def test_recovers_known_temperature(true_temperature):
    gen = torch.Generator().manual_seed(0)
    logits = 2.0 * torch.randn(20_000, 5, generator=gen, dtype=torch.float64)
    labels = torch.multinomial(torch.softmax(logits / true_temperature, -1), 1, generator=gen)[:, 0]
    scaler = TemperatureScaling().fit(logits, labels)
    assert scaler.temperature == pytest.approx(true_temperature, rel=0.05)
    # the fitted temperature is the NLL minimiser: nudging it either way costs likelihood
    nll = lambda t: F.cross_entropy(logits / t, labels).item()  # noqa: E731
    assert nll(scaler.temperature) <= min(
        nll(scaler.temperature * 1.05), nll(scaler.temperature / 1.05)
    )
    torch.testing.assert_close(scaler(logits), torch.softmax(logits / scaler.temperature, -1))


def test_unfitted_is_identity_and_bad_shapes_raise():
    logits = torch.randn(3, 4)
    torch.testing.assert_close(TemperatureScaling()(logits), torch.softmax(logits, -1))
    with pytest.raises(ValueError, match=r"labels must have shape \(3,\)"):
        TemperatureScaling().fit(logits, torch.zeros(2, dtype=torch.long))
