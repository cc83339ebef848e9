"""Valid options, as str-Enums in the style of ``laplace.utils.enums``.

Each option is accepted as the Enum member or as its plain string (``PredType.PROBCOSINE`` or
``"probcosine"``); objects store the plain string, so state dicts keep loading under
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

from enum import Enum
from typing import TypeVar

E = TypeVar("E", bound=Enum)


class PredType(str, Enum):
    """Valid options for ``pred_type``: how the posterior reaches the similarity logits.

    Extends ``laplace.PredType``: every laplace member (``GLM``, ``NN``, ``GP``) has its value
    here, so ``laplace.PredType.GLM`` and ``"glm"`` are accepted wherever ours are.
    """

    PROBCOSINE = "probcosine"
    """Moment matching of the cosine with the full embedding covariances (the default)."""

    PROBCOSINE_DIAG = "probcosine_diag"
    """The paper's ProbCosine with diagonal embedding covariances."""

    GLM = "glm"
    """laplace's linearised predictive (the logit linearised in the head weights)."""

    NN = "nn"
    """Weight samples pushed through the exact normalisation (needs ``link_approx='mc'``)."""

    MAP = "map"
    """The deterministic model at the posterior mean."""

    GP = "gp"
    """laplace's function-space predictive of ``FunctionalLaplace``: a member for laplace's
    sake, refused by the Kronecker ``DualEncoderLaplace`` with an error that says so."""


MOMENT_PRED_TYPES = (PredType.PROBCOSINE, PredType.PROBCOSINE_DIAG, PredType.GLM)
"""The pred types with analytic logit moments (``predictive_moments``)."""


class LinkApprox(str, Enum):
    """Valid options for ``link_approx``: how the logit distribution reaches probabilities.

    The members of ``laplace.LinkApprox``, with the same values.
    """

    PROBIT = "probit"
    """MacKay's probit approximation on the logit moments."""

    MC = "mc"
    """Monte Carlo over joint weight samples (or Gaussian logit samples for ProbCosine)."""

    BRIDGE = "bridge"
    """laplace's Laplace bridge."""

    BRIDGE_NORM = "bridge_norm"
    """laplace's normalised Laplace bridge."""


class Link(str, Enum):
    """Valid options for ``link``: a distribution over classes or per-pair probabilities."""

    SOFTMAX = "softmax"
    """One distribution over the classes of each image (CLIP's zero-shot classifier)."""

    SIGMOID = "sigmoid"
    """SigLIP's independent probability of each image-text pair."""


class Contrastive(str, Enum):
    """Valid options for ``contrastive``: the pair likelihood behind the curvature."""

    CLIP = "clip"
    """InfoNCE: a softmax over the other modality's items of the class batch."""

    SIGLIP = "siglip"
    """Pairwise sigmoid with a logit bias."""


class PriorStructure(str, Enum):
    """Valid options for ``prior_structure``: which parameters share a prior precision.

    laplace's ``PriorStructure`` members plus ``HEAD``.
    """

    SCALAR = "scalar"
    """One precision for all parameters."""

    HEAD = "head"
    """One precision per projection head (its weight and bias)."""

    LAYERWISE = "layerwise"
    """One precision per weight and bias tensor (laplace's layers)."""

    DIAG = "diag"
    """One precision per parameter: laplace's member, refused by a Kronecker posterior."""


class TuningMethod(str, Enum):
    """Valid options for ``method`` of ``optimize_prior_precision`` (laplace's members)."""

    MARGLIK = "marglik"
    """The evidence optimum."""

    GRIDSEARCH = "gridsearch"
    """The best validation loss on a logarithmic grid."""


class Direction(str, Enum):
    """Valid options for ``direction`` of retrieval."""

    IMAGE_TO_TEXT = "image_to_text"
    """Queries are the images, the gallery the texts."""

    TEXT_TO_IMAGE = "text_to_image"
    """Queries are the texts, the gallery the images."""


class PosteriorForm(str, Enum):
    """Valid options for ``damping``: how the prior enters a Kronecker-factored precision."""

    EXACT = "exact"
    """``damping=False``: ``h (F0 x F1) + delta I`` in the eigenbasis (exact prior)."""

    DAMPED = "damped"
    """``damping=True``: laplace's ``(sqrt(h) F0 + sqrt(delta) I) x (sqrt(h) F1 + sqrt(delta) I)``
    on its factor split ``[sum B, sum a a^T / N]``."""

    SYMMETRIC = "symmetric"
    """``damping="symmetric"``: the reference implementation's
    ``(sqrt(n) A + sqrt(delta) I) x (sqrt(n) B + sqrt(delta) I)`` on the split
    ``[sum B / sqrt(N), sum a a^T / sqrt(N)]``."""


def parse_option(enum: type[E], value: object, name: str) -> E:
    """``value`` as a member of ``enum``, or a ``ValueError`` naming ``name`` and the options.

    Parameters
    ----------
    enum : type of str-Enum
        the valid options.
    value : Enum member or str
        what the user passed.
    name : str
        the argument's name, for the error message.

    Returns
    -------
    Enum member
        ``value`` itself if it is a member, else ``enum(value)``.

    Raises
    ------
    ValueError
        if ``value`` is neither a member nor the value of one.
    """
    if isinstance(value, enum):
        return value
    options = tuple(m.value for m in enum)
    if isinstance(value, str) and value in options:
        return enum(value)
    raise ValueError(f"{name} must be one of {options}, got {value!r}.")


def plain(value: object) -> str:
    """A str-Enum member (ours or laplace's, e.g. ``laplace.PredType.GLM``) as its plain value.

    Parameters
    ----------
    value : Enum member or object
        an option; anything without ``.value`` is passed to ``str``.

    Returns
    -------
    str
        ``value.value`` for an Enum member, else ``str(value)``.
    """
    return str(getattr(value, "value", value))


def posterior_form(damping: object) -> PosteriorForm:
    """The ``damping`` argument (False, True or 'symmetric') as a :class:`PosteriorForm`.

    Parameters
    ----------
    damping : bool or str
        ``False`` (exact), ``True`` (damped) or ``'symmetric'``.

    Returns
    -------
    PosteriorForm
        ``EXACT``, ``DAMPED`` or ``SYMMETRIC``.

    Raises
    ------
    ValueError
        for any other value.
    """
    if isinstance(damping, bool):
        return PosteriorForm.DAMPED if damping else PosteriorForm.EXACT
    if damping == PosteriorForm.SYMMETRIC:
        return PosteriorForm.SYMMETRIC
    raise ValueError(f"damping must be False, True or 'symmetric', got {damping!r}.")


def damping_argument(form: PosteriorForm) -> bool | str:
    """The ``damping`` argument that builds ``form``: a plain bool or string, for state dicts.

    Parameters
    ----------
    form : PosteriorForm
        the posterior form.

    Returns
    -------
    bool or str
        ``False``, ``True`` or ``'symmetric'`` (the inverse of :func:`posterior_form`).
    """
    return form.value if form is PosteriorForm.SYMMETRIC else form is PosteriorForm.DAMPED
