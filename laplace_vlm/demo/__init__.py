"""The offline digits demo: data, prompts, a small trained CLIP and the experiment.

``run`` (the experiment) is not imported here, so that reusing the data and the model does
not load the evaluation code.
"""

from __future__ import annotations

from laplace_vlm.demo.data import SEVERITIES, SHIFTS, load_digits_splits
from laplace_vlm.demo.prompts import CLASSNAMES, TEMPLATES
from laplace_vlm.demo.train import load_or_train_digits_clip

__all__ = [
    "CLASSNAMES",
    "SEVERITIES",
    "SHIFTS",
    "TEMPLATES",
    "load_digits_splits",
    "load_or_train_digits_clip",
]
