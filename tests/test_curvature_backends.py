"""ASDL / BackPACK / curvlinops curvature backends against a dense per-row brute force.

The reference is written from scratch: ``J_i = d logits_i / d z_i`` with ``torch.func.jacrev``
and ``Lambda_i = d^2 loss_i / d logits_i^2`` with ``torch.func.hessian`` of the per-row
loss, then ``B = sum_i J_i^T Lambda_i J_i`` and ``A = sum_i a_i a_i^T``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import hessian, jacrev

from laplace_vlm.curvature import closed_form, get_curvature_backend

BACKENDS = ["asdl", "backpack", "curvlinops"]
DTYPE = torch.float64
M, d, D, K = 6, 5, 4, 7


def _problem(contrastive: str, bias: bool, residual: bool, seed: int = 0, rows: int = M):
    g = torch.Generator().manual_seed(seed)
    return dict(
        weight=torch.randn(D, d, generator=g, dtype=DTYPE),
        bias=torch.randn(D, generator=g, dtype=DTYPE) if bias else None,
        activations=torch.randn(rows, d, generator=g, dtype=DTYPE),
        residual=torch.randn(rows, D, generator=g, dtype=DTYPE) if residual else None,
        targets=F.normalize(torch.randn(K, D, generator=g, dtype=DTYPE), dim=-1),
        scale=torch.tensor(4.0, dtype=DTYPE),
        logit_bias=torch.tensor(-1.5, dtype=DTYPE) if contrastive == "siglip" else None,
        contrastive=contrastive,
    )


def _brute_force(p: dict, labels: torch.Tensor | None = None):
    a = p["activations"]
    z = a @ p["weight"].T
    if p["bias"] is not None:
        z = z + p["bias"]
    if p["residual"] is not None:
        z = z + p["residual"]
    labels = torch.arange(len(a)) % K if labels is None else labels

    def logits_of(z_i):
        out = p["scale"] * (z_i / z_i.norm()) @ p["targets"].T
        return out if p["logit_bias"] is None else out + p["logit_bias"]

    def loss_of(l_i, y_i):
        if p["contrastive"] == "clip":
            return -torch.log_softmax(l_i, -1)[y_i]
        signs = 2.0 * F.one_hot(y_i, K).to(l_i) - 1.0
        return -F.logsigmoid(signs * l_i).sum()

    B = torch.zeros(D, D, dtype=DTYPE)
    for z_i, y_i in zip(z, labels):
        J = jacrev(logits_of)(z_i)  # (K, D)
        Lam = hessian(loss_of)(logits_of(z_i), y_i)  # (K, K)
        B += J.T @ Lam @ J
    return B, a.T @ a


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("residual", [False, True], ids=["no_res", "res"])
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("contrastive", ["clip", "siglip"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_matches_brute_force_and_closed_form(backend, contrastive, bias, residual):
    p = _problem(contrastive, bias, residual)
    B, A = get_curvature_backend(backend)(**p)
    B_ref, A_ref = _brute_force(p)
    assert B.shape == (D, D) and A.shape == (d, d)
    assert B.dtype == A.dtype == DTYPE
    assert _rel(B, B_ref) < 1e-10
    assert _rel(A, A_ref) < 1e-10
    B_cf, A_cf = closed_form.head_factors(**p)
    assert _rel(B, B_cf) < 1e-10
    assert _rel(A, A_cf) < 1e-10


@pytest.mark.parametrize("contrastive", ["clip", "siglip"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_chunks_labels_and_more_rows_than_classes(backend, contrastive):
    # M > K: default labels wrap around; explicit labels and chunking leave (B, A) unchanged
    p = _problem(contrastive, bias=True, residual=True, seed=1, rows=K + 3)
    fn = get_curvature_backend(backend)
    labels = torch.randint(K, (K + 3,), generator=torch.Generator().manual_seed(2))
    B_ref, A_ref = _brute_force(p, labels)
    for kwargs in ({}, {"labels": labels, "chunk_size": 3}):
        B, A = fn(**p, **kwargs)
        assert _rel(B, B_ref) < 1e-10
        assert _rel(A, A_ref) < 1e-10


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_inputs_give_float32_factors(backend):
    p = {
        k: v.float() if torch.is_tensor(v) else v for k, v in _problem("clip", True, False).items()
    }
    B, A = get_curvature_backend(backend)(**p)
    B_cf, A_cf = closed_form.head_factors(**p)
    assert B.dtype == A.dtype == torch.float32
    assert _rel(B, B_cf) < 1e-4 and _rel(A, A_cf) < 1e-5


def test_registry_returns_backend_functions():
    from laplace_vlm.curvature import asdl, backpack, curvlinops

    assert get_curvature_backend("asdl") is asdl.head_factors
    assert get_curvature_backend("backpack") is backpack.head_factors
    assert get_curvature_backend("curvlinops") is curvlinops.head_factors


def test_asdl_then_backpack_on_the_same_user_module():
    # ASDL's legacy backward hooks break BackPACK on modules they touched; the backends
    # build fresh modules, so the user's Linear stays hook-free and both run in one process
    p = _problem("siglip", bias=True, residual=False)
    user = torch.nn.Linear(d, D).to(DTYPE)
    with torch.no_grad():
        user.weight.copy_(p["weight"])
        user.bias.copy_(p["bias"])
    p.update(weight=user.weight, bias=user.bias)
    results = [get_curvature_backend(name)(**p) for name in ("asdl", "backpack", "asdl")]
    assert not user._forward_hooks and not user._backward_hooks and not user._forward_pre_hooks
    assert user.weight.grad is None
    B_ref, A_ref = _brute_force(p)
    for B, A in results:
        assert _rel(B, B_ref) < 1e-10 and _rel(A, A_ref) < 1e-10
