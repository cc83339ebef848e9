"""The curvature released with the paper's reference implementation (BayesVLM).

The released files hold ``A = sum a a^T / sqrt(N)`` and ``B = sum H / sqrt(N)`` per head
(a symmetric split of ``(sum a a^T) x (sum H) / N``) for N image-caption pairs, plus prior
precisions found with the reference's own evidence objective at pseudo-count 1.
laplace's scaling is ``[sum B, sum a a^T / N]``, so the loader multiplies ``B`` by sqrt(N)
and divides ``A`` by sqrt(N): the Kronecker product, and with it the exact-prior
posterior, is unchanged.
"""

from __future__ import annotations

import json
import math
import os
from typing import TYPE_CHECKING, Any

import torch
from laplace.utils.matrix import Kron
from torch import nn

from laplace_vlm.curvature.factor_sums import FactorSums

if TYPE_CHECKING:
    from laplace_vlm.dual_encoder_laplace import DualEncoderLaplace

FILES = ("A_img_analytic.pt", "B_img_analytic.pt", "A_txt_analytic.pt", "B_txt_analytic.pt")
PRIOR_FILE = "prior_precision_analytic.json"
# pairs behind the released CLIP factors: 10 class batches of 32,768 LAION-400M pairs
REFERENCE_N_DATA = 327_680


def read_bayesvlm_factors(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The four released factor matrices by file stem (``A_img``, ...), float64 on CPU."""
    factors = {}
    for name in FILES:
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} is missing: expected the files {FILES}.")
        value = torch.load(path, map_location="cpu", weights_only=True)
        if (
            not isinstance(value, torch.Tensor)
            or value.ndim != 2
            or value.shape[0] != value.shape[1]
        ):
            raise ValueError(f"{path} is not a square factor matrix.")
        factors[name.split("_analytic")[0]] = value.to(torch.float64)
    return factors


def load_bayesvlm(
    cls: type[DualEncoderLaplace],
    directory: str | os.PathLike,
    model: nn.Module | None = None,
    *,
    n_data: int = REFERENCE_N_DATA,
    pseudo_count: float = 10.0,
    prior_precision: str | float | torch.Tensor = "released",
    **kwargs: Any,
) -> DualEncoderLaplace:
    """A fitted ``DualEncoderLaplace`` from a BayesVLM hessian directory, without a fit.

    Parameters
    ----------
    directory : str
        folder with ``{A,B}_{img,txt}_analytic.pt`` and ``prior_precision_analytic.json``.
    model : nn.Module, optional
        the matching model (e.g. open_clip ViT-B-32 laion2b_s34b_b79k); else pass the heads
        as in feature mode (``image_projection=``, ``text_projection=``, ``logit_scale=``).
    n_data : int, default=327,680
        the pairs behind the released factors.
    pseudo_count : float, default=10
        the paper's ``n``; sets ``temperature = 1 / n``.
    prior_precision : 'released' or float or tensor
        'released' takes ``(lambda_img, lambda_txt)`` from the JSON (found at n = 1 with the
        reference's evidence objective: re-optimise for another ``n``).
    """
    factors = read_bayesvlm_factors(directory)
    if isinstance(prior_precision, str):
        with open(os.path.join(directory, PRIOR_FILE)) as f:
            prior = json.load(f)
        prior_precision = torch.tensor([prior["lambda_img"], prior["lambda_txt"]])
    la = cls(model, temperature=1.0 / pseudo_count, prior_precision=prior_precision, **kwargs)
    if any(la._has_bias):
        raise ValueError("the released CLIP factors are for heads without bias.")
    D_i, d_i, D_t, d_t = la._dims
    expected = {"A_img": d_i, "B_img": D_i, "A_txt": d_t, "B_txt": D_t}
    for name, dim in expected.items():
        if factors[name].shape[0] != dim:
            raise ValueError(
                f"{name} is {tuple(factors[name].shape)} but the model's head needs ({dim}, {dim}):"
                " these factors belong to another model."
            )
    root, dtype = math.sqrt(n_data), la.heads.image_projection.weight.dtype
    kron = Kron([[(factors[f"B_{m}"] * root).to(dtype), (factors[f"A_{m}"] / root).to(dtype)]
                 for m in ("img", "txt")])  # fmt: skip
    la._set_factors(FactorSums.from_kron(kron, n_data, loss=0.0))
    return la
