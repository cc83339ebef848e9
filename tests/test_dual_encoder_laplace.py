"""DualEncoderLaplace: factory dispatch, fitted factors against dense per-sample GGNs, posterior."""

from __future__ import annotations

import laplace
import pytest
import torch
from brute_force import dense_glm_moments, per_sample_ggn
from laplace import KronLaplace, KronLLLaplace
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from laplace_vlm import DualEncoderLaplace

D_IMG, D_TXT, D = 6, 5, 4
TOL = dict(rtol=1e-10, atol=1e-12)


pytestmark = pytest.mark.usefixtures("float64")


def make_problem(
    bias: bool, seed: int = 0, n: int = 24, contrastive: str = "clip", joint_bias: bool = False
):
    """Random heads and activations. With ``bias``, laplace's separate bias blocks by default:
    the dense brute force here treats weight and bias as laplace's two tensors; the joint
    (default) form is a bias-free head on ``[a, 1]``, tested in ``test_joint_bias.py``."""
    g = torch.Generator().manual_seed(seed)
    img, txt = nn.Linear(D_IMG, D, bias=bias), nn.Linear(D_TXT, D, bias=bias)
    with torch.no_grad():
        for p in [*img.parameters(), *txt.parameters()]:
            p.copy_(torch.randn(p.shape, generator=g))
    a_i, a_t = torch.randn(n, D_IMG, generator=g), torch.randn(n, D_TXT, generator=g)
    kw = dict(image_projection=img, text_projection=txt, logit_scale=0.7, contrastive=contrastive)
    if bias:
        kw["joint_bias"] = joint_bias
    if contrastive == "siglip":
        kw["logit_bias"] = -0.5
    return kw, a_i, a_t


def loader(a_i, a_t, batch_size=8):
    return DataLoader(TensorDataset(a_i, a_t), batch_size=batch_size)


def test_factory_dispatch_and_no_takeover():
    kw, _, _ = make_problem(bias=False)
    la = laplace.Laplace(None, "classification", "dual_encoder", "kron", **kw)
    assert type(la) is DualEncoderLaplace
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    assert type(laplace.Laplace(net, "classification", "last_layer", "kron")) is KronLLLaplace
    assert type(laplace.Laplace(net, "classification", "all", "kron")) is KronLaplace


@pytest.mark.parametrize("contrastive", ["clip", "siglip"])
@pytest.mark.parametrize("bias", [False, True])
def test_factors_equal_dense_per_sample_ggn(contrastive, bias):
    kw, a_i, a_t = make_problem(bias, contrastive=contrastive)
    la = DualEncoderLaplace(**kw)
    la.fit(loader(a_i, a_t))
    B_img = B_txt = 0.0
    s, b = la.heads.scale, la.heads.logit_bias
    for i in range(0, len(a_i), 8):
        z, t = la.heads.embed_image(a_i[i : i + 8]), la.heads.embed_text(a_t[i : i + 8])
        u, v = F.normalize(z, dim=-1).detach(), F.normalize(t, dim=-1).detach()
        B_img = B_img + per_sample_ggn(z.detach(), v, s, b, contrastive)
        B_txt = B_txt + per_sample_ggn(t.detach(), u, s, b, contrastive)
    N = len(a_i)
    expected = [[B_img, a_i.T @ a_i / N]] + ([[B_img]] if bias else [])
    expected += [[B_txt, a_t.T @ a_t / N]] + ([[B_txt]] if bias else [])
    assert len(la.H_facs.kfacs) == len(expected)
    for got, want in zip(la.H_facs.kfacs, expected):
        for g_, w_ in zip(got, want):
            torch.testing.assert_close(g_, w_, **TOL)
    assert la.n_data == N


@pytest.mark.parametrize("curvature", ["asdl", "backpack", "curvlinops"])
def test_backends_give_the_closed_form_factors(curvature):
    kw, a_i, a_t = make_problem(bias=True, contrastive="siglip")
    ref = DualEncoderLaplace(**kw)
    ref.fit(loader(a_i, a_t))
    la = DualEncoderLaplace(**kw, curvature=curvature)
    la.fit(loader(a_i, a_t))
    for got, want in zip(la.H_facs.kfacs, ref.H_facs.kfacs):
        for g_, w_ in zip(got, want):
            torch.testing.assert_close(g_, w_, **TOL)


def test_laplace_backend_class_maps_to_the_same_library():
    from laplace.curvature import AsdlGGN

    kw, _, _ = make_problem(bias=False)
    assert DualEncoderLaplace(**kw, backend=AsdlGGN).curvature == "asdl"
    with pytest.raises(ValueError, match="backend"):
        DualEncoderLaplace(**kw, backend=nn.Linear)


def test_override_false_equals_fit_on_union_and_chunks_change_nothing():
    kw, a_i, a_t = make_problem(bias=True)
    full = DualEncoderLaplace(**kw)
    full.fit(loader(a_i, a_t))
    online = DualEncoderLaplace(**kw, chunk_size=3)
    online.fit(loader(a_i[:16], a_t[:16]))
    online.fit(loader(a_i[16:], a_t[16:]), override=False)
    assert online.n_data == full.n_data
    for got, want in zip(online.H_facs.kfacs, full.H_facs.kfacs):
        for g_, w_ in zip(got, want):
            torch.testing.assert_close(g_, w_, **TOL)
    torch.testing.assert_close(online.loss, full.loss, **TOL)


def _dense_factor_posterior(la, damped):
    h, blocks = 1.0 / la.temperature, []
    for F_, delta in zip(la.H_facs.kfacs, la.prior_precision):
        if len(F_) == 1:
            blocks.append(h * F_[0] + delta * torch.eye(len(F_[0])))
        elif damped:
            eye0, eye1 = torch.eye(len(F_[0])), torch.eye(len(F_[1]))
            blocks.append(
                torch.kron(h**0.5 * F_[0] + delta**0.5 * eye0, h**0.5 * F_[1] + delta**0.5 * eye1)
            )
        else:
            K = torch.kron(F_[0], F_[1])
            blocks.append(h * K + delta * torch.eye(len(K)))
    return torch.block_diag(*blocks)


@pytest.mark.parametrize("damping", [False, True])
def test_posterior_precision_dense_with_and_without_damping(damping):
    kw, a_i, a_t = make_problem(bias=True)
    la = DualEncoderLaplace(**kw, damping=damping, temperature=0.25,
                            prior_precision=torch.tensor([0.5, 2.0, 3.0, 1.5]))  # fmt: skip
    la.fit(loader(a_i, a_t))
    dense = _dense_factor_posterior(la, damped=damping)
    torch.testing.assert_close(la.posterior_precision.to_matrix(), dense, rtol=1e-9, atol=1e-9)
    # upstream KronLaplace would silently drop the flag (research notes 2.8)
    assert la.posterior_precision.damping is damping


def test_per_head_prior_expands_to_each_tensor():
    kw, a_i, a_t = make_problem(bias=True)
    la = DualEncoderLaplace(**kw, prior_precision=torch.tensor([2.0, 5.0]))
    torch.testing.assert_close(la.prior_precision, torch.tensor([2.0, 2.0, 5.0, 5.0]))


@pytest.mark.parametrize("damping", [False, True])
def test_log_marginal_likelihood_equals_dense(damping):
    kw, a_i, a_t = make_problem(bias=False)
    la = DualEncoderLaplace(**kw, damping=damping, temperature=0.5, prior_precision=0.8)
    la.fit(loader(a_i, a_t))
    P = la.posterior_precision.to_matrix()
    delta = la.mean - la.prior_mean
    expected = -la.loss / la.temperature - 0.5 * (
        torch.logdet(P) - la.n_params * torch.log(torch.tensor(0.8)) + 0.8 * delta @ delta
    )
    torch.testing.assert_close(la.log_marginal_likelihood(), expected, rtol=1e-9, atol=1e-9)


def test_marglik_optimisation_improves_the_evidence_per_layer():
    kw, a_i, a_t = make_problem(bias=True)
    la = DualEncoderLaplace(**kw)
    la.fit(loader(a_i, a_t))
    before = la.log_marginal_likelihood().item()
    la.optimize_prior_precision(method="marglik", prior_structure="layerwise", n_steps=200)
    assert la.prior_precision.shape == (4,)
    assert la.log_marginal_likelihood().item() > before
    # at the optimum the gradient of the evidence in log prior precision vanishes
    log_prec = la.prior_precision.log().clone().requires_grad_(True)
    lml = la.log_marginal_likelihood(prior_precision=log_prec.exp())
    (grad,) = torch.autograd.grad(lml, log_prec)
    assert grad.abs().max() < 1e-2 * lml.abs()


def test_samples_have_the_posterior_covariance():
    kw, a_i, a_t = make_problem(bias=False)
    la = DualEncoderLaplace(**kw, prior_precision=2.0)
    la.fit(loader(a_i, a_t))
    samples = la.sample(40_000, generator=torch.Generator().manual_seed(1))
    cov = torch.cov(samples.T)
    dense = torch.linalg.inv(la.posterior_precision.to_matrix())
    # MC standard error of a covariance entry ~ sqrt(2/S) * scale
    assert (cov - dense).abs().max() < 0.03 * dense.diagonal().max()


def test_fit_accepts_dict_batches_and_residuals():
    kw, a_i, a_t = make_problem(bias=True, contrastive="siglip")
    r = torch.randn(len(a_i), D)
    la = DualEncoderLaplace(**kw)
    batches = [{"image": a_i[i : i + 8], "text": a_t[i : i + 8], "image_residual": r[i : i + 8]}
               for i in range(0, 24, 8)]  # fmt: skip
    la.fit(batches)  # a plain list: no len(dataset), N is counted
    z = la.heads.embed_image(a_i[:8], r[:8]).detach()
    v = F.normalize(la.heads.embed_text(a_t[:8]), dim=-1).detach()
    B0 = per_sample_ggn(z, v, la.heads.scale, la.heads.logit_bias, "siglip")
    ref = DualEncoderLaplace(**kw)
    ref.fit(batches[:1])
    torch.testing.assert_close(ref.H_facs.kfacs[0][0], B0, **TOL)
    assert la.n_data == 24


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"image": torch.full((8, D_IMG), float("nan")), "text": torch.randn(8, D_TXT)}, "NaN"),
        ({"image": torch.randn(8, D_IMG + 1), "text": torch.randn(8, D_TXT)}, r"\(N, 6\)"),
        ({"image": torch.randn(8, D_IMG), "text": torch.randn(7, D_TXT)}, "matched pairs"),
        ({"image": torch.zeros(8, D_IMG), "text": torch.randn(8, D_TXT)}, "zero-norm"),
        ({"img": torch.randn(8, D_IMG)}, "'image' and 'text'"),
    ],
)
def test_bad_fit_input_raises_before_symeig(bad, match):
    kw, _, _ = make_problem(bias=False)
    la = DualEncoderLaplace(**kw)
    with pytest.raises(ValueError, match=match):
        la.fit([bad])


def test_construction_errors():
    kw, _, _ = make_problem(bias=False)
    with pytest.raises(ValueError, match="classification"):
        DualEncoderLaplace(None, "regression", **kw)
    with pytest.raises(ValueError, match="contrastive"):
        DualEncoderLaplace(**{**kw, "contrastive": "infonce"})
    with pytest.raises(ValueError, match="logit_scale"):
        DualEncoderLaplace(**{**kw, "logit_scale": None})
    with pytest.raises(ValueError, match="logit_scale"):
        DualEncoderLaplace(**{**kw, "logit_scale": float("inf")})
    with pytest.raises(ValueError, match="same embedding dim"):
        DualEncoderLaplace(**{**kw, "text_projection": torch.randn(D + 1, D_TXT)})
    with pytest.raises(ValueError, match="no pairs"):
        DualEncoderLaplace(**kw).fit([])
    with pytest.raises(AttributeError, match="not fitted"):
        DualEncoderLaplace(**kw).predictive_moments({"image": torch.randn(2, D_IMG),
                                                     "text": torch.randn(3, D_TXT)})  # fmt: skip


def test_half_precision_heads_get_an_fp32_posterior():
    W_i, W_t = torch.randn(D, D_IMG).half(), torch.randn(D, D_TXT).bfloat16()
    la = DualEncoderLaplace(image_projection=W_i, text_projection=W_t, logit_scale=1.0)
    assert la.heads.image_projection.weight.dtype == torch.float32
    a_i, a_t = torch.randn(8, D_IMG).half(), torch.randn(8, D_TXT).half()
    la.fit([(a_i, a_t)])
    assert all(F_.dtype == torch.float32 for block in la.H_facs.kfacs for F_ in block)


def test_laplace_conventions_hold():
    """backend, n_outputs, a fit batch as x, laplace's enum members and every enum exported."""
    import enum

    import laplace_vlm
    from laplace_vlm import enums
    from laplace_vlm.curvature import get_curvature_backend

    kw, a_i, a_t = make_problem(bias=False)
    la = DualEncoderLaplace(**kw)
    la.fit([(a_i[:8], a_t[:8])])
    # backend: what computed the curvature, not laplace's lazily built CurvlinopsGGN
    assert la.backend is get_curvature_backend(la.curvature)
    h = la.heads
    v = F.normalize(h.embed_text(a_t[:8]), dim=-1).detach()
    B, A = la.backend(h.image_projection.weight, None, a_i[:8], None, v, h.scale, None, "clip")
    torch.testing.assert_close(B, la.H_facs.kfacs[0][0], **TOL)
    torch.testing.assert_close(A / 8, la.H_facs.kfacs[0][1], **TOL)
    # n_outputs: the columns of a prediction against the stored classes
    assert la.n_outputs == 0
    la.set_classes(a_t[:5])
    assert la.n_outputs == 5 == la(a_i[:3]).shape[1]
    # a fit batch (image, text) is an x: its texts are the classes
    pair = (a_i[:3], a_t[:4])
    mean, cov = dense_glm_moments(la, {"image": pair[0], "text": pair[1]})
    kappa = 1 / torch.sqrt(1 + torch.pi / 8 * cov.diagonal(dim1=1, dim2=2))
    torch.testing.assert_close(la(pair, pred_type="glm"), torch.softmax(kappa * mean, -1), **TOL)
    # laplace's members are ours: its enum values select the same predictive
    for ours, theirs in ((enums.PredType, laplace.PredType), (enums.LinkApprox, laplace.LinkApprox),
                         (enums.PriorStructure, laplace.utils.enums.PriorStructure),
                         (enums.TuningMethod, laplace.utils.enums.TuningMethod)):  # fmt: skip
        assert {m.value for m in theirs} <= {m.value for m in ours}, ours
    x = {"image": a_i[:3], "text": a_t[:4]}
    torch.testing.assert_close(la(x, laplace.PredType.GLM, link_approx=laplace.LinkApprox.PROBIT),
                               la(x, "glm"))  # fmt: skip
    options = [v for v in vars(enums).values()
               if isinstance(v, type) and issubclass(v, enum.Enum) and v.__module__ == enums.__name__]  # fmt: skip
    assert options and all(e.__name__ in laplace_vlm.__all__ for e in options)


def test_released_factors_refuse_heads_with_a_folded_bias(tmp_path):
    """from_bayesvlm's bias check also sees a bias folded into the weight (the default)."""
    import json

    for name, dim in {"A_img": D_IMG, "B_img": D, "A_txt": D_TXT, "B_txt": D}.items():
        torch.save(torch.eye(dim), tmp_path / f"{name}_analytic.pt")
    (tmp_path / "prior_precision_analytic.json").write_text(
        json.dumps({"lambda_img": 2.0, "lambda_txt": 3.0})
    )
    kw, _, _ = make_problem(bias=True)
    kw.pop("joint_bias")
    with pytest.raises(ValueError, match="for heads without bias"):
        DualEncoderLaplace.from_bayesvlm(tmp_path, **kw)  # joint_bias=True by default
    kw, _, _ = make_problem(bias=False)
    la = DualEncoderLaplace.from_bayesvlm(tmp_path, **kw)
    torch.testing.assert_close(la.prior_precision, torch.tensor([2.0, 3.0]))
