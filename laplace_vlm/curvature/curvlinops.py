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

from laplace_vlm.curvature.head_module import CosineLogitHead
from laplace_vlm.curvature.likelihoods import check_contrastive


class _DictInputHead(CosineLogitHead):
    """The cosine logits of curvlinops' dict inputs ``{'a': a, 'r': r}``."""

    def forward(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.logits(x["a"], x.get("r"))


def head_factors(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activations: torch.Tensor,
    residual: torch.Tensor | None,
    targets: torch.Tensor,
    scale: torch.Tensor,
    logit_bias: torch.Tensor | None,
    contrastive: str,
    labels: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """KFAC factors ``(B, A)`` of one head computed by curvlinops (``FisherType.TYPE2``).

    Same interface and result as :func:`laplace_vlm.curvature.closed_form.head_factors`.

    Parameters
    ----------
    weight, bias, activations, residual, targets, scale, logit_bias, contrastive
        as in :func:`laplace_vlm.curvature.closed_form.head_factors`.
    labels : torch.Tensor, optional
        `(M,)` matching class per row, default ``arange(M) % K``; the type-2 Fisher does
        not depend on them.
    chunk_size : int, optional
        rows per batch of the operator's data loop; the factors are summed over batches.

    Returns
    -------
    B, A : torch.Tensor
        `(D, D)` sum of per-row GGNs (symmetrised), `(d, d)` sum of input outer products.
    """
    contrastive = check_contrastive(contrastive)
    dtype, device = activations.dtype, activations.device
    D, d = weight.shape
    K = targets.shape[0]
    M = len(activations)
    if labels is None:
        labels = torch.arange(M, device=device) % K

    # fresh module on every call: curvlinops' hooks must never touch the user's modules
    head = _DictInputHead(weight.to(dtype), bias, targets, scale, logit_bias)
    proj = head.proj
    if contrastive == "clip":
        lossfunc = nn.CrossEntropyLoss(reduction="sum")
        y_all = labels
    else:
        lossfunc = nn.BCEWithLogitsLoss(reduction="sum")
        y_all = nn.functional.one_hot(labels, K).to(dtype)

    step = chunk_size or M
    data = []
    for start in range(0, M, step):
        rows = slice(start, start + step)
        x = {"a": activations[rows].detach().to(dtype)}
        if residual is not None:
            x["r"] = residual[rows].detach().to(dtype)
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
    return 0.5 * (B + B.T), A
