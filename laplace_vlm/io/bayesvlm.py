"""The curvature released with the paper's reference implementation (BayesVLM).

The released files hold ``A = sum a a^T / sqrt(N)`` and ``B = sum H / sqrt(N)`` per head
(a symmetric split of ``(sum a a^T) x (sum H) / N``) for N image-caption pairs, plus prior
precisions found with the reference's own evidence objective at pseudo-count 1. This module
only reads them; ``DualEncoderLaplace.from_bayesvlm`` turns them into a posterior.
"""

from __future__ import annotations

import json
import os

import torch

FILES = ("A_img_analytic.pt", "B_img_analytic.pt", "A_txt_analytic.pt", "B_txt_analytic.pt")
PRIOR_FILE = "prior_precision_analytic.json"
# pairs behind the released CLIP factors: 10 class batches of 32,768 LAION-400M pairs
REFERENCE_N_DATA = 327_680


def read_bayesvlm_factors(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The four released factor matrices by file stem (``A_img``, ...), float64 on CPU.

    Parameters
    ----------
    directory : str or os.PathLike
        the folder with ``A_img_analytic.pt``, ``B_img_analytic.pt``, ``A_txt_analytic.pt``
        and ``B_txt_analytic.pt`` (loaded with ``weights_only=True``).

    Returns
    -------
    dict of str to torch.Tensor
        ``{"A_img", "B_img", "A_txt", "B_txt"}``, square matrices.

    Raises
    ------
    FileNotFoundError
        if a file is missing.
    ValueError
        if a file does not hold a square matrix.
    """
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


def read_bayesvlm_prior(directory: str | os.PathLike) -> torch.Tensor:
    """The released prior precisions ``(lambda_img, lambda_txt)``, float64.

    They were found with the reference's own evidence objective at pseudo-count 1.

    Parameters
    ----------
    directory : str or os.PathLike
        the folder with ``prior_precision_analytic.json``.

    Returns
    -------
    torch.Tensor
        `(2,)` ``[lambda_img, lambda_txt]``.

    Raises
    ------
    FileNotFoundError
        if the file is missing.
    ValueError
        if it lacks numbers ``lambda_img`` and ``lambda_txt``.
    """
    path = os.path.join(directory, PRIOR_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: pass prior_precision= explicitly.")
    with open(path) as f:
        prior = json.load(f)
    try:
        values = [float(prior["lambda_img"]), float(prior["lambda_txt"])]
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path} must hold numbers lambda_img and lambda_txt ({err}).") from err
    return torch.tensor(values, dtype=torch.float64)
