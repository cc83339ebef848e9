"""Input checks with errors that name the argument and what was expected.

Validation happens before anything reaches laplace's ``symeig``, which calls ``exit()`` on a
failed eigendecomposition (a NaN would otherwise end the user's interpreter with status 0).
Checks of tensors are in :mod:`.tensors`, of plain arguments (integers, switches,
generators, command-line numbers) in :mod:`.scalars`.
"""

from laplace_vlm.validation.scalars import (
    check_bool,
    check_generator,
    check_int,
    check_optional_int,
    positive_number,
)
from laplace_vlm.validation.tensors import (
    as_real_tensor,
    check_finite,
    check_has_data,
    check_labels,
    check_matrix,
    check_nonzero_norm,
    check_positive,
    check_probabilities,
)

__all__ = [
    "as_real_tensor",
    "check_bool",
    "check_finite",
    "check_generator",
    "check_has_data",
    "check_int",
    "check_labels",
    "check_matrix",
    "check_nonzero_norm",
    "check_optional_int",
    "check_positive",
    "check_probabilities",
    "positive_number",
]
