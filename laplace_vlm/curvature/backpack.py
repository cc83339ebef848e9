"""KFAC of one projection head through BackPACK's KFLR (exact-loss-Hessian KFAC).

BackPACK only differentiates through modules it has an extension for, so the head is
written as ``Sequential(Linear, [AddResidual], Normalize, Linear_frozen(weight=s T,
bias=logit_bias))`` followed by a sum-reduced loss. Three small second-order extensions
fill the gaps, registered on a private ``KFLR`` instance with ``set_module_extension``:

- ``Normalize``: ``J^T M = (M - <M, u> u) / ||x||`` (the L2 normalisation is symmetric).
- ``AddResidual``: identity (``z = W a + b + r`` with ``r`` a fixed per-row offset).
- SigLIP: upstream's ``BCEWithLogitsLoss`` extension only takes `(N, 1)` logits; ours
  returns the per-row Hessian square root ``diag(sqrt(sigma(l)(1 - sigma(l))))`` of
  `(N, K)` logits.

KFLR's ``B`` is the unscaled sum ``sum_i J_i^T Lambda_i J_i`` under a sum-reduced loss, its
``A`` the batch *mean* ``sum_i a_i a_i^T / M``, rescaled here. Fresh modules on every call:
ASDL's legacy hooks break BackPACK on modules they have touched.
"""

from __future__ import annotations

import warnings

import torch
from backpack import backpack, extend
from backpack.context import CTX
from backpack.core.derivatives.basederivatives import BaseDerivatives, BaseLossDerivatives
from backpack.extensions import KFLR
from backpack.extensions.secondorder.hbp.hbpbase import HBPBaseModule
from backpack.extensions.secondorder.hbp.losses import HBPLoss
from backpack.utils.subsampling import subsample
from torch import nn

from laplace_vlm.curvature.backend import HeadBatch, HeadCurvature
from laplace_vlm.heads import linear_copy


class Normalize(nn.Module):
    """``x -> x / ||x||`` along the last dimension."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The rows of ``x`` scaled to unit L2 norm.

        Parameters
        ----------
        x : torch.Tensor
            `(N, D)` un-normalised embeddings ``z``.

        Returns
        -------
        torch.Tensor
            `(N, D)` ``u = z / ||z||``, the input of the similarity layer.
        """
        return nn.functional.normalize(x, dim=-1)


class AddResidual(nn.Module):
    """``z -> z + r`` with a fixed `(N, D)` offset ``r`` (e.g. SigLIP's image-tower residual).

    Parameters
    ----------
    residual : torch.Tensor
        `(N, D)` the offset ``r``, stored as a buffer.
    """

    def __init__(self, residual: torch.Tensor):
        super().__init__()
        self.register_buffer("residual", residual)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Add the stored offset.

        Parameters
        ----------
        z : torch.Tensor
            `(N, D)` output ``W a + b`` of the head's linear layer.

        Returns
        -------
        torch.Tensor
            `(N, D)` ``z + r``, the tower's embedding.
        """
        return z + self.residual


class _NormalizeDerivatives(BaseDerivatives):
    def _jac_t_mat_prod(self, module, g_inp, g_out, mat, subsampling=None):
        # mat: [V, N, D]; J = (I - u u^T) / ||x|| is symmetric
        x = subsample(module.input0, subsampling=subsampling)
        norm = x.norm(dim=-1, keepdim=True)
        u = x / norm
        return (mat - (mat * u).sum(-1, keepdim=True) * u) / norm


class _IdentityDerivatives(BaseDerivatives):
    def _jac_t_mat_prod(self, module, g_inp, g_out, mat, subsampling=None):
        return mat


class _PairwiseSigmoidDerivatives(BaseLossDerivatives):
    """Sum-reduced ``BCEWithLogitsLoss`` on `(N, K)` logits: independent sigmoids per pair."""

    def hessian_is_psd(self) -> bool:
        return True

    def _sqrt_hessian(self, module, g_inp, g_out, subsampling=None):
        if module.reduction != "sum" or module.weight is not None or module.pos_weight is not None:
            raise NotImplementedError("only reduction='sum' without weights is supported")
        sig = subsample(module.input0, subsampling=subsampling).sigmoid()  # (N, K)
        # [K, N, K]: the v-th column of sample n's sqrt Hessian is sqrt(w_nv) e_v
        return torch.diag_embed((sig * (1.0 - sig)).sqrt()).permute(2, 0, 1)


def _kflr() -> KFLR:
    ext = KFLR()
    ext.set_module_extension(Normalize, HBPBaseModule(_NormalizeDerivatives()))
    ext.set_module_extension(AddResidual, HBPBaseModule(_IdentityDerivatives()))
    ext.set_module_extension(
        nn.BCEWithLogitsLoss, HBPLoss(_PairwiseSigmoidDerivatives()), overwrite=True
    )
    return ext


class BackpackCurvature(HeadCurvature):
    """The GGN from BackPACK's KFLR, with the normalisation and pairwise-sigmoid extensions."""

    def factors(self, batch: HeadBatch) -> tuple[torch.Tensor, torch.Tensor]:
        activations, residual, step = batch.activations, batch.residual, batch.step
        dtype, device = activations.dtype, activations.device
        (D, d), K, M = batch.weight.shape, len(batch.targets), len(activations)
        # fresh modules on every call (never hook the user's; ASDL may have touched them)
        # the cosine logits as BackPACK's layers: s T u (+ bias) is a Linear on u = normalize(z)
        proj = linear_copy(batch.weight, batch.bias)
        sim_bias = None
        if batch.logit_bias is not None:
            sim_bias = torch.as_tensor(batch.logit_bias).to(device, dtype).expand(K)
        sims = linear_copy(torch.as_tensor(batch.scale).to(device, dtype) * batch.targets, sim_bias)
        sims.requires_grad_(False)
        if batch.contrastive == "clip":
            lossfunc = extend(nn.CrossEntropyLoss(reduction="sum"))
        else:
            lossfunc = extend(nn.BCEWithLogitsLoss(reduction="sum"))
        ext = _kflr()

        B = activations.new_zeros(D, D)
        A = activations.new_zeros(d, d)
        n_handles = len(CTX.hook_handles)
        try:
            for start in range(0, M, step):
                rows = slice(start, start + step)
                a = activations[rows]
                layers = [proj]
                if residual is not None:
                    layers.append(AddResidual(residual[rows]))
                model = extend(nn.Sequential(*layers, Normalize(), sims))
                y = batch.labels[rows]
                if batch.contrastive == "siglip":
                    y = nn.functional.one_hot(y, K).to(dtype)
                loss = lossfunc(model(a), y)
                with backpack(ext), warnings.catch_warnings():
                    # the first layer's input needs no gradient; torch warns, BackPACK is unaffected
                    warnings.filterwarnings("ignore", message="Full backward hook is firing")
                    loss.backward()
                B_chunk, A_mean = proj.weight.kflr  # BackPACK stores results on the parameter
                B += B_chunk
                A += A_mean * len(a)  # KFLR's input factor is a batch mean
        finally:
            # extend() parks a handle per module in a global list: drop ours, keep anyone else's
            for handle in CTX.hook_handles[n_handles:]:
                handle.remove()
            del CTX.hook_handles[n_handles:]
        return B, A


head_factors = BackpackCurvature()
