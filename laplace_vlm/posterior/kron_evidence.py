"""The evidence of an eigendecomposed Kronecker posterior as a function of ``log lambda``.

laplace's evidence is ``log p(D | theta) - (log det P - log det P0 + scatter) / 2``; with the
posterior precision ``P`` held as ``KronDecomposed`` eigenvalues, only the prior precisions
``lambda_l`` (one per layer) move when the prior is tuned. Every term is then a sum over
eigenvalues of scalar functions of ``t = log lambda``, and its gradient and curvature in ``t``
have closed forms (``s = sqrt(delta0 + lambda)``, ``m = l1 l2 + delta0``):

* one factor or exact prior: ``log(m + lambda)``: first ``lambda / (m + lambda)``, second
  ``lambda m / (m + lambda)^2``;
* damped (and the paper's symmetric form): ``log(l1 + s) + log(l2 + s)`` per pair:
  ``g = lambda / (2 s (a + s))`` for an eigenvalue ``a``, second
  ``g (2 delta0 (a + s) + lambda a) / (2 s^2 (a + s))``;
* ``log det P0 = sum_l p_l t_l`` and ``scatter = sum_l exp(t_l) |theta_l - mu0_l|^2``.

:func:`kron_evidence` evaluates them without autograd: ``maximize_marglik`` calls the evidence
about ten times per optimisation and the cross-validated pseudo-count thousands of times per
experiment, where laplace's graph (the posterior rebuilt, a double backward) costs 20x more
than the arithmetic. ``tests/test_marglik.py`` checks it against autograd on laplace's
evidence for every posterior form and prior structure.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from laplace.utils.matrix import KronDecomposed


@dataclass
class KronEvidence:
    """The parts of laplace's evidence that ``lambda`` does not change, one entry per layer.

    Attributes
    ----------
    eigenvalues : list of list of torch.Tensor
        per layer, float64: damped weight blocks keep their two eigenvalue vectors (input,
        output); every other block holds the one vector ``m = l1 l2 + delta0`` (or
        ``l + delta0``) to which the prior adds. `(n,)`, or `(B, n)` for a batch of
        evidences (:func:`stack_evidence_parts`).
    base_deltas : torch.Tensor
        `(L,)` or `(B, L)`: what ``P`` adds to the curvature besides the prior (laplace's
        ``H.deltas``).
    sizes, scatters : torch.Tensor
        `(L,)` parameters and ``|theta_l - mu0_l|^2`` of every layer.
    layer_of : torch.Tensor
        `(L, k)` one-hot: which of the ``k`` free prior values sets each layer.
    damping : bool
        laplace's damped algebra (``damping=True`` and the symmetric form) or the exact prior.
    log_likelihood : torch.Tensor
        `()` or `(B,)` float64: ``la.log_likelihood``, constant in ``lambda``.
    """

    eigenvalues: list[list[torch.Tensor]]
    base_deltas: torch.Tensor
    sizes: torch.Tensor
    scatters: torch.Tensor
    layer_of: torch.Tensor
    damping: bool
    log_likelihood: torch.Tensor


def kron_evidence_parts(la: Any, k: int) -> KronEvidence | None:
    """The fixed parts of ``la``'s evidence for ``k`` free prior values, or None.

    None when ``la``'s evidence is not laplace's formula on a ``KronDecomposed`` precision
    with one prior value per layer (a subclass that overrides it, a diagonal prior): the
    caller then differentiates ``la.log_marginal_likelihood`` itself.

    Parameters
    ----------
    la : laplace.KronLaplace
        a fitted Kronecker Laplace (e.g. a ``DualEncoderLaplace``); its prior precision is left
        as it was.
    k : int
        free prior values: 1, 2 (per head, expanded by ``la``'s setter) or ``la.n_layers``.

    Returns
    -------
    KronEvidence or None
        the eigenvalues, deltas, sizes, scatters and the value-to-layer map; None where the
        closed form does not apply.
    """
    if _overridden(type(la)):
        return None
    saved = la.prior_precision.clone()
    try:
        layer_of = _layers_of_values(la, k)
        lam = _per_layer(la)
        P = la.posterior_precision
    finally:
        la.prior_precision = saved
    if not isinstance(P, KronDecomposed) or layer_of is None or lam is None:
        return None
    like = dict(dtype=torch.float64, device=lam.device)
    sizes = torch.tensor([p.numel() for p in la.params], **like)
    delta = (la.mean - la.prior_mean).detach().to(**like)
    scatters = torch.stack([d.square().sum() for d in delta.split(sizes.long().tolist())])
    with torch.no_grad():
        log_likelihood = torch.as_tensor(float(la.log_likelihood), **like)
    damping, base_deltas = bool(P.damping), P.deltas.detach().to(**like) - lam.to(**like)
    eigenvalues = []
    for ls, d0 in zip(P.eigenvalues, base_deltas):
        ls = [v.detach().to(**like) for v in ls]
        # every evaluation would rebuild the same outer product: it does not move with lambda
        eigenvalues.append(ls if len(ls) == 2 and damping else [_outer(ls).flatten() + d0])
    return KronEvidence(
        eigenvalues=eigenvalues,
        base_deltas=base_deltas,
        sizes=sizes,
        scatters=scatters,
        layer_of=layer_of.to(**like),
        damping=damping,
        log_likelihood=log_likelihood,
    )


def stack_evidence_parts(parts: list[KronEvidence]) -> KronEvidence:
    """One batch of the evidences of the same parameters under different curvature scales.

    Parameters
    ----------
    parts : list of KronEvidence
        `B` unbatched parts of one posterior (same layers, mean and prior map), e.g. at
        ``B`` temperatures.

    Returns
    -------
    KronEvidence
        the eigenvalues `(B, n)`, ``base_deltas`` `(B, L)` and log-likelihoods `(B,)`, for
        :func:`kron_evidence` at `(B, k)` iterates.

    Raises
    ------
    ValueError
        if the parts differ in their layers, scatters, prior map or algebra.
    """
    first = parts[0]
    for other in parts[1:]:
        same = (other.damping == first.damping and other.layer_of.shape == first.layer_of.shape
                and torch.equal(other.layer_of, first.layer_of)
                and torch.equal(other.sizes, first.sizes)
                and torch.equal(other.scatters, first.scatters))  # fmt: skip
        if not same:
            raise ValueError("parts must be evidences of one posterior's layers, mean and prior.")
    return KronEvidence(
        eigenvalues=[
            [torch.stack(v) for v in zip(*ls)] for ls in zip(*(p.eigenvalues for p in parts))
        ],
        base_deltas=torch.stack([p.base_deltas for p in parts]),
        sizes=first.sizes,
        scatters=first.scatters,
        layer_of=first.layer_of,
        damping=first.damping,
        log_likelihood=torch.stack([p.log_likelihood for p in parts]),
    )


def kron_evidence(
    parts: KronEvidence, t: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradient and Hessian diagonal of the evidence in ``t = log lambda``, and its value.

    Parameters
    ----------
    parts : KronEvidence
        from :func:`kron_evidence_parts`, or a batch of them from :func:`stack_evidence_parts`.
    t : torch.Tensor
        `(k,)` log prior precisions, float64; `(B, k)` for a batch of parts.

    Returns
    -------
    grad, curv : torch.Tensor
        `(k,)` or `(B, k)`: the first and second derivatives (the Hessian is diagonal: each
        value scales its own layers); NaN where a log-determinant argument is not positive.
    value : torch.Tensor
        `()` or `(B,)`: the evidence (NaN likewise).
    """
    # one-hot maps: every per-layer value is one exact product, batched or not
    lam = t.exp() @ parts.layer_of.T  # (..., L)
    terms = [_layer_terms(ls, d0.unsqueeze(-1), lam_l.unsqueeze(-1), parts.damping)
             for ls, d0, lam_l in zip(parts.eigenvalues, parts.base_deltas.unbind(-1),
                                      lam.unbind(-1))]  # fmt: skip
    excess, second, logdet = (torch.stack(column, -1) for column in zip(*terms))
    scatter = lam * parts.scatters
    # d/dt of -(log det P - p log lambda + lambda |theta|^2) / 2, summed over each value's layers
    grad = -0.5 * (excess + scatter) @ parts.layer_of
    curv = -0.5 * (second + scatter) @ parts.layer_of
    value = parts.log_likelihood - 0.5 * (logdet - parts.sizes * lam.log() + scatter).sum(-1)
    return grad, curv, value


def _layer_terms(ls, d0, lam, damping: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One layer's ``d/dt log det P - p``, ``d2/dt2 log det P`` and ``log det P``.

    ``ls`` are `(..., n)` eigenvalues, ``d0`` and ``lam`` `(..., 1)`; the terms are `(...)`.
    The first is written without the cancellation of ``lambda / (m + lambda) - 1``: far above
    the optimum it must stay a small positive number, not round to 0 (a false optimum).
    """
    if len(ls) == 2 and damping:
        s = (d0 + lam).sqrt()
        excess, second, logdet = 0.0, 0.0, 0.0
        for mine, other in ((ls[0], ls[1]), (ls[1], ls[0])):
            arg = mine + s
            g = lam / (2 * s * arg)
            weight = other.shape[-1]  # every eigenvalue pairs with each of the other factor's
            # g - 1/2 = -(s a + d0) / (2 s (a + s)): each pair's two halves of the p log lambda
            excess = excess - weight * ((s * mine + d0) / (2 * s * arg)).sum(-1)
            second = second + weight * (g * (2 * d0 * arg + lam * mine) / (2 * s * s * arg)).sum(-1)
            logdet = logdet + weight * _log(arg).sum(-1)
        return excess, second, logdet
    (m,) = ls  # l1 l2 + delta0, from kron_evidence_parts
    arg = m + lam
    return -(m / arg).sum(-1), (lam * m / arg.square()).sum(-1), _log(arg).sum(-1)


def _outer(ls: list[torch.Tensor]) -> torch.Tensor:
    return torch.outer(*ls) if len(ls) == 2 else ls[0]


def _log(arg: torch.Tensor) -> torch.Tensor:
    # laplace's log of a non-positive argument is NaN or -inf: keep the NaN, as a wall
    return torch.where(arg > 0, arg.clamp_min(torch.finfo(arg.dtype).tiny).log(), torch.nan)


def _overridden(cls: type) -> bool:
    """Whether ``cls`` changes any term of laplace's Kronecker evidence."""
    from laplace.baselaplace import KronLaplace, ParametricLaplace

    if not issubclass(cls, KronLaplace):
        return True
    terms = ("log_marginal_likelihood", "scatter", "log_det_prior_precision")
    return any(getattr(cls, n) is not getattr(ParametricLaplace, n) for n in terms) or (
        cls.log_det_posterior_precision is not KronLaplace.log_det_posterior_precision
    )


def _per_layer(la: Any) -> torch.Tensor | None:
    """``la.prior_precision`` as one value per layer (None for a per-parameter prior)."""
    prior = la.prior_precision.detach().reshape(-1)
    if len(prior) == 1:
        return prior.expand(la.n_layers).clone()
    return prior if len(prior) == la.n_layers else None


def _layers_of_values(la: Any, k: int) -> torch.Tensor | None:
    """`(L, k)` one-hot map from the ``k`` free values to the layers ``la``'s setter fills."""
    # distinct powers of two tell apart which value each layer received
    probe = 2.0 ** torch.arange(k, dtype=la._dtype, device=la._device)
    la.prior_precision = probe
    per_layer = _per_layer(la)
    if per_layer is None:
        return None
    index = per_layer.log2().round().long()
    if bool((index < 0).any() | (index >= k).any()):
        return None
    return torch.nn.functional.one_hot(index, k)
