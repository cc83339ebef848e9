"""KFAC of one projection head through ASDL (``asdfghjkl==0.1a4``, imported as ``asdl``).

ASDL hooks the ``nn.Linear`` inside an arbitrary forward, so the graph is written inline:
``z = W a + b + r``, ``u = z / ||z||``, logits ``l = s u T^T (+ logit_bias)``. The exact
(type-2) Fisher of that forward is the GGN of the contrastive likelihood, and with
``data_size=1`` ASDL returns the unscaled sums ``B = sum_i J_i^T Lambda_i J_i`` and
``A = sum_i a_i a_i^T``.

Pitfalls handled here:

- ASDL registers deprecated ``register_backward_hook``s that permanently break BackPACK on
  the same module objects, so every call builds a fresh ``nn.Linear`` from the tensors.
- The MC Fisher is scaled by ``1 / n_mc_samples``; only ``fisher_exact`` is used.
- ASDL has no Bernoulli loss. The sigmoid GGN ``J^T diag(w) J``, ``w = sigma(l)(1 - sigma(l))``,
  is the exact *MSE* Fisher ``J_r^T J_r`` of the whitened logits ``r = sqrt(w).detach() * l``.
- The exact cross-entropy Fisher crashes on 3-D logits; logits here are always `(M, K)`.
"""

from __future__ import annotations

import warnings

import torch
from asdl.fisher import FisherConfig, get_fisher_maker
from asdl.grad_maker import LOSS_CROSS_ENTROPY, LOSS_MSE
from asdl.matrices import FISHER_EXACT, SHAPE_KRON

from laplace_vlm.curvature.backend import HeadBatch, HeadCurvature
from laplace_vlm.curvature.head_module import CosineLogitHead
from laplace_vlm.curvature.likelihoods import hessian_weights


class _WhitenedHead(CosineLogitHead):
    """The cosine logits, whitened for SigLIP: ``sqrt(w) l`` with ``w`` detached."""

    def __init__(self, weight, bias, targets, scale, logit_bias, contrastive: str):
        super().__init__(weight, bias, targets, scale, logit_bias)
        self.contrastive = contrastive

    def forward(self, a: torch.Tensor, r: torch.Tensor | None) -> torch.Tensor:
        logits = self.logits(a, r)
        if self.contrastive == "siglip":
            # exact-MSE Fisher of sqrt(w) l == sigmoid GGN (w detached: it is Lambda, not graph)
            logits = hessian_weights(logits.detach(), "siglip").sqrt() * logits
        return logits


class AsdlCurvature(HeadCurvature):
    """The GGN from ASDL's exact Fisher of the inline forward."""

    def factors(self, batch: HeadBatch) -> tuple[torch.Tensor, torch.Tensor]:
        # fresh module on every call: ASDL's hooks must never touch the user's modules
        head = _WhitenedHead(batch.weight, batch.bias, batch.targets, batch.scale,
                             batch.logit_bias, batch.contrastive)  # fmt: skip
        proj = head.proj
        loss_type = LOSS_CROSS_ENTROPY if batch.contrastive == "clip" else LOSS_MSE
        config = FisherConfig(
            fisher_type=FISHER_EXACT, loss_type=loss_type, fisher_shapes=[SHAPE_KRON], data_size=1
        )
        fisher_maker = get_fisher_maker(head, config)

        activations, residual, (D, d) = batch.activations, batch.residual, batch.weight.shape
        B = activations.new_zeros(D, D)
        A = activations.new_zeros(d, d)
        for start in range(0, len(activations), batch.step):
            a = activations[start : start + batch.step]
            r = None if residual is None else residual[start : start + batch.step]
            fisher_maker.setup_model_call(head, a, r)
            with warnings.catch_warnings():
                # ASDL's legacy backward hooks trip torch's deprecation warning; ASDL only
                # reads grad_output, which the legacy hook still gets right
                warnings.filterwarnings("ignore", message="Using a non-full backward hook")
                fisher_maker.forward_and_backward()
            # data_size=1: no 1/N anywhere, A excludes the bias column (bias block is B alone)
            B += proj.fisher.kron.B
            A += proj.fisher.kron.A
        return B, A


head_factors = AsdlCurvature()
