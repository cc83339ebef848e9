"""Hostile and broken input: every case ends in a clear error (message matched), never in
``exit()``, a NaN result, or unpickling a file."""

from __future__ import annotations

import json
import os
import pickle
import re

import pytest
import torch
from conftest import tiny_clip
from safetensors import safe_open
from safetensors.torch import save_file
from test_dual_encoder_laplace import D_IMG, D_TXT, D, loader, make_problem
from torch.utils.data import DataLoader, TensorDataset

from laplace_vlm import DualEncoderLaplace

pytestmark = pytest.mark.usefixtures("float64")

NAN, INF = float("nan"), float("inf")


def fitted(
    contrastive: str = "clip", **kwargs
) -> tuple[DualEncoderLaplace, torch.Tensor, torch.Tensor]:
    kw, a_i, a_t = make_problem(bias=False, contrastive=contrastive)
    la = DualEncoderLaplace(**kw, **kwargs)
    la.fit(loader(a_i, a_t))
    return la, a_i, a_t


def raises_value_error(fn, match: str) -> None:
    """``fn()`` raises a ValueError matching ``match``; laplace's ``exit()`` fails the test."""
    try:
        with pytest.raises(ValueError, match=match):
            fn()
    except SystemExit:  # pragma: no cover - the failure this guards against
        pytest.fail("exit() was called (laplace's symeig on a non-finite matrix)")


# ----------------------------------------------------------------- fit batches
def _batch(**overrides):
    g = torch.Generator().manual_seed(7)
    batch = {
        "image": torch.randn(8, D_IMG, generator=g),
        "text": torch.randn(8, D_TXT, generator=g),
    }
    batch.update(overrides)
    return batch


def _cancelling_residual():
    """A residual that cancels the projection: z = W a + r = 0."""
    W = make_problem(bias=False)[0]["image_projection"].weight.detach()
    return _batch(image_residual=-_batch()["image"] @ W.T)


# batches are built inside the test, under the float64 fixture
@pytest.mark.parametrize(
    "make_batch, error, match",
    [
        (
            lambda: (torch.randn(8, D_IMG), torch.randn(8, D_TXT), torch.randn(8)),
            ValueError,
            "must be",
        ),  # fmt: skip
        (lambda: {"img": torch.randn(8, D_IMG)}, ValueError, "'image' and 'text'"),
        (lambda: "not a batch", ValueError, "a fit batch must be"),
        (lambda: _batch(image=torch.randn(D_IMG)), ValueError, "shape"),
        (lambda: _batch(image=torch.randn(8, D_IMG, 1)), ValueError, "feature mode"),
        (lambda: _batch(image=torch.randn(8, D_IMG + 1)), ValueError, r"\(N, 6\)"),
        (
            lambda: _batch(image=torch.ones(8, D_IMG, dtype=torch.int64)),
            TypeError,
            "floating-point",
        ),  # fmt: skip
        (lambda: _batch(image=[[0.0] * D_IMG] * 8), TypeError, "torch.Tensor"),
        (lambda: _batch(text=torch.randn(7, D_TXT)), ValueError, "matched pairs"),
        (
            lambda: _batch(image=torch.randn(0, D_IMG), text=torch.randn(0, D_TXT)),
            ValueError,
            "empty",
        ),  # fmt: skip
        (lambda: _batch(image=torch.full((8, D_IMG), NAN)), ValueError, "NaN or inf"),
        (lambda: _batch(text=torch.full((8, D_TXT), -INF)), ValueError, "NaN or inf"),
        (
            lambda: _batch(image_residual=torch.full((8, D), NAN)),
            ValueError,
            "residual contains NaN",
        ),  # fmt: skip
        (lambda: _batch(image_residual=torch.zeros(7, D)), ValueError, "residual must have 8"),
        (lambda: _batch(image=torch.zeros(8, D_IMG)), ValueError, "zero-norm"),
        (_cancelling_residual, ValueError, "zero-norm"),
        # |z|^2 overflows float64: reported as such, not as a zero norm or a NaN factor
        (lambda: _batch(image=torch.full((8, D_IMG), 1e160)), ValueError, "overflowing"),
    ],
)
def test_bad_fit_batches(make_batch, error, match):
    kw, _, _ = make_problem(bias=False)
    batch = make_batch()
    with pytest.raises(error, match=match):
        DualEncoderLaplace(**kw).fit([batch])


def _empty_generator():
    yield from ()


@pytest.mark.parametrize(
    "make_loader",
    [
        lambda: [],
        _empty_generator,
        lambda: DataLoader(
            TensorDataset(torch.randn(0, D_IMG), torch.randn(0, D_TXT)), batch_size=4
        ),
    ],
    ids=["list", "generator", "dataloader"],
)
def test_empty_loaders(make_loader):
    kw, _, _ = make_problem(bias=False)
    with pytest.raises(ValueError, match="no pairs"):
        DualEncoderLaplace(**kw).fit(make_loader())


# ----------------------------------------------------------------- heads and hyperparameters
@pytest.mark.parametrize(
    "override, match",
    [
        ({"logit_scale": NAN}, "logit_scale"),
        ({"logit_scale": INF}, "logit_scale"),
        ({"logit_scale": torch.ones(2)}, "scalar"),
        ({"logit_bias": -INF}, "logit_bias"),
        ({"text_projection": torch.randn(D + 1, D_TXT)}, "same embedding dim"),
        ({"image_projection": torch.randn(D, D_IMG, 2)}, r"\(D, d\)"),
        ({"contrastive": "infonce"}, "contrastive"),
        ({"chunk_size": 0}, "chunk_size"),
    ],
)
def test_bad_heads_and_arguments(override, match):
    kw, _, _ = make_problem(bias=False)
    with pytest.raises(ValueError, match=match):
        DualEncoderLaplace(**{**kw, **override})


def test_nan_projection_weights_are_refused_before_any_curvature():
    kw, a_i, a_t = make_problem(bias=False)
    bad = {**kw, "image_projection": torch.full((D, D_IMG), NAN)}

    def construct_and_fit():
        DualEncoderLaplace(**bad).fit(loader(a_i, a_t))

    raises_value_error(construct_and_fit, "NaN or inf")


@pytest.mark.parametrize(
    "hyper", [{"prior_precision": -1.0}, {"prior_precision": NAN}, {"temperature": 0.0}]
)
def test_non_positive_prior_or_temperature_is_refused(hyper):
    kw, a_i, a_t = make_problem(bias=False)

    def construct_fit_predict():
        la = DualEncoderLaplace(**kw, **hyper)
        la.fit(loader(a_i, a_t))
        la.predictive_moments({"image": a_i[:3], "text": a_t[:4]})

    raises_value_error(construct_fit_predict, "prior_precision|temperature")


# ----------------------------------------------------------------- degenerate curvature
@pytest.mark.parametrize("contrastive", ["clip", "siglip"])
@pytest.mark.parametrize("prior", [1.0, 1e-6])
def test_rank_deficient_curvature_gives_finite_positive_variances(contrastive, prior):
    # every pair identical: all logits of a row are equal, the GGN of each head is ~0
    kw, a_i, a_t = make_problem(bias=True, contrastive=contrastive)
    la = DualEncoderLaplace(**kw, prior_precision=prior)
    la.fit([(a_i[:1].repeat(8, 1), a_t[:1].repeat(8, 1)) for _ in range(3)])
    B = la.H_facs.kfacs[0][0]
    assert torch.linalg.matrix_rank(B, atol=1e-8) < D  # really rank-deficient
    x = {"image": a_i[:5], "text": a_t[:6]}
    for method in ("probcosine", "probcosine_diag", "glm"):
        mean, var = la.predictive_moments(x, pred_type=method)
        assert torch.isfinite(mean).all() and torch.isfinite(var).all(), method
        assert (var > 0).all(), method
    for pred_type in ("glm", "probcosine"):
        mean, var = la.predictive_moments(x, pred_type=pred_type)
        probit = torch.softmax(mean / torch.sqrt(1 + torch.pi / 8 * var), -1)
        torch.testing.assert_close(la(x, pred_type=pred_type), probit)


def test_non_finite_curvature_is_a_value_error_not_exit():
    # finite activations whose outer products overflow float32: A = sum a a^T = inf
    g = torch.Generator().manual_seed(0)
    W_i, W_t = 1e-10 * torch.randn(D, D_IMG, generator=g), torch.randn(D, D_TXT, generator=g)
    la = DualEncoderLaplace(image_projection=W_i.float(), text_projection=W_t.float(),
                            logit_scale=0.5)  # fmt: skip
    a_i = 1e20 * torch.randn(8, D_IMG, generator=g).float()
    a_t = torch.randn(8, D_TXT, generator=g).float()
    assert torch.isfinite(a_i).all() and not torch.isfinite(a_i.T @ a_i).all()
    raises_value_error(lambda: la.fit([(a_i, a_t)]), "curvature factor A_image contains NaN")


def test_overflowing_logit_scale_is_a_value_error_not_exit():
    # exp(1000) = inf: softmax weights and the curvature are NaN
    kw, a_i, a_t = make_problem(bias=False)
    la = DualEncoderLaplace(**{**kw, "logit_scale": 1000.0})
    raises_value_error(lambda: la.fit(loader(a_i, a_t)), "NaN or inf")


# ----------------------------------------------------------------- predict inputs
@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda la, x: la.predictive_moments(x, pred_type="mc"), ValueError, "pred_type must be"),
        (
            lambda la, x: la.predictive_moments(x, pred_type="probcosine", diagonal_output=False),
            ValueError,
            "needs pred_type='glm'",
        ),  # fmt: skip
        (lambda la, x: la(x, pred_type="nn"), ValueError, "link_approx='mc'"),
        (lambda la, x: la(x, link_approx="laplace"), ValueError, "link_approx must be"),
        (lambda la, x: la(x, link="relu"), ValueError, "link must be"),
        (lambda la, x: la(x, joint=True), ValueError, "joint"),
        (lambda la, x: la.functional_samples(x, "map"), ValueError, "no samples"),
        (lambda la, x: la.functional_samples(x, "nn", diagonal_output=True), ValueError, "glm"),
        (lambda la, x: la(x, diagonal_output=True), ValueError, "diagonal_output"),
        (lambda la, x: la(x, foo=1), ValueError, "foo"),
        (lambda la, x: la({**x, "image_residual": torch.randn(2, D)}), ValueError, "rows"),
        (lambda la, x: la({**x, "text": x["text"][:, :2]}), ValueError, r"\(N, 5\)"),
        (lambda la, x: la({**x, "text": torch.zeros(4, D_TXT)}), ValueError, "zero-norm"),
        (lambda la, x: la({**x, "image": x["image"] * NAN}), ValueError, "NaN or inf"),
        (lambda la, x: la({"text": x["text"]}), ValueError, "keys"),
    ],
)
def test_bad_predict_calls(call, error, match):
    la, a_i, a_t = fitted()
    with pytest.raises(error, match=match):
        call(la, {"image": a_i[:3], "text": a_t[:4]})


def test_predict_before_fit():
    kw, a_i, a_t = make_problem(bias=False)
    with pytest.raises(AttributeError, match="not fitted"):
        DualEncoderLaplace(**kw).predictive_moments({"image": a_i[:2], "text": a_t[:2]})


# ----------------------------------------------------------------- files
class Malicious:
    """Unpickling this writes a marker file: proof that a loader ran pickle."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def saved(tmp_path):
    la, _, _ = fitted()
    path = tmp_path / "posterior.safetensors"
    la.save(str(path))
    return la, path


def _broken_file(kind: str, tmp_path, saved_path):
    path = tmp_path / f"{kind}.bin"
    if kind == "truncated":
        data = saved_path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "header_only":
        path.write_bytes(saved_path.read_bytes()[:20])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "random":
        noise = torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0))
        path.write_bytes(noise.to(torch.uint8).numpy().tobytes())
    elif kind == "foreign_safetensors":
        save_file({"weight": torch.randn(3, 3)}, str(path), metadata={"format": "pt"})
    return path


@pytest.mark.parametrize(
    "kind, match",
    [
        ("truncated", "not a readable safetensors file"),
        ("header_only", "not a readable safetensors file"),
        ("empty", "not a readable safetensors file"),
        ("random", "not a readable safetensors file"),
        ("foreign_safetensors", "not a laplace-vlm posterior"),
    ],
)
def test_broken_files_are_refused(saved, tmp_path, kind, match):
    _, path = saved
    with pytest.raises(ValueError, match=match):
        DualEncoderLaplace.load(str(_broken_file(kind, tmp_path, path)))


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_pickles_are_refused_and_never_unpickled(tmp_path, writer):
    marker = tmp_path / "pwned"
    payload = {"H": Malicious(str(marker))}
    path = tmp_path / "posterior.pt"
    if writer == "pickle":
        path.write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, str(path))
    # the payload is live: plain pickle would write the marker
    pickle.loads(pickle.dumps(Malicious(str(tmp_path / "control"))))
    assert (tmp_path / "control").exists()
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        DualEncoderLaplace.load(str(path))
    assert not marker.exists()


def test_a_file_saved_for_another_model_is_refused(tmp_path):
    model = tiny_clip(seed=0)
    la = DualEncoderLaplace(model)
    g = torch.Generator().manual_seed(0)
    d_img = la.heads.image_projection.in_features
    d_txt = la.heads.text_projection.in_features
    # float (N, d) tensors are pre-projection activations, also in model mode
    la.fit([(torch.randn(16, d_img, generator=g), torch.randn(16, d_txt, generator=g))])
    path = tmp_path / "clip.safetensors"
    la.save(str(path))
    assert DualEncoderLaplace.load(str(path), model=model).n_data == 16  # its own model loads
    for other in (tiny_clip(seed=1), tiny_clip(embed_dim=16, seed=0)):
        with pytest.raises(ValueError, match="other projection heads"):
            DualEncoderLaplace.load(str(path), model=other)


def test_save_refuses_to_overwrite(saved, tmp_path):
    la, path = saved
    before = path.read_bytes()
    other, _, _ = fitted(prior_precision=5.0)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        other.save(str(path))
    assert path.read_bytes() == before
    other.save(str(path), overwrite=True)
    torch.testing.assert_close(DualEncoderLaplace.load(str(path)).prior_precision,
                               other.prior_precision)  # fmt: skip
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]  # no temp file left


def _tampered(saved_path, tmp_path, tensors=None, state=None):
    with safe_open(str(saved_path), framework="pt") as f:
        meta, tens = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    tens.update(tensors or {})
    tens = {k: v for k, v in tens.items() if v is not None}
    structure = json.loads(meta["state"])
    structure.update(state or {})
    meta["state"] = json.dumps({k: v for k, v in structure.items() if v is not None})
    path = tmp_path / "tampered.safetensors"
    save_file(tens, str(path), metadata=meta)
    return path


@pytest.mark.parametrize(
    "tensors, state, match",
    [
        ({"H.0.0": torch.full((D, D), NAN)}, None, "NaN or inf"),
        ({"H.0.1": None}, None, "H.0.1"),
        ({"H.0.0": torch.eye(D + 1)}, None, "shape"),
        ({"prior_precision": torch.tensor([-1.0])}, None, "prior_precision"),
        (None, {"H": None}, r"lacks \['H'\]"),
        (None, {"n_data": "many"}, "n_data"),
    ],
    ids=[
        "nan_factor",
        "missing_factor",
        "wrong_shape",
        "negative_prior",
        "no_layout",
        "bad_n_data",
    ],  # fmt: skip
)
def test_tampered_posterior_files_are_refused(saved, tmp_path, tensors, state, match):
    _, path = saved
    bad = _tampered(path, tmp_path, tensors, state)
    raises_value_error(lambda: DualEncoderLaplace.load(str(bad)), match)


@pytest.mark.parametrize("shape", [(0, 3), (4, 0)])
def test_scores_of_no_inputs_or_no_classes_are_refused_by_name(shape):
    from laplace_vlm.evaluation.conformal import SplitConformal
    from laplace_vlm.evaluation.detection import expected_logit_variance, msp

    empty = torch.ones(shape) / max(shape[1], 1)
    for name, call in [("probs", lambda: msp(empty)), ("var", lambda: expected_logit_variance(empty)),
                       ("probs", lambda: SplitConformal("lac").scores(empty))]:  # fmt: skip
        with pytest.raises(ValueError, match=re.escape(f"{name} is empty, got shape {shape}")):
            call()
