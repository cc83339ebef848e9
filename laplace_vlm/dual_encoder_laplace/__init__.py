"""The class users import: KFAC Laplace over the two projection heads of a dual encoder."""

from laplace_vlm.dual_encoder_laplace.core import DualEncoderLaplace

__all__ = ["DualEncoderLaplace"]
