"""Type-II maximum likelihood of the prior precision: the optimum of laplace's evidence.

laplace's ``optimize_prior_precision(method="marglik")`` takes 100 Adam steps of size 0.1 in
``log lambda`` from ``lambda = 1``: at most ``exp(10)`` of travel, and Adam's momentum needs
many more steps than that to settle, so an optimum in the thousands is left about 20% short.

Here the same objective, ``la.log_marginal_likelihood(prior_precision)``, is maximised to
convergence with a safeguarded Newton iteration in ``t = log lambda``:

* For a Kronecker posterior the evidence is *separable*: each prior parameter (one for all
  layers, one per head or one per layer) scales a disjoint set of layers, and the log-likelihood,
  the log-determinants and the scatter are sums over layers. So the Hessian in ``t`` is
  diagonal and one extra backward pass of the summed gradient gives it exactly.
* Each coordinate is *concave* in ``t``, for the exact prior
  (``sum log(l1 l2 + lambda) - n log lambda + lambda |theta|^2``) and for the damped one
  (``sum log(l1 + sqrt(lambda)) (l2 + sqrt(lambda))``): the gradient is monotone, its sign
  brackets the optimum, and Newton converges quadratically once near it.
* Far from the optimum a plain Newton step in ``log lambda`` crawls or overshoots, so the
  iteration is safeguarded (growing steps until bracketed, then bisection) and compares only
  gradients, never float32 evidence values: :mod:`laplace_vlm.posterior.newton_ascent`.

One iteration is one evidence evaluation, whatever the number of prior parameters; an optimum
anywhere in ``1e-2 .. 1e5`` from ``lambda = 1`` takes about 10. Where ``la``'s evidence is
laplace's formula on an eigendecomposed Kronecker precision, the evaluation is closed-form
(:mod:`laplace_vlm.posterior.kron_evidence`); otherwise it is ``la.log_marginal_likelihood``
with two backward passes.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import tqdm

from laplace_vlm.posterior.kron_evidence import (
    kron_evidence,
    kron_evidence_parts,
    stack_evidence_parts,
)
from laplace_vlm.posterior.newton_ascent import Ascent, newton_ascent
from laplace_vlm.validation import check_bool, check_int

STRUCTURES = ("scalar", "head", "layerwise", "diag")


def maximize_marglik(
    la: Any,
    prior_structure: str = "scalar",
    init_prior_prec: float | torch.Tensor = 1.0,
    max_iter: int = 100,
    rtol: float = 1e-6,
    max_step: float = 8.0,
    verbose: bool = False,
    progress_bar: bool = False,
    budget: bool = False,
) -> torch.Tensor:
    """Set ``la.prior_precision`` to the maximiser of ``la.log_marginal_likelihood``.

    Parameters
    ----------
    la : laplace.KronLaplace
        a fitted Kronecker Laplace (a ``DualEncoderLaplace`` for ``prior_structure='head'``).
    prior_structure : {'scalar', 'head', 'layerwise', 'diag'}, default='scalar'
        laplace's names: one precision for all parameters, or one per layer (per weight and
        bias tensor); 'head' is one per projection head (expanded to the head's weight and
        bias by ``DualEncoderLaplace``). 'diag' (per parameter) cannot be held by a Kronecker
        posterior and is refused. Used only when ``init_prior_prec`` is a single value, as in
        laplace; otherwise the structure of ``init_prior_prec`` is kept.
    init_prior_prec : float or torch.Tensor, default=1.0
        the starting precision (laplace's meaning): a single value, broadcast to
        ``prior_structure``, or a tensor of 1, 2 (per head) or ``la.n_layers`` positive values.
    max_iter : int, default=100
        the most evidence evaluations; 6 to 12 from ``lambda = 1`` to an optimum in
        ``1e-2 .. 1e5``, at most 14 from starts ten decades away (measured).
    rtol : float, default=1e-6
        convergence: the Newton step in ``log lambda`` (the log-space gradient over its
        curvature, i.e. the predicted relative distance of ``lambda`` to the optimum), or the
        width of the bracket in ``log lambda``, below ``rtol`` for every prior parameter.
    max_step : float, default=8.0
        the largest change of ``log lambda`` in one iteration (``exp(8)``, about 3000-fold).
    verbose : bool, default=False
        print the optimised precision, as laplace does.
    progress_bar : bool, default=False
        a tqdm bar over the iterations.
    budget : bool, default=False
        ``max_iter`` is a budget, as laplace's ``n_steps``: when it runs out before
        convergence the evaluated precision of highest evidence is kept with a ``UserWarning`` (laplace's Adam loop also
        stops where its steps end) instead of a ``ValueError``. An evidence without a
        maximum raises either way.

    Returns
    -------
    prior_precision : torch.Tensor
        the optimised free values, shape `(k,)`: 1 (scalar), 2 (per head) or ``n_layers``.
        ``la.prior_precision`` holds them expanded to laplace's per-layer form.

    Raises
    ------
    TypeError
        for a non-integer ``max_iter`` or a non-bool ``budget``.
    ValueError
        for an unknown or infeasible structure, a bad ``init_prior_prec``, ``max_iter < 1`` or
        ``rtol``, or (without ``budget``) when the optimum is not reached within ``max_iter``
        evaluations, and always when it has none (the
        evidence keeps increasing towards ``lambda = 0`` or infinity, e.g. for a layer whose
        weights are all zero).
    """
    max_iter = _check_options(la, max_iter, budget, rtol, max_step)
    original = la.prior_precision.clone()  # restored if no optimum is found
    init = _initial_precision(la, prior_structure, init_prior_prec)
    parts = kron_evidence_parts(la, len(init))
    if parts is None:
        evaluate = functools.partial(_gradient_and_curvature_batch, la)
    else:
        evaluate = functools.partial(kron_evidence, parts)
    with _progress(max_iter, progress_bar) as show:
        ascent = newton_ascent(evaluate, init[None], la._dtype, max_iter, rtol, max_step, show)
    where = f"prior_structure={prior_structure!r}, init_prior_prec={_short(init)}"
    try:
        prior = _outcome(ascent, 0, where, max_iter, rtol, budget).to(dtype=la._dtype)
    except ValueError:
        la.prior_precision = original
        raise
    la.prior_precision = prior
    if verbose:
        print(f"Optimized prior precision is {la.prior_precision}.")
    return prior


def maximize_marglik_at_temperatures(
    la: Any,
    temperatures: Sequence[float],
    prior_structure: str = "scalar",
    init_prior_prec: float | torch.Tensor = 1.0,
    max_iter: int = 100,
    rtol: float = 1e-6,
    max_step: float = 8.0,
    budget: bool = False,
) -> list[torch.Tensor]:
    """:func:`maximize_marglik` at each of several temperatures, in one batched iteration.

    A grid of pseudo-counts needs one optimum per temperature. Where the evidence is closed
    form (:func:`~laplace_vlm.posterior.kron_evidence.kron_evidence_parts`), the grid's
    iterates advance together, at the cost of one evaluation per iteration instead of one per
    temperature: every coordinate follows the steps of its own :func:`maximize_marglik`, so
    each optimum is that call's, up to an ulp of the evidence's elementwise functions (whether
    an element falls in a vectorised lane or a scalar tail): 1e-12 relative in float64, the
    same float32 value in a float32 posterior (tested). Otherwise each temperature is
    optimised in turn.

    Parameters
    ----------
    la : laplace.KronLaplace
        a fitted Kronecker Laplace; left at the last temperature and its optimum.
    temperatures : sequence of float
        positive likelihood temperatures (``1 / n`` for pseudo-counts ``n``).
    prior_structure : {'scalar', 'head', 'layerwise'}, default='scalar'
        as in :func:`maximize_marglik`.
    init_prior_prec : float or torch.Tensor, default=1.0
        the start at every temperature, as in :func:`maximize_marglik`.
    max_iter : int, default=100
        the most evidence evaluations of every temperature.
    rtol : float, default=1e-6
        convergence, as in :func:`maximize_marglik`.
    max_step : float, default=8.0
        the largest change of ``log lambda`` in one iteration.
    budget : bool, default=False
        ``max_iter`` is a budget: a temperature that runs out keeps its best evaluated
        precision, with a ``UserWarning`` naming it.

    Returns
    -------
    list of torch.Tensor
        per temperature, the `(k,)` optimised free prior values in ``la``'s dtype.

    Raises
    ------
    ValueError
        for an empty or non-positive ``temperatures``, and as :func:`maximize_marglik` for
        any temperature (naming it); ``la`` is then left as it was.
    """
    max_iter = _check_options(la, max_iter, budget, rtol, max_step)
    temperatures = [float(t) for t in temperatures]
    if not temperatures or min(temperatures) <= 0:
        raise ValueError(f"temperatures must be positive numbers, got {temperatures}.")
    original = (la.temperature, la.prior_precision.clone())
    init = _initial_precision(la, prior_structure, init_prior_prec)
    parts = []
    for temperature in temperatures:
        la.temperature = temperature
        parts.append(kron_evidence_parts(la, len(init)))
    try:
        if any(p is None for p in parts):
            return [_at_temperature(la, temperature, prior_structure, init, max_iter, rtol,
                                    max_step, budget) for temperature in temperatures]  # fmt: skip
        stacked = stack_evidence_parts(parts)
        ascent = newton_ascent(lambda t: kron_evidence(stacked, t),
                                init.expand(len(temperatures), -1), la._dtype, max_iter, rtol,
                                max_step)  # fmt: skip
        where = [f"temperature={temperature:.4g}, prior_structure={prior_structure!r}, "
                 f"init_prior_prec={_short(init)}" for temperature in temperatures]  # fmt: skip
        # a diverging problem stopped the others' iterations: its error is the one to raise
        for b in ascent.diverging.any(-1).nonzero().flatten().tolist():
            _outcome(ascent, b, where[b], max_iter, rtol, budget)
        priors = [_outcome(ascent, b, where[b], max_iter, rtol, budget).to(dtype=la._dtype)
                  for b in range(len(temperatures))]  # fmt: skip
    except ValueError:
        la.temperature, la.prior_precision = original
        raise
    la.temperature, la.prior_precision = temperatures[-1], priors[-1]
    return priors


def _at_temperature(la, temperature, prior_structure, init, max_iter, rtol, max_step, budget):
    la.temperature = temperature
    try:
        return maximize_marglik(la, prior_structure, init, max_iter, rtol, max_step,
                                budget=budget)  # fmt: skip
    except ValueError as err:
        raise ValueError(f"at temperature={temperature:.4g}: {err}") from err


@contextlib.contextmanager
def _progress(max_iter: int, enabled: bool) -> Iterator[Callable[[torch.Tensor], None] | None]:
    """A tqdm bar over the ascent's iterations showing ``lambda``: its callback, or None."""
    if not enabled:
        yield None
        return
    with tqdm.tqdm(total=max_iter, desc="[Maximising marglik]") as pbar:

        def show(t: torch.Tensor) -> None:
            pbar.update()
            pbar.set_description(f"[Maximising marglik | lambda {_short(t.exp())}]")

        yield show


def _check_options(la: Any, max_iter: Any, budget: Any, rtol: Any, max_step: Any) -> int:
    """``max_iter`` as an int, after checking every option and that ``la`` is fitted."""
    if getattr(la, "H", None) is None or getattr(la, "H_facs", None) is None:
        raise ValueError("la is not fitted: call la.fit(...) before maximize_marglik.")
    max_iter = check_int("max_iter", max_iter)
    check_bool("budget", budget)
    if not (isinstance(rtol, (int, float)) and 0 < rtol < 1):
        raise ValueError(f"rtol must be a float in (0, 1), got {rtol!r}.")
    if not (isinstance(max_step, (int, float)) and max_step > 0):
        raise ValueError(f"max_step must be a positive float, got {max_step!r}.")
    return max_iter


def _outcome(ascent: Ascent, b: int, where: str, max_iter: int, rtol: float,
             budget: bool) -> torch.Tensor:  # fmt: skip
    """Problem ``b``'s float64 prior precision `(k,)`, or the error of its ascent."""
    t, grad, done, diverging = ascent.t[b], ascent.grad[b], ascent.done[b], ascent.diverging[b]
    if bool(done.all()):
        return t.exp()
    if budget and not bool(diverging.any()):
        prior = ascent.best[b].exp()
        warnings.warn(
            f"maximize_marglik used its budget of max_iter={max_iter} evidence evaluations "
            f"before converging (rtol={rtol}, {where}): the best evaluated prior precision "
            f"{_short(prior)} kept (last log-space gradient {_short(grad)}); about 10 "
            "evaluations converge from lambda = 1."
        )
        return prior
    where = f"{where}: last prior precision {_short(t.exp())}, log-space gradient {_short(grad)}"
    if bool(diverging.any()):
        raise ValueError(
            "maximize_marglik: the evidence has no maximum in the prior precision(s) "
            f"{diverging.nonzero().flatten().tolist()} ({where}); it keeps increasing "
            "towards 0 or infinity, as for a tensor whose weights are all zero (no scatter) "
            "or that has no curvature: tie it to others with prior_structure='head' or "
            "'scalar'."
        )
    raise ValueError(
        f"maximize_marglik did not converge in max_iter={max_iter} evidence evaluations "
        f"(rtol={rtol}, {where}): raise max_iter or rtol."
    )


def _gradient_and_curvature(la: Any, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Gradient and Hessian diagonal of the evidence in ``t = log lambda``, and the evidence.

    The evidence is a sum of terms each depending on one coordinate (see the module
    docstring), so the derivative of the summed gradient is the Hessian's diagonal.
    """
    t = t.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        lml = la.log_marginal_likelihood(prior_precision=t.exp())
        (grad,) = torch.autograd.grad(lml, t, create_graph=True)
        (curv,) = torch.autograd.grad(grad.sum(), t)
    la.prior_precision = t.detach().exp()  # no graph left behind in la
    return grad.detach(), curv.detach(), float(lml.detach())


def _gradient_and_curvature_batch(la: Any, t: torch.Tensor):
    """:func:`_gradient_and_curvature` of a batch of one, `(1, k)`: the ascent's interface."""
    grad, curv, value = _gradient_and_curvature(la, t[0])
    return grad[None], curv[None], torch.tensor([value], dtype=torch.float64)


def _initial_precision(
    la: Any, prior_structure: Any, init_prior_prec: float | torch.Tensor
) -> torch.Tensor:
    """laplace's ``init_prior_prec`` and ``prior_structure`` as a `(k,)` tensor of values."""
    structure = str(getattr(prior_structure, "value", prior_structure))
    if structure not in STRUCTURES:
        raise ValueError(f"prior_structure must be one of {STRUCTURES}, got {prior_structure!r}.")
    init = torch.as_tensor(init_prior_prec, dtype=la._dtype).detach().reshape(-1).to(la._device)
    if init.numel() == 0 or not bool(torch.isfinite(init).all() & (init > 0).all()):
        raise ValueError(f"init_prior_prec must hold positive finite values, got {_short(init)}.")
    sizes = {1: "scalar", 2: "head", la.n_layers: "layerwise"}
    if init.numel() == 1:
        if structure == "diag":
            raise ValueError(
                "prior_structure='diag' (one precision per parameter) cannot be held by a "
                "Kronecker posterior, whose prior is one value per layer at most: use "
                "prior_structure='layerwise', 'head' or 'scalar'."
            )
        size = {"scalar": 1, "head": 2, "layerwise": la.n_layers}[structure]
        init = init.expand(size).clone()
    elif init.numel() not in sizes:
        raise ValueError(
            f"init_prior_prec must have 1, 2 (per head) or n_layers={la.n_layers} values for a "
            f"Kronecker posterior, got {init.numel()}."
        )
    try:
        la.prior_precision = init  # checks the structure (a 2-tensor needs per-head support)
    except ValueError as err:
        raise ValueError(
            f"init_prior_prec with {init.numel()} values ({sizes.get(init.numel())}) is not a "
            f"prior structure of {type(la).__name__}: {err}"
        ) from err
    return init


def _short(tensor: torch.Tensor) -> str:
    values = tensor.detach().flatten().tolist()
    return "[" + ", ".join(f"{v:.4g}" for v in values[:8]) + (", ...]" if len(values) > 8 else "]")
