"""Analytic predictive against dense Jacobians (torch.func) and Monte Carlo over weights."""

from __future__ import annotations

import pytest
import torch
from brute_force import dense_glm_moments, dense_posterior_covariance
from test_dual_encoder_laplace import D_IMG, D_TXT, D, loader, make_problem
from torch.nn import functional as F

from laplace_vlm import DualEncoderLaplace, probcosine

pytestmark = pytest.mark.usefixtures("float64")

TOL = dict(rtol=1e-8, atol=1e-10)


def fitted(bias=False, contrastive="clip", damping=False, temperature=1.0, prior=1.0, seed=0):
    kw, a_i, a_t = make_problem(bias, seed=seed, contrastive=contrastive)
    la = DualEncoderLaplace(**kw, damping=damping, temperature=temperature, prior_precision=prior)
    la.fit(loader(a_i, a_t))
    return la, a_i, a_t


@pytest.mark.parametrize("contrastive", ["clip", "siglip"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("damping", [False, True, "symmetric"])
def test_glm_moments_equal_dense_jacobians(contrastive, bias, damping):
    la, a_i, a_t = fitted(bias, contrastive, damping, temperature=0.5, prior=0.7)
    x = {"image": a_i[:5], "text": a_t[:7]}
    mean_ref, cov_ref = dense_glm_moments(la, x)
    mean, var = la.predictive_moments(x, pred_type="glm")
    torch.testing.assert_close(mean, mean_ref, **TOL)
    torch.testing.assert_close(var, cov_ref.diagonal(dim1=1, dim2=2), **TOL)
    _, cov = la.predictive_moments(x, pred_type="glm", class_covariance=True)
    torch.testing.assert_close(cov, cov_ref, **TOL)
    # laplace's own hook returns the same full covariance
    torch.testing.assert_close(la._glm_predictive_distribution(x)[1], cov_ref, **TOL)


@pytest.mark.parametrize("bias", [False, True])
def test_embedding_covariance_equals_dense(bias):
    la, a_i, a_t = fitted(bias, damping=False, prior=0.9)
    Sigma = dense_posterior_covariance(la)
    n_img = D * D_IMG + (D if bias else 0)
    moments = la.embedding_moments({"image": a_i[:3], "text": a_t[:2]}, full=True)
    for n, a in enumerate(a_i[:3]):
        J = torch.kron(torch.eye(D), a[None])  # dz / dvec(W), row-major W (D, d)
        if bias:
            J = torch.cat([J, torch.eye(D)], dim=1)
        cov = J @ Sigma[:n_img, :n_img] @ J.T
        torch.testing.assert_close(moments["image"][1][n], cov, **TOL)
    var = la.embedding_moments({"image": a_i[:3], "text": a_t[:2]})["image"][1]
    torch.testing.assert_close(var, moments["image"][1].diagonal(dim1=1, dim2=2), **TOL)


def test_damped_embedding_variance_is_the_papers_form():
    la, a_i, a_t = fitted(bias=False, damping=True, temperature=0.2, prior=3.0)
    h, delta = 1 / la.temperature, la.prior_precision[0]
    F0, F1 = la.H_facs.kfacs[0]
    B_post = h**0.5 * F0 + delta**0.5 * torch.eye(D)
    A_post = h**0.5 * F1 + delta**0.5 * torch.eye(D_IMG)
    quad = torch.einsum("nd,de,ne->n", a_i, torch.linalg.inv(A_post), a_i)
    expected = quad[:, None] * torch.linalg.inv(B_post).diagonal()[None]
    var = la.embedding_moments({"image": a_i, "text": a_t})["image"][1]
    torch.testing.assert_close(var, expected, **TOL)


@pytest.mark.parametrize("bias", [False, True])
def test_default_is_the_papers_symmetric_form(bias):
    """The default posterior is the reference's ``(sqrt(n) A + sqrt(l) I) x (sqrt(n) B + sqrt(l) I)``
    on ``A = sum a a^T / sqrt(N)``, ``B = sum H / sqrt(N)``, written out densely here."""
    kw, a_i, a_t = make_problem(bias, seed=0, joint_bias=True)
    la = DualEncoderLaplace(**kw, temperature=0.1, prior_precision=2.0)
    la.fit(loader(a_i, a_t))
    assert la.posterior_form == "symmetric"
    n, lam, N = 1 / la.temperature, 2.0, la.n_data
    B_sum, A_mean = la.H_facs.kfacs[0]  # laplace's scaling: [sum B, sum a a^T / N]
    root = N**0.5
    B_post = n**0.5 * B_sum / root + lam**0.5 * torch.eye(len(B_sum))
    A_post = n**0.5 * A_mean * N / root + lam**0.5 * torch.eye(len(A_mean))
    cov_w = torch.kron(torch.linalg.inv(B_post), torch.linalg.inv(A_post))  # over vec([W | b])
    a = torch.cat([a_i[:3], torch.ones(3, 1, dtype=a_i.dtype)], 1) if bias else a_i[:3]
    J = torch.stack([torch.kron(torch.eye(D), ai[None]) for ai in a])
    want = torch.einsum("npq,qr,nsr->nps", J, cov_w, J)
    got = la.embedding_moments({"image": a_i[:3], "text": a_t[:2]}, full=True)["image"][1]
    torch.testing.assert_close(got, want, **TOL)


def _mc_cosine(la, x, n_samples, seed):
    """Cosine mean and variance from weight samples pushed exactly through the heads."""
    f = la.functional_samples(x, "nn", n_samples, generator=torch.Generator().manual_seed(seed))
    cos = (f - (la.heads.logit_bias or 0.0)) / la.heads.scale
    return cos.mean(0), cos.var(0)


def wide_problem(prior, temperature, D=32, d=16, seed=3):
    """Realistic embedding width: ProbCosine replaces |z| by its RMS, which needs D >> 1."""
    g = torch.Generator().manual_seed(seed)
    W_i, W_t = torch.randn(D, d, generator=g), torch.randn(D, d, generator=g)
    a_i, a_t = torch.randn(64, d, generator=g), torch.randn(64, d, generator=g)
    la = DualEncoderLaplace(image_projection=W_i, text_projection=W_t, logit_scale=0.7,
                            prior_precision=prior, temperature=temperature,
                            damping=False)  # fmt: skip
    la.fit(loader(a_i, a_t, batch_size=16))
    return la, {"image": a_i[:6], "text": a_t[:6]}


def _mc_embeddings(la, x, n_samples=40_000):
    post_i, post_t = la.head_posteriors()
    z = la.heads.embed_image(x["image"]).detach() + post_i.sample_perturbations(
        x["image"], n_samples, torch.Generator().manual_seed(0)
    )
    t = la.heads.embed_text(x["text"]).detach() + post_t.sample_perturbations(
        x["text"], n_samples, torch.Generator().manual_seed(1)
    )
    return z, t


def _rel_err(approx, mc):
    return ((approx - mc).abs() / mc).mean().item()


def test_probcosine_numerator_is_the_exact_variance_of_the_dot_product():
    la, x = wide_problem(prior=4.0, temperature=4.0)
    z, t = _mc_embeddings(la, x)
    post_i, post_t = la.head_posteriors()
    z0, t0 = la.heads.embed_image(x["image"]), la.heads.embed_text(x["text"])
    var_cos = la.predictive_moments(x, pred_type="probcosine")[1] / la.heads.scale.square()
    norm2 = (z0.square().sum(-1) + post_i.variance(x["image"]).sum(-1))[:, None] * (
        t0.square().sum(-1) + post_t.variance(x["text"]).sum(-1)
    )[None]
    mc_var = torch.einsum("snd,scd->snc", z, t).var(0)
    # MC standard error of a variance with 40k samples: sqrt(2/S) = 0.7%
    assert _rel_err(var_cos * norm2, mc_var) < 0.02


@pytest.mark.parametrize("prior, temperature, tol", [(4.0, 4.0, 0.05), (40.0, 1.0, 0.05)])
def test_probcosine_full_matches_monte_carlo_cosine(prior, temperature, tol):
    la, x = wide_problem(prior, temperature)
    z, t = _mc_embeddings(la, x)
    cos = torch.einsum("snd,scd->snc", F.normalize(z, dim=-1), F.normalize(t, dim=-1))
    mean, var = la.predictive_moments(x, pred_type="probcosine")
    s = la.heads.scale
    assert _rel_err(var / s**2, cos.var(0)) < tol
    assert (mean / s - cos.mean(0)).abs().max() < 0.02


def test_full_probcosine_beats_diagonal_on_an_anisotropic_posterior():
    # data-dominated posterior (weak prior, small temperature): strongly correlated covariances
    la, x = wide_problem(prior=1e-2, temperature=1e-2)
    z, t = _mc_embeddings(la, x)
    mc_var = torch.einsum("snd,scd->snc", F.normalize(z, dim=-1), F.normalize(t, dim=-1)).var(0)
    s2 = la.heads.scale.square()
    err_full = _rel_err(la.predictive_moments(x, pred_type="probcosine")[1] / s2, mc_var)
    err_diag = _rel_err(la.predictive_moments(x, pred_type="probcosine_diag")[1] / s2, mc_var)
    # measured (fixed seeds, deterministic): full 0.145, diagonal 0.511; the README quotes these
    assert err_full < 0.16 and err_diag > 0.45, (err_full, err_diag)


def test_glm_variance_approaches_monte_carlo_as_the_posterior_concentrates():
    errors = []
    for temperature in (1.0, 1e-2, 1e-4):
        la, a_i, a_t = fitted(bias=False, temperature=temperature, prior=1.0)
        x = {"image": a_i[:4], "text": a_t[:5]}
        _, mc_var = _mc_cosine(la, x, 20_000, seed=1)
        glm_var = la.predictive_moments(x, pred_type="glm")[1] / la.heads.scale.square()
        errors.append(((glm_var - mc_var).abs() / mc_var).mean().item())
    assert errors[-1] < 0.05 and errors[-1] < errors[0], errors


def test_joint_glm_samples_have_the_glm_covariance_with_more_classes_than_dims():
    la, a_i, a_t = fitted(bias=True, prior=2.0)
    x = {"image": a_i[:3], "text": a_t[:10]}  # C = 10 > D = 4: rank-deficient logit covariance
    f = la.functional_samples(x, "glm", 40_000, generator=torch.Generator().manual_seed(2))
    mean, cov = la.predictive_moments(x, pred_type="glm", class_covariance=True)
    emp = torch.einsum("snk,snl->nkl", f - mean, f - mean) / len(f)
    scale = cov.diagonal(dim1=1, dim2=2).max()
    assert (emp - cov).abs().max() < 0.03 * scale
    # the chunked MC link averages the same joint draws as the samples (one weight draw)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    probs = la(x, "glm", link_approx="mc", n_samples=2000, generator=g())
    samples = la.functional_samples(x, "glm", 2000, generator=g())
    torch.testing.assert_close(probs, torch.softmax(samples, -1).mean(0), rtol=1e-10, atol=1e-12)


def test_probcosine_function_matches_independent_monte_carlo():
    # the research notes' check: D = 64, sigma in [0.05, 0.4]
    g = torch.Generator().manual_seed(5)
    mu_a, mu_b = torch.randn(3, 64, generator=g), torch.randn(4, 64, generator=g)
    v_a = (0.05 + 0.35 * torch.rand(3, 64, generator=g)).square()
    v_b = (0.05 + 0.35 * torch.rand(4, 64, generator=g)).square()
    a = mu_a + v_a.sqrt() * torch.randn(40_000, 3, 64, generator=g)
    b = mu_b + v_b.sqrt() * torch.randn(40_000, 4, 64, generator=g)
    cos = torch.einsum("snd,scd->snc", F.normalize(a, dim=-1), F.normalize(b, dim=-1))
    mean, var = probcosine(mu_a, v_a, mu_b, v_b)
    assert (mean - cos.mean(0)).abs().max() < 0.005
    assert _rel_err(var, cos.var(0)) < 0.05


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"mean_a": torch.randn(3)}, r"mean_a must have shape \(N, d\)"),
        ({"var_b": torch.full((4, 8), float("nan"))}, "var_b contains NaN"),
        ({"var_a": -torch.ones(3, 8)}, "non-negative"),
        ({"mean_b": torch.randn(4, 7), "var_b": torch.ones(4, 7)}, "dims differ"),
        ({"mean_a": torch.zeros(3, 8), "var_a": torch.zeros(3, 8)}, "zero-norm"),
    ],
)
def test_probcosine_function_rejects_bad_input(bad, match):
    args = dict(mean_a=torch.randn(3, 8), var_a=torch.ones(3, 8),
                mean_b=torch.randn(4, 8), var_b=torch.ones(4, 8))  # fmt: skip
    with pytest.raises(ValueError, match=match):
        probcosine(**{**args, **bad})


def test_probcosine_diag_is_the_reference_formula():
    la, a_i, a_t = fitted(bias=False, prior=2.0)
    x = {"image": a_i[:4], "text": a_t[:3]}
    m = la.embedding_moments(x)
    (mz, vz), (mt, vt) = m["image"], m["text"]
    Ez, Et = mz.square().sum(1) + vz.sum(1), mt.square().sum(1) + vt.sum(1)
    norm = Ez[:, None] * Et[None]
    var_ref = ((mz**2 + vz) @ vt.T + vz @ (mt**2).T) / norm
    mean, var = la.predictive_moments(x, pred_type="probcosine_diag")
    s = la.heads.scale
    torch.testing.assert_close(mean, s * (mz @ mt.T) / norm.sqrt(), **TOL)
    torch.testing.assert_close(var, s**2 * var_ref, **TOL)


def _laplace_bridge(mean, cov):
    """Hobbhahn et al.'s Laplace bridge with laplace's zero-mean correction, written anew."""
    total = cov.sum((1, 2))[:, None]
    mean = mean - cov.sum(-1) * mean.sum(-1, keepdim=True) / total
    cov = cov - cov.sum(-1)[:, :, None] * cov.sum(-2)[:, None, :] / total[..., None]
    K = mean.shape[-1]
    alpha = 1 - 2 / K + mean.exp() / K**2 * (-mean).exp().sum(1, keepdim=True)
    alpha = alpha / torch.diagonal(cov, dim1=1, dim2=2)
    return alpha / alpha.sum(1, keepdim=True)


def test_links():
    la, a_i, a_t = fitted(bias=True, contrastive="siglip", prior=2.0)
    x = {"image": a_i[:4], "text": a_t[:5]}
    for pred_type in ("glm", "probcosine"):
        mean, var = la.predictive_moments(x, pred_type=pred_type)
        kappa = 1 / torch.sqrt(1 + torch.pi / 8 * var)
        probs = la(x, pred_type, link="sigmoid")
        torch.testing.assert_close(probs, torch.sigmoid(kappa * mean))
        torch.testing.assert_close(la(x, pred_type), torch.softmax(kappa * mean, -1))
    torch.testing.assert_close(la(x), la(x, "probcosine"))  # the default
    mean, cov = la.predictive_moments(x, pred_type="glm", class_covariance=True)
    torch.testing.assert_close(la(x, "glm", link_approx="bridge"), _laplace_bridge(mean, cov))
    mean, var = la.predictive_moments(x, pred_type="probcosine")
    bridge = _laplace_bridge(mean, torch.diag_embed(var))
    torch.testing.assert_close(la(x, link_approx="bridge"), bridge)
    map_probs = torch.softmax(la.heads(x), -1)
    torch.testing.assert_close(la(x, pred_type="map"), map_probs)
    la.set_classes(a_t[:5])
    torch.testing.assert_close(la(a_i[:4], pred_type="probcosine"), la(x, pred_type="probcosine"))
    with pytest.raises(ValueError, match="link_approx='mc'"):
        la(x, pred_type="nn")
    with pytest.raises(ValueError, match="pred_type"):
        la(x, pred_type="laplace")


@pytest.mark.parametrize("prior, temperature", [(0.05, 1.0), (5.0, 0.01)], ids=["wide", "narrow"])
def test_default_prediction_is_closer_to_exact_monte_carlo_than_glm(prior, temperature):
    """The default ``la(x)`` is probit(ProbCosine), and nearer exact MC than the linearisation.

    Exact MC: joint weight samples through the normalisation (``pred_type='nn'``), 20,000
    draws; its error is measured between two seeds.
    """
    la, a_i, a_t = fitted(prior=prior, temperature=temperature)
    x = {"image": a_i[:12], "text": a_t[:6]}
    exact = [la(x, "nn", link_approx="mc", n_samples=20_000,
                generator=torch.Generator().manual_seed(seed)) for seed in (0, 1)]  # fmt: skip
    mc_error = (exact[0] - exact[1]).abs().sum(-1).mean()
    default = la(x)
    torch.testing.assert_close(default, la(x, "probcosine", link_approx="probit"))
    l1 = {p: (la(x, p) - exact[0]).abs().sum(-1).mean() for p in ("probcosine", "glm", "map")}
    assert l1["glm"] <= l1["map"] + 1e-12, l1
    if prior < 1:  # wide: the linearisation misses the spread, by far more than MC error
        assert mc_error < 0.5 * (l1["glm"] - l1["probcosine"]), (mc_error, l1)
    else:  # narrow: both are within the probit link's own error; the default is no worse
        assert l1["probcosine"] <= l1["glm"] + mc_error, (mc_error, l1)


def test_chunked_prediction_equals_one_pass():
    la, a_i, a_t = fitted(bias=True, prior=2.0)
    x = {"image": a_i, "text": a_t[:6]}
    for method in ("glm", "probcosine", "probcosine_diag"):
        full = la.predictive_moments(x, pred_type=method)
        chunked = la.predictive_moments(x, pred_type=method, chunk_size=5)
        for a, b in zip(full, chunked):
            torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize(
    "x, match",
    [
        ({"image": torch.randn(2, D_IMG)}, "no classes"),
        ({"image": torch.randn(2, D_IMG + 1), "text": torch.randn(3, D_TXT)}, r"\(N, 6\)"),
        ({"image": torch.randn(2, D_IMG), "text": torch.full((3, D_TXT), float("inf"))}, "NaN"),
        ({"image": torch.zeros(2, D_IMG), "text": torch.randn(3, D_TXT)}, "zero-norm"),
        ({"image": torch.randn(2, 3, 8, 8), "text": torch.randn(3, D_TXT)}, "feature mode"),
        ({"image": torch.randn(2, D_IMG), "txt": torch.randn(3, D_TXT)}, "keys"),
    ],
)
def test_bad_predict_input(x, match):
    la, _, _ = fitted()
    with pytest.raises(ValueError, match=match):
        la.predictive_moments(x)


@pytest.mark.parametrize("bias", [False, True])
def test_nn_samples_are_each_weight_sample_through_the_heads(bias):
    # the sampler pushes blocks of weight samples through batched GEMMs; here each sample is
    # a pair of perturbed projection matrices applied one at a time, in float64 by hand
    la, a_i, a_t = fitted(bias=bias, prior=2.0)
    x = {"image": a_i[:7], "text": a_t[:5]}
    n_samples = 70  # not a multiple of the sampler's block of 32
    got = la.functional_samples(x, "nn", n_samples, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)  # the sampler's draws, in its order
    (d_i, _, d_t, _), (post_i, post_t) = la._predict_inputs(x)
    dt = post_t.sample_perturbations(d_t, n_samples, g)
    dW, db = post_i.sample_weights(n_samples, g)
    z0, t0 = la.heads.embed_image(d_i).double(), la.heads.embed_text(d_t).double()
    for s in (0, 31, 32, 69):
        z = z0 + d_i.double() @ dW[s].double().T + (0 if db is None else db[s].double())
        cos = F.normalize(z, dim=-1) @ F.normalize(t0 + dt[s].double(), dim=-1).T
        want = la.heads.scale.double() * cos + (la.heads.logit_bias or 0.0)
        torch.testing.assert_close(got[s].double(), want, rtol=1e-5, atol=1e-5)
