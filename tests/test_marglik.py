"""Prior precision by type-II maximum likelihood against a bracketing search of the evidence."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from brute_force import bracketed_argmax
from laplace import KronLaplace
from torch import nn

from laplace_vlm import DualEncoderLaplace
from laplace_vlm.posterior.marglik import maximize_marglik

D_IMG, D_TXT, D, N = 10, 8, 6, 64
# head weights scaled by c: the embeddings are normalised, so the GGN scales like 1 / c^2 and the
# scatter like c^2, and the evidence optimum moves like 1 / c^2 (near 1 for c = 1)
OPTIMA = {"1e-2": 10.0, "1e0": 1.0, "1e3": 0.03, "1e5": 0.003}


pytestmark = pytest.mark.usefixtures("float64")


def fitted(
    c: float,
    damping: bool = False,
    bias: bool = False,
    contrastive: str = "clip",
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    cls: type = DualEncoderLaplace,
) -> DualEncoderLaplace:
    """A posterior on random activations with heads of scale ``c`` (and biases of scale ``c``)."""
    g = torch.Generator().manual_seed(seed)
    img, txt = nn.Linear(D_IMG, D, bias=bias), nn.Linear(D_TXT, D, bias=bias)
    with torch.no_grad():
        for p in [*img.parameters(), *txt.parameters()]:
            p.copy_(c * torch.randn(p.shape, generator=g))
    # laplace's separate bias blocks: 4 prior tensors for 'layerwise'
    kw = dict(logit_scale=2.0, contrastive=contrastive, damping=damping, joint_bias=False)
    if contrastive == "siglip":
        kw["logit_bias"] = -1.0
    la = cls(None, image_projection=img.to(dtype), text_projection=txt.to(dtype), **kw)
    a_i = torch.randn(N, D_IMG, generator=g).to(dtype)
    a_t = torch.randn(N, D_TXT, generator=g).to(dtype)
    la.fit([(a_i[i : i + 16], a_t[i : i + 16]) for i in range(0, N, 16)])
    return la


def evidence(la: DualEncoderLaplace, prior: torch.Tensor) -> float:
    with torch.no_grad():
        return la.log_marginal_likelihood(prior_precision=prior.clone()).item()


def bracketed_optimum(la: DualEncoderLaplace, k: int) -> torch.Tensor:
    """The evidence's maximiser over ``k`` log precisions by :func:`brute_force.bracketed_argmax`.

    Two sweeps; the second must not move (so coupling between coordinates, if any, would show),
    and every optimum must lie inside the reference grid.
    """
    t, moved, inside = bracketed_argmax(lambda s: evidence(la, s.exp()), k, sweeps=2,
                                        dtype=torch.get_default_dtype())  # fmt: skip
    assert inside, "the optimum is outside the reference grid"
    assert moved <= 1e-6, f"the second sweep moved a coordinate by {moved}"
    return t.exp()


def laplace_adam(la: DualEncoderLaplace, prior_structure: str) -> torch.Tensor:
    """laplace 0.3's own marglik tuning (100 Adam steps, lr 0.1, from 1): the old default."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        KronLaplace.optimize_prior_precision(la, method="marglik", prior_structure=prior_structure)
    return la.prior_precision.clone()


def rel_err(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float(((value - reference).abs() / reference).max())


@pytest.mark.parametrize("damping", [False, True], ids=["exact", "damped"])
@pytest.mark.parametrize("where", list(OPTIMA))
def test_reaches_the_bracketed_optimum_scalar_and_layerwise(where, damping):
    la = fitted(OPTIMA[where], damping)
    for structure, k in (("scalar", 1), ("layerwise", 2)):
        reference = bracketed_optimum(la, k)
        # the optimum is where intended, within half a decade
        assert (reference.log10() - math.log10(float(where))).abs().max() < 0.5
        prior = maximize_marglik(la, structure)
        assert rel_err(prior, reference) < 1e-4
        torch.testing.assert_close(la.prior_precision, prior)


@pytest.mark.parametrize("damping", [False, True], ids=["exact", "damped"])
@pytest.mark.parametrize("where", ["1e-2", "1e5"])
def test_siglip_heads_with_bias_per_head_and_per_tensor(where, damping):
    la = fitted(OPTIMA[where], damping, bias=True, contrastive="siglip")
    assert la.n_layers == 4
    reference = bracketed_optimum(la, 2)  # per head: the setter expands a 2-tensor
    prior = maximize_marglik(la, "head")
    assert prior.shape == (2,) and rel_err(prior, reference) < 1e-4
    assert la.prior_precision.tolist() == [prior[0], prior[0], prior[1], prior[1]]
    reference = bracketed_optimum(la, 4)
    # laplace's own name, through the method that replaces laplace's Adam loop
    la.optimize_prior_precision(method="marglik", prior_structure="layerwise")
    assert la.prior_precision.shape == (4,) and rel_err(la.prior_precision, reference) < 1e-4


@pytest.mark.parametrize("where", ["1e-2", "1e3", "1e5"])
def test_laplace_default_adam_stops_short(where):
    """What was fixed: 100 Adam steps from 1 miss optima far from 1 (and the method doesn't)."""
    la = fitted(OPTIMA[where])
    reference = bracketed_optimum(la, 2)
    assert rel_err(laplace_adam(la, "layerwise"), reference) > 0.05
    la.optimize_prior_precision(prior_structure="layerwise")
    assert rel_err(la.prior_precision, reference) < 1e-4


def test_float32_and_far_starting_points():
    la64 = fitted(OPTIMA["1e5"])
    reference = bracketed_optimum(la64, 2)
    la32 = fitted(OPTIMA["1e5"], dtype=torch.float32)
    assert la32.prior_precision.dtype == torch.float32
    assert rel_err(maximize_marglik(la32, "layerwise").double(), reference) < 1e-3
    for init in (1e-6, 1e10):  # starts ten orders of magnitude away
        assert rel_err(maximize_marglik(la64, "layerwise", init_prior_prec=init), reference) < 1e-4
    # a per-layer init keeps its structure (laplace's meaning), whatever prior_structure says
    prior = maximize_marglik(la64, "scalar", init_prior_prec=torch.tensor([1.0, 1e3]))
    assert rel_err(prior, reference) < 1e-4


def test_method_maps_laplace_arguments(capsys):
    la = fitted(1.0, bias=True, contrastive="siglip")
    la.optimize_prior_precision(method="marglik", prior_structure="layerwise", n_steps=50,
                                verbose=True, link_approx="probit")  # fmt: skip
    assert "Optimized prior precision" in capsys.readouterr().out
    expected = la.prior_precision.clone()
    la.optimize_prior_precision(method="marglik", init_prior_prec=torch.tensor([2.0, 3.0]))
    assert la.prior_precision.shape == (4,)  # per head from a 2-tensor init, expanded
    la.optimize_prior_precision(prior_structure="head")
    torch.testing.assert_close(la.prior_precision, maximize_marglik(la, "head")[[0, 0, 1, 1]])
    maximize_marglik(la, "layerwise")
    torch.testing.assert_close(la.prior_precision, expected)
    # n_steps is laplace's budget: honoured, the last iterate kept, with a warning
    start = torch.ones(4)
    with pytest.warns(UserWarning, match="budget of max_iter=4"):
        la.optimize_prior_precision(prior_structure="layerwise", n_steps=4)
    budgeted = la.prior_precision.clone()
    assert rel_err(budgeted, expected) > 1e-3  # stopped short of the optimum ...
    assert evidence(la, budgeted) > evidence(la, start)  # ... at its best point, above the start
    with pytest.warns(UserWarning, match="lr=0.1 is the step size of laplace's Adam"):
        la.optimize_prior_precision(lr=0.1)
    with pytest.raises(ValueError, match="'diag'"):
        la.optimize_prior_precision(prior_structure="diag")
    with pytest.raises(ValueError, match="prior_structure must be one of"):
        maximize_marglik(la, "per_head")
    with pytest.raises(ValueError, match="init_prior_prec must have 1, 2"):
        maximize_marglik(la, init_prior_prec=torch.ones(3))
    with pytest.raises(ValueError, match="init_prior_prec must hold positive"):
        maximize_marglik(la, init_prior_prec=-1.0)
    with pytest.warns(UserWarning, match="val_loader"):
        la.optimize_prior_precision(val_loader=[(None, None)])
    with pytest.warns(UserWarning, match="grid_size"):
        la.optimize_prior_precision(grid_size=7)


def test_unbounded_evidence_raises_naming_the_arguments():
    la = fitted(1.0, bias=True, contrastive="siglip")
    # zero biases (a common initialisation): no scatter, so the evidence grows without bound
    # in their precision
    sizes = [p.numel() for p in la.params]
    start = [sum(sizes[:i]) for i in range(4)]
    la.mean = la.mean.clone()
    for i in (1, 3):
        la.mean[start[i] : start[i] + sizes[i]] = 0
    with pytest.raises(
        ValueError,
        match=r"no maximum in the prior precision\(s\) \[1, 3\] \(prior_structure='layerwise'",
    ):
        maximize_marglik(la, "layerwise")
    prior = maximize_marglik(la, "head")  # tied to the weights, the optimum exists
    assert torch.isfinite(prior).all()


def _hand_gridsearch(la, grid, batches, **kwargs) -> float:
    """The grid value of least mean NLL of ``la(x, **kwargs)``, scored by a plain loop."""
    nll = {}
    for prior in grid.tolist():
        la.prior_precision = prior
        total, count = 0.0, 0
        for x, y in batches:
            probs = la(x, **kwargs)
            total -= probs[torch.arange(len(y)), y].log().sum().item()
            count += len(y)
        nll[prior] = total / count
    assert max(nll.values()) - min(nll.values()) > 1e-3, nll  # the grid does decide
    return min(nll, key=nll.get)


@pytest.mark.parametrize("kwargs", [{}, {"pred_type": "glm", "link_approx": "bridge_norm"}],
                         ids=["default_predictive", "glm_bridge"])  # fmt: skip
def test_gridsearch_with_dict_batches_equals_a_hand_loop(kwargs):
    la = fitted(1.0)
    g = torch.Generator().manual_seed(5)
    classes = torch.randn(6, D_TXT, generator=g)
    images = [torch.randn(7, D_IMG, generator=g) for _ in range(3)]
    labels = [torch.randint(0, 6, (7,), generator=g) for _ in range(3)]
    batches = [({"image": a, "text": classes}, y) for a, y in zip(images, labels)]
    grid = torch.logspace(-2, 3, 6)
    best = _hand_gridsearch(la, grid, batches, **kwargs)
    args = dict(method="gridsearch", grid_size=6, log_prior_prec_min=-2, log_prior_prec_max=3)
    # (x, y) pairs with dict x, and laplace's dict batches with the labels under dict_key_y
    la.optimize_prior_precision(val_loader=batches, **args, **kwargs)
    assert la.prior_precision.item() == pytest.approx(best)
    dicts = [{"image": a, "text": classes, "labels": y} for a, y in zip(images, labels)]
    la.prior_precision = 1.0
    la.optimize_prior_precision(val_loader=dicts, **args, **kwargs)
    assert la.prior_precision.item() == pytest.approx(best)


def _autograd_evidence(la, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """laplace's evidence differentiated by autograd: the gradient and Hessian diagonal in t."""
    t = t.clone().requires_grad_(True)
    lml = la.log_marginal_likelihood(prior_precision=t.exp())
    (grad,) = torch.autograd.grad(lml, t, create_graph=True)
    hess = torch.stack([torch.autograd.grad(g, t, retain_graph=True)[0] for g in grad])
    return grad.detach(), hess.detach(), lml.item()


def _laplace_kron_mlp() -> KronLaplace:
    """laplace's own KronLaplace on a small classifier (the closed form is not ours alone)."""
    g = torch.Generator().manual_seed(3)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    x, y = torch.randn(40, 5, generator=g), torch.randint(0, 3, (40,), generator=g)
    la = KronLaplace(model, "classification")
    la.fit(torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=20))
    return la


@pytest.mark.parametrize(
    "form, bias",
    [(f, b) for f in (False, True, "symmetric") for b in (False, True)] + [("laplace_mlp", True)],
)
def test_closed_form_evidence_equals_autograd_of_laplaces(form, bias):
    """kron_evidence: value, gradient and Hessian of laplace's evidence in log lambda (autograd).

    The Hessian is diagonal (each value scales its own layers): the autograd off-diagonal must
    vanish, and its diagonal equal the closed form, at 1e-9 relative in float64.
    """
    from laplace_vlm.posterior.kron_evidence import kron_evidence, kron_evidence_parts

    if form == "laplace_mlp":  # its Linear layers have biases: 4 prior tensors
        la, ks = _laplace_kron_mlp(), (1, 4)
    else:
        la = fitted(1.0, form, bias=bias, contrastive="siglip" if bias else "clip")
        ks = (1, 2, la.n_layers)
    g = torch.Generator().manual_seed(1)
    for k in ks:
        parts = kron_evidence_parts(la, k)
        assert parts is not None
        for _ in range(3):
            t = 3.0 * torch.randn(k, generator=g, dtype=torch.float64)
            grad, curv, value = kron_evidence(parts, t)
            ref_grad, ref_hess, ref_value = _autograd_evidence(la, t)
            assert value == pytest.approx(ref_value, rel=1e-10, abs=1e-8)
            torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-9)
            torch.testing.assert_close(curv, ref_hess.diagonal(), rtol=1e-9, atol=1e-9)
            off = ref_hess - torch.diag(ref_hess.diagonal())
            assert float(off.abs().max()) <= 1e-9 * float(ref_hess.abs().max())


def test_overridden_evidence_falls_back_to_autograd():
    """A subclass with its own evidence is differentiated, not replaced by the closed form."""
    from laplace_vlm.posterior.kron_evidence import kron_evidence_parts

    class Shifted(DualEncoderLaplace):
        def log_marginal_likelihood(self, prior_precision=None, sigma_noise=None):
            lml = super().log_marginal_likelihood(prior_precision, sigma_noise)
            return lml - 5.0 * self.prior_precision.log().sum()  # moves the optimum down

    la, shifted = fitted(1.0), fitted(1.0, cls=Shifted)
    assert kron_evidence_parts(la, 1) is not None and kron_evidence_parts(shifted, 1) is None
    plain, moved = maximize_marglik(la, "scalar"), maximize_marglik(shifted, "scalar")
    reference = bracketed_optimum(shifted, 1)
    assert rel_err(moved, reference) < 1e-4 and float(moved) < float(plain)


@pytest.mark.parametrize("form", [False, True, "symmetric"], ids=["exact", "damped", "symmetric"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_optima_at_temperatures_equal_one_optimisation_each(form, dtype):
    """The batched grid takes each temperature's own steps: the single optimum, to rounding.

    Batched, an element's log or exp may fall in a vectorised lane instead of a scalar tail
    (or back), which can move the gradient by an ulp: 1e-12 relative in float64; a float32
    posterior's prior, rounded to float32, is bitwise the same.
    """
    from laplace_vlm.posterior.marglik import maximize_marglik_at_temperatures

    temperatures = (1e-4, 0.01, 1.0, 30.0, 1e3)
    for structure in ("scalar", "head", "layerwise"):
        la = fitted(1.0, form, bias=True, contrastive="siglip", dtype=dtype)
        batched = maximize_marglik_at_temperatures(la, temperatures, structure)
        assert la.temperature == temperatures[-1]
        held = la.prior_precision.clone()
        for temperature, prior in zip(temperatures, batched):
            la.temperature = temperature
            alone = maximize_marglik(la, structure)
            assert prior.dtype == dtype, (structure, temperature)
            tol = dict(rtol=0, atol=0) if dtype == torch.float32 else dict(rtol=1e-12, atol=0)
            torch.testing.assert_close(prior, alone, **tol, msg=f"{structure} {temperature}")
        torch.testing.assert_close(held, la.prior_precision, **tol)  # left at the last optimum
        # every temperature has its own optimum: rows mixed up would fail
        assert len({tuple(p.tolist()) for p in batched}) == len(temperatures)


def test_optima_at_temperatures_fall_back_and_raise_naming_the_temperature():
    from laplace_vlm.posterior.marglik import maximize_marglik_at_temperatures

    class Shifted(DualEncoderLaplace):
        def log_marginal_likelihood(self, prior_precision=None, sigma_noise=None):
            lml = super().log_marginal_likelihood(prior_precision, sigma_noise)
            return lml - 5.0 * self.prior_precision.log().sum()

    shifted = fitted(1.0, cls=Shifted)
    batched = maximize_marglik_at_temperatures(shifted, (0.1, 10.0))
    for temperature, prior in zip((0.1, 10.0), batched):
        shifted.temperature = temperature
        assert torch.equal(prior, maximize_marglik(shifted))

    la = fitted(1.0, bias=True, contrastive="siglip")
    sizes = [p.numel() for p in la.params]
    la.mean = la.mean.clone()
    la.mean[sizes[0] : sizes[0] + sizes[1]] = 0  # the image bias: no scatter, no maximum
    la.temperature, la.prior_precision = 0.5, 3.0
    with pytest.raises(ValueError, match=r"no maximum .*\[1\] \(temperature=1, prior_struc"):
        maximize_marglik_at_temperatures(la, (1.0, 2.0), "layerwise", budget=True)
    assert la.temperature == 0.5 and torch.equal(la.prior_precision, torch.tensor([3.0]))
    with pytest.raises(ValueError, match=r"temperatures must be positive numbers, got \[1.0, 0"):
        maximize_marglik_at_temperatures(la, (1.0, 0.0))
    with pytest.warns(UserWarning, match="budget of max_iter=2") as record:
        maximize_marglik_at_temperatures(fitted(1.0), (0.1, 10.0), max_iter=2, budget=True)
    assert sorted(str(w.message).split("rtol=1e-06, ")[1][:16] for w in record) == [
        "temperature=0.1,",
        "temperature=10, ",
    ]
