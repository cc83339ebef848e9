"""state_dict under weights_only loading, safetensors save/load, and refusals."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from test_dual_encoder_laplace import D_IMG, D_TXT, float64, loader, make_problem  # noqa: F401

from laplace_vlm import DualEncoderLaplace


@pytest.fixture
def fitted():
    kw, a_i, a_t = make_problem(bias=True, contrastive="siglip")
    la = DualEncoderLaplace(
        **kw, damping=True, temperature=0.5, prior_precision=torch.tensor([1.0, 2.0])
    )
    la.fit(loader(a_i, a_t))
    return la, kw, {"image": a_i[:4], "text": a_t[:5]}


def test_state_dict_loads_with_weights_only(fitted, tmp_path):
    la, kw, x = fitted
    torch.save(la.state_dict(), tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    assert isinstance(state["likelihood"], str) and state["contrastive"] == "siglip"
    other = DualEncoderLaplace(**kw, damping=True, temperature=0.5)
    other.load_state_dict(state)
    for a, b in zip(other.predictive_moments(x), la.predictive_moments(x)):
        torch.testing.assert_close(a, b)


def test_save_load_round_trip_without_the_model(fitted, tmp_path):
    la, _, x = fitted
    la.save(tmp_path / "la.safetensors")
    loaded = DualEncoderLaplace.load(tmp_path / "la.safetensors")
    assert loaded.contrastive == "siglip" and loaded.damping and loaded.temperature == 0.5
    torch.testing.assert_close(loaded.prior_precision, la.prior_precision)
    for method in ("glm", "probcosine"):
        for a, b in zip(
            loaded.predictive_moments(x, pred_type=method), la.predictive_moments(x, pred_type=method)
        ):
            torch.testing.assert_close(a, b)
    torch.testing.assert_close(loaded.log_marginal_likelihood(), la.log_marginal_likelihood())


def test_loading_into_other_heads_is_refused(fitted, tmp_path):
    la, _, _ = fitted
    other_kw, a_i, a_t = make_problem(bias=True, seed=1, contrastive="siglip")
    la.save(tmp_path / "la.safetensors")
    other = DualEncoderLaplace(**other_kw)
    with pytest.raises(ValueError, match="other projection heads"):
        other.load_state_dict(la.state_dict())
    clip = DualEncoderLaplace(**{**other_kw, "contrastive": "clip"})
    with pytest.raises(ValueError, match="contrastive"):
        clip.load_state_dict(la.state_dict())


def test_save_never_overwrites_silently(fitted, tmp_path):
    la, _, _ = fitted
    path = tmp_path / "la.safetensors"
    path.write_bytes(b"user data")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        la.save(path)
    assert path.read_bytes() == b"user data"
    la.save(path, overwrite=True)
    assert DualEncoderLaplace.load(path).n_data == la.n_data


@pytest.mark.parametrize("kind", ["foreign", "truncated", "garbage"])
def test_files_that_are_not_ours(fitted, tmp_path, kind):
    la, _, _ = fitted
    path = tmp_path / "file.safetensors"
    if kind == "foreign":
        save_file({"weight": torch.zeros(2)}, path, metadata={"format": "pt"})
    elif kind == "truncated":
        la.save(path)
        path.write_bytes(path.read_bytes()[:200])
    else:
        path.write_bytes(b"\x80\x04not a safetensors file at all")
    with pytest.raises(ValueError):
        DualEncoderLaplace.load(path)
