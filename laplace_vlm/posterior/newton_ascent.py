"""A safeguarded Newton iteration for a batch of separable concave maximisations in log space.

Each coordinate ``t = log x`` of each problem maximises its own concave 1-D objective, of
which ``evaluate`` gives the gradient and curvature (the Hessian is diagonal), so every
coordinate steps on its own:

* Far from the optimum Newton steps in ``t`` can be tiny (for the evidence of
  :mod:`laplace_vlm.posterior.marglik`, above the optimum the scatter term gives a step of
  about ``-1`` per iteration) or huge (below it the curvature vanishes), so until the gradient
  changes sign the step at least doubles and at most is ``max_step``; once bracketed, a Newton
  step that leaves the bracket is replaced by bisection.
* Only gradients are compared, never objective values, which in float32 carry rounding errors
  of several nats when ``n log lambda`` is large; the values only pick the best evaluated
  iterate, the answer of a budget that runs out.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class Ascent:
    """Where :func:`newton_ascent` stopped, per problem `b` of the batch.

    Parameters
    ----------
    t : torch.Tensor
        `(B, k)` float64 the last iterate, ``log x``.
    grad : torch.Tensor
        `(B, k)` the last gradient in ``t``.
    done : torch.Tensor
        `(B, k)` bool: converged coordinates.
    diverging : torch.Tensor
        `(B, k)` bool: coordinates whose objective has no maximum.
    best : torch.Tensor
        `(B, k)` the evaluated iterate of highest objective (the answer of a spent budget).
    init : torch.Tensor
        `(B, k)` the starting values ``x``.
    """

    t: torch.Tensor
    grad: torch.Tensor
    done: torch.Tensor
    diverging: torch.Tensor
    best: torch.Tensor
    init: torch.Tensor


def newton_ascent(
    evaluate: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    init: torch.Tensor,
    dtype: torch.dtype,
    max_iter: int,
    rtol: float,
    max_step: float,
    on_iteration: Callable[[torch.Tensor], None] | None = None,
) -> Ascent:
    """The safeguarded Newton iteration of the module docstring on `(B, k)` coordinates.

    Parameters
    ----------
    evaluate : callable
        ``evaluate(t)`` of the `(B, k)` float64 iterate ``t = log x``: the `(B, k)` gradient
        and curvature in ``t`` and the `(B,)` objective values. Every coordinate moves on its
        own (the Hessian is diagonal), so a batch of problems takes the steps each would take
        alone.
    init : torch.Tensor
        `(B, k)` positive starting values ``x``.
    dtype : torch.dtype
        the objective's dtype: ``t`` is kept where ``x`` and ``x |theta|^2`` stay finite in it.
    max_iter : int
        the most evaluations.
    rtol : float
        convergence: the Newton step, or the bracket's width, in ``t`` below ``rtol``.
    max_step : float
        the largest change of ``t`` in one iteration.
    on_iteration : callable, optional
        called with the new iterate ``t`` after every completed iteration (a progress bar).

    Returns
    -------
    Ascent
        where the loop ended: when every coordinate converged, any diverged, or after
        ``max_iter`` evaluations.
    """
    finfo = torch.finfo(dtype)
    # x (a prior precision lambda: lambda |theta|^2 and log lambda) must stay finite in dtype
    t_min, t_max = 0.5 * math.log(finfo.tiny), 0.5 * math.log(finfo.max)
    # the iterate lives in float64 whatever the dtype: in float32, t ~ 10 has a
    # spacing of 1e-6, too coarse for the bracket to shrink below rtol
    t = init.to(dtype=torch.float64).log()
    lo = torch.full_like(t, -math.inf)  # the gradient is > 0 at lo ...
    hi = torch.full_like(t, math.inf)  # ... and < 0 at hi
    done = torch.zeros(t.shape, dtype=torch.bool, device=t.device)
    # the last two step lengths: a bracketed Newton step must at least halve the one before
    # last, else bisect (as in Numerical Recipes' rtsafe), so rounding noise in the gradient
    # near the optimum cannot stall the bracket
    step1, step2 = torch.full_like(t, 0.5), torch.full_like(t, math.inf)
    t_good = t.clone()  # the last point with a finite gradient, per coordinate
    grad = torch.zeros_like(t)
    diverging = torch.zeros_like(done)
    best_value, best = torch.full(t.shape[:1], -math.inf, dtype=torch.float64), t.clone()
    for _ in range(max_iter):
        grad, curv, value = evaluate(t)
        # the budget's answer if it runs out
        better = torch.isfinite(value) & (value > best_value)
        best_value = torch.where(better, value, best_value)
        best = torch.where(better[:, None], t, best)
        ok = torch.isfinite(grad) & torch.isfinite(curv) & ~done
        # a vanishing gradient with no curvature is not an optimum but a flat objective: x has
        # run so far that it no longer changes anything in dtype
        flat = ok & (grad == 0) & (curv >= 0)
        if bool(flat.any()):
            diverging = flat
            break
        # a non-finite objective (e.g. an evidence's log of a slightly negative eigenvalue plus
        # a tiny lambda) is a wall: go half way back to the last good point
        bad = ~done & ~ok
        t_next = torch.where(bad, 0.5 * (t + t_good), t)
        t_good = torch.where(ok, t, t_good)
        lo = torch.where(ok & (grad >= 0), torch.maximum(lo, t), lo)
        hi = torch.where(ok & (grad <= 0), torch.minimum(hi, t), hi)
        # Newton step of the coordinate's concave 1-D objective; where rounding makes the
        # curvature non-negative, a full step along the gradient
        concave = curv < 0
        newton = torch.where(
            concave, -grad / torch.where(concave, curv, -1.0), grad.sign() * max_step
        )
        newton = torch.where(ok, newton, torch.zeros_like(newton))
        converged = ok & ((newton.abs() <= rtol) | (hi - lo <= rtol))
        # the final Newton step is below rtol (or inside a bracket narrower than rtol): take it
        final = torch.minimum(torch.maximum(t + newton, lo), hi)
        t_next = torch.where(converged, final, t_next)
        done |= converged
        active = ok & ~converged
        bracketed = torch.isfinite(lo) & torch.isfinite(hi)
        # unbracketed, Newton may crawl (about -1 a step above the optimum): at least double
        # the previous step until the gradient changes sign, at most max_step
        grow = newton.sign() * torch.maximum(newton.abs(), 2 * step1)
        free = torch.where(bracketed, newton, grow).clamp(-max_step, max_step)
        proposal = t + free
        bisect = bracketed & ((proposal <= lo) | (proposal >= hi) | (2 * newton.abs() > step2))
        proposal = torch.where(bisect, 0.5 * (lo + hi), proposal).clamp(t_min, t_max)
        # unbracketed and already at the dtype's limit: the objective increases without bound
        diverging = active & ~bracketed & (proposal == t)
        t_next = torch.where(active, proposal, t_next)
        step2 = torch.where(active, step1, step2)
        step1 = torch.where(active, (proposal - t).abs(), step1)
        t = t_next
        if on_iteration is not None:
            on_iteration(t)
        if bool(done.all()) or bool(diverging.any()):
            break
    return Ascent(t, grad, done, diverging, best, init)
