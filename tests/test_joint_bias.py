"""A head's bias in one Kronecker factor with its weight (the default; the reference's form).

The joint form is a bias-free head ``[W | b]`` on ``[a, 1]``: checked against a fit of such a
head written out by hand, against the dense per-sample GGN of ``(W, b)``, and against a dense
posterior covariance of the embeddings.
"""

from __future__ import annotations

import pytest
import torch
from brute_force import per_sample_ggn
from test_dual_encoder_laplace import D, loader, make_problem
from torch import nn
from torch.nn import functional as F

from laplace_vlm import DualEncoderLaplace

pytestmark = pytest.mark.usefixtures("float64")


def _ones(a):
    return torch.cat([a, torch.ones(len(a), 1, dtype=a.dtype)], 1)


def _joint_and_by_hand(contrastive="siglip", prior=0.8, temperature=0.5):
    kw, a_i, a_t = make_problem(True, seed=5, contrastive=contrastive, joint_bias=True)
    a_i = a_i + 2.0  # positive-mean activations, as after a GELU: where the forms differ
    la = DualEncoderLaplace(**kw, prior_precision=prior, temperature=temperature, damping=False)
    la.fit(loader(a_i, a_t))
    folded = {}
    for side in ("image", "text"):
        head = kw[f"{side}_projection"]
        lin = nn.Linear(head.in_features + 1, D, bias=False)
        with torch.no_grad():
            lin.weight.copy_(torch.cat([head.weight, head.bias[:, None]], 1))
        folded[f"{side}_projection"] = lin
    by_hand = DualEncoderLaplace(
        None, **folded, logit_scale=kw["logit_scale"], logit_bias=kw.get("logit_bias"),
        contrastive=contrastive, prior_precision=prior, temperature=temperature, damping=False,
    )  # fmt: skip
    by_hand.fit(loader(_ones(a_i), _ones(a_t)))
    return la, by_hand, kw, a_i, a_t


@pytest.mark.parametrize("contrastive", ["clip", "siglip"])
def test_joint_form_is_the_bias_free_head_on_augmented_activations(contrastive):
    la, by_hand, _, a_i, a_t = _joint_and_by_hand(contrastive)
    assert len(la.H_facs.kfacs) == 2 and la.heads.joint == {"image": True, "text": True}
    for F_la, F_hand in zip(la.H_facs.kfacs, by_hand.H_facs.kfacs):
        for x, y in zip(F_la, F_hand):
            torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)
    x = {"image": a_i[:3], "text": a_t[:4]}
    x_hand = {"image": _ones(a_i[:3]), "text": _ones(a_t[:4])}
    for pred_type in ("probcosine", "probcosine_diag", "glm"):
        for got, want in zip(la.predictive_moments(x, pred_type),
                             by_hand.predictive_moments(x_hand, pred_type)):  # fmt: skip
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_joint_factors_against_the_per_sample_ggn_of_weight_and_bias():
    """B is the summed per-sample GGN of the embedding; A = sum [a, 1][a, 1]^T / N."""
    la, _, kw, a_i, a_t = _joint_and_by_hand("siglip")
    heads, n = la.heads, len(a_i)
    B_want, A_want = 0.0, _ones(a_i).T @ _ones(a_i) / n
    for rows in loader(a_i, a_t):
        z = heads.embed_image(_ones(rows[0]))
        t = F.normalize(heads.embed_text(_ones(rows[1])), dim=-1)
        B_want = B_want + per_sample_ggn(z, t, heads.scale, heads.logit_bias, "siglip")
    B, A = la.H_facs.kfacs[0]
    torch.testing.assert_close(B, B_want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(A, A_want, rtol=1e-12, atol=1e-12)


def test_embedding_covariance_against_the_dense_joint_posterior():
    la, _, _, a_i, a_t = _joint_and_by_hand("siglip")
    B, A = la.H_facs.kfacs[0]
    h, delta = 1 / la.temperature, la.prior_precision.flatten()[0]
    P = h * torch.kron(B, A) + delta * torch.eye(B.shape[0] * A.shape[0])
    Sigma = torch.linalg.inv(P)  # over vec([W | b]), row-major
    a = _ones(a_i[:4])
    J = torch.stack([torch.kron(torch.eye(D), ai[None]) for ai in a])  # dz / dvec([W|b])
    want = torch.einsum("npq,qr,nsr->nps", J, Sigma, J)
    got = la.embedding_moments({"image": a_i[:4], "text": a_t[:2]}, full=True)["image"][1]
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_separate_blocks_differ_from_the_joint_form_by_a_measured_amount():
    """laplace's separate bias block drops the weight-bias cross-covariance. On positive-mean
    activations (SigLIP-like) its per-input tr Cov[z] differs from the joint form's; the ratio
    is printed by ``benchmarks/bench_bias_blocks.py``. Here: the forms really differ, and on
    centred activations with a prior-dominated posterior they agree within 5%."""
    kw, a_i, a_t = make_problem(True, seed=5, contrastive="siglip", joint_bias=True)
    for shift, close in ((2.0, False), (0.0, True)):
        acts = a_i + shift
        traces = []
        for joint in (True, False):
            la = DualEncoderLaplace(
                **{**kw, "joint_bias": joint}, prior_precision=50.0, damping=False
            )
            la.fit(loader(acts, a_t))
            traces.append(la.embedding_moments({"image": acts, "text": a_t})["image"][1].sum(-1))
        ratio = traces[1] / traces[0]
        assert ((ratio - 1).abs().max() < 0.05) == close, ratio
