"""KFAC of one projection head through curvlinops' ``KFACLinearOperator`` (type-2 Fisher).

curvlinops hooks every ``nn.Linear`` inside an arbitrary graph, so the head is an inline
container ``{a, r} -> s normalize(W a + b + r) T^T (+ logit_bias)``; ``T`` is a buffer (not
a Linear) so that the only hooked layer is the projection. CLIP uses ``CrossEntropyLoss``,
SigLIP ``BCEWithLogitsLoss`` on the `(M, K)` logits (independent sigmoids per pair), both
sum-reduced so that the gradient factor is the unscaled ``B = sum_i J_i^T Lambda_i J_i``.
The input factor comes back divided by ``num_data``, rescaled here. The factors are read
from the operator's ``state_dict``.
"""

from __future__ import annotations

import torch
from curvlinops import FisherType, KFACLinearOperator
from torch import nn

from laplace_vlm.curvature.backend import HeadBatch, HeadCurvature
from laplace_vlm.curvature.head_module import CosineLogitHead


class _DictInputHead(CosineLogitHead):
    """The cosine logits of curvlinops' dict inputs ``{'a': a, 'r': r}``."""

    def forward(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.logits(x["a"], x.get("r"))


class CurvlinopsCurvature(HeadCurvature):
    """The GGN from curvlinops' type-2 KFAC."""

    def factors(self, batch: HeadBatch) -> tuple[torch.Tensor, torch.Tensor]:
        activations, residual, step = batch.activations, batch.residual, batch.step
        K, M = len(batch.targets), len(activations)
        # fresh module on every call: curvlinops' hooks must never touch the user's modules
        head = _DictInputHead(batch.weight, batch.bias, batch.targets, batch.scale,
                              batch.logit_bias)  # fmt: skip
        proj = head.proj
        if batch.contrastive == "clip":
            lossfunc = nn.CrossEntropyLoss(reduction="sum")
            y_all = batch.labels
        else:
            lossfunc = nn.BCEWithLogitsLoss(reduction="sum")
            y_all = nn.functional.one_hot(batch.labels, K).to(activations.dtype)
        data = []
        for start in range(0, M, step):
            rows = slice(start, start + step)
            x = {"a": activations[rows]}
            if residual is not None:
                x["r"] = residual[rows]
            data.append((x, y_all[rows]))

        linop = KFACLinearOperator(
            head,
            lossfunc,
            list(proj.parameters()),
            data,
            fisher_type=FisherType.TYPE2,
            check_deterministic=False,
            num_data=M,
            num_per_example_loss_terms=1,
            batch_size_fn=lambda x: x["a"].shape[0],
        )
        linop.compute_kronecker_factors()
        state = linop.state_dict()
        B = state["gradient_covariances"]["proj"]
        A = state["input_covariances"]["proj"] * M  # divided by num_data inside curvlinops
        return B, A


head_factors = CurvlinopsCurvature()
