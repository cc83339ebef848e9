"""state_dict under weights_only loading, save/load as state_dict, 0.1 files, refusals.

Broken, foreign and overwritten files: ``test_hostile_inputs.py``.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from test_dual_encoder_laplace import loader, make_problem

from laplace_vlm import DualEncoderLaplace

pytestmark = pytest.mark.usefixtures("float64")


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
            loaded.predictive_moments(x, pred_type=method),
            la.predictive_moments(x, pred_type=method),
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


def _assert_same_state(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if key == "H":
            for block_a, block_b in zip(a[key], b[key]):
                for x, y in zip(block_a, block_b):
                    torch.testing.assert_close(x, y, rtol=0, atol=0)
        elif key == "heads":
            assert a[key].keys() == b[key].keys()
            for k in a[key]:
                torch.testing.assert_close(a[key][k], b[key][k], rtol=0, atol=0)
        elif isinstance(a[key], torch.Tensor):
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
        else:
            assert a[key] == b[key], key


def test_the_file_holds_exactly_the_state_dict(fitted, tmp_path):
    from laplace_vlm.io.posterior_file import read_state

    la, _, _ = fitted
    la.save(tmp_path / "la.safetensors")
    _assert_same_state(read_state(tmp_path / "la.safetensors"), la.state_dict())


def _write_v1_file(la, path):
    """A file in laplace-vlm 0.1's format, written the way 0.1's ``save`` wrote it."""
    import json

    state = la.state_dict()
    tensors = {f"H.{i}.{j}": F for i, block in enumerate(state["H"]) for j, F in enumerate(block)}
    tensors.update({f"heads.{k}": v for k, v in state["heads"].items()})
    tensors.update(mean=state["mean"], prior_precision=state["prior_precision"],
                   prior_mean=torch.as_tensor(state["prior_mean"]).reshape(-1),
                   loss=torch.as_tensor(state["loss"]).reshape(()))  # fmt: skip
    metadata = {
        "format": "laplace_vlm.dual_encoder_laplace", "version": "1",
        "contrastive": la.contrastive, "curvature": la.curvature,
        "damping": json.dumps(bool(la.damping)), "temperature": json.dumps(la.temperature),
        "n_data": json.dumps(la.n_data), "fingerprint": state["fingerprint"],
        "kron_layout": json.dumps([len(b) for b in state["H"]]),
        "head_shapes": json.dumps({k: list(v.shape) for k, v in state["heads"].items()}),
    }  # fmt: skip
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)


def test_files_of_version_0_1_still_load(fitted, tmp_path):
    la, _, x = fitted
    _write_v1_file(la, tmp_path / "old.safetensors")
    loaded = DualEncoderLaplace.load(tmp_path / "old.safetensors")
    assert loaded.posterior_form == "damped" and loaded.temperature == 0.5
    for a, b in zip(loaded.predictive_moments(x), la.predictive_moments(x)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.fixture(params=["hard link", "no hard links"])
def link_support(request, monkeypatch):
    """The writer's two ways to publish a new file: a hard link, or (file systems without
    them) an exclusively created placeholder renamed over."""
    if request.param == "no hard links":

        def no_link(src, dst):
            raise PermissionError(1, "Operation not permitted")

        monkeypatch.setattr("laplace_vlm.io.safetensors_file.os.link", no_link)
    return request.param


def test_a_file_that_appears_while_saving_is_not_replaced(fitted, tmp_path, monkeypatch,
                                                          link_support):  # fmt: skip
    import laplace_vlm.io.safetensors_file as safetensors_file

    la, _, _ = fitted
    path = tmp_path / "la.safetensors"
    write = safetensors_file.save_file

    def racing_write(tensors, filename, metadata=None):
        write(tensors, filename, metadata=metadata)
        path.write_bytes(b"another process's file")  # after the existence check, before rename

    monkeypatch.setattr(safetensors_file, "save_file", racing_write)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        la.save(path)
    assert path.read_bytes() == b"another process's file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["la.safetensors"]  # no temporary left


def test_saving_a_new_file_works_either_way(fitted, tmp_path, link_support):
    la, _, x = fitted
    path = tmp_path / "la.safetensors"
    la.save(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["la.safetensors"]
    from laplace_vlm.io.posterior_file import read_state

    _assert_same_state(read_state(path), la.state_dict())
    for a, b in zip(DualEncoderLaplace.load(path).predictive_moments(x), la.predictive_moments(x)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
