"""laplace-vlm: post-hoc Laplace uncertainty for CLIP and SigLIP, as a laplace-torch plugin.

Importing this package registers ``DualEncoderLaplace`` with laplace's factory under
``subset_of_weights="dual_encoder", hessian_structure="kron"``.
"""

from __future__ import annotations

import warnings
from importlib.metadata import PackageNotFoundError, version

with warnings.catch_warnings():
    # laplace imports asdl, whose torch.jit.script decorators warn on every import
    warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
    import laplace  # noqa: F401

from laplace_vlm.curvature import available_curvature_backends, register_curvature_backend
from laplace_vlm.dual_encoder_laplace import DualEncoderLaplace
from laplace_vlm.enums import (
    Contrastive,
    Direction,
    Link,
    LinkApprox,
    PosteriorForm,
    PredType,
    PriorStructure,
    TuningMethod,
)
from laplace_vlm.heads import DualHead
from laplace_vlm.predictive.links import probit_sigmoid, probit_softmax
from laplace_vlm.predictive.moments import probcosine
from laplace_vlm.tasks.estimator import ZeroShotEstimator

__all__ = [
    "Contrastive",
    "Direction",
    "DualEncoderLaplace",
    "DualHead",
    "Link",
    "LinkApprox",
    "PosteriorForm",
    "PredType",
    "PriorStructure",
    "TuningMethod",
    "ZeroShotEstimator",
    "available_curvature_backends",
    "probcosine",
    "probit_sigmoid",
    "probit_softmax",
    "register_curvature_backend",
]
try:
    __version__ = version("laplace-vlm")
except PackageNotFoundError:  # a source tree on sys.path without an install
    __version__ = "0+unknown"
