"""The methods an experiment compares: their names, predictives, posterior forms and settings.

``map`` and ``temperature`` are deterministic; every other method is a :class:`LaplaceMethod`:
``PAPER_METHOD`` (the paper's posterior at ``PAPER_PSEUDO_COUNT``), ``laplace_<pred_type>``
for each of ``LAPLACE_PREDICTIVES`` at the pseudo-count chosen on validation, and
``EXACT_METHOD`` in laplace's exact-prior form.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from laplace_vlm.evaluation.pseudo_count import PosteriorSetting

# pred_type -> link of each Laplace predictive: the default, the linearised one, exact MC
LAPLACE_PREDICTIVES: dict[str, str] = {"probcosine": "probit", "glm": "probit", "nn": "mc"}
PAPER_PSEUDO_COUNT = 10.0
PAPER_METHOD = "bayesvlm"
# the posterior forms compared: the paper's (the class default) and laplace's exact prior
FORMS: dict[str, bool | str] = {"symmetric": "symmetric", "exact": False}
EXACT_METHOD = "laplace_probcosine_exact"
MC_SAMPLES = 200


def laplace_method(pred_type: str) -> str:
    """``"laplace_<pred_type>"``: the name of a predictive at its validation-chosen pseudo-count.

    Parameters
    ----------
    pred_type : str
        a key of ``LAPLACE_PREDICTIVES``.

    Returns
    -------
    str
        the method's name, e.g. ``"laplace_glm"``.
    """
    return f"laplace_{pred_type}"


@dataclass
class LaplaceMethod:
    """One Laplace method: a predictive, a posterior form and its setting.

    Attributes
    ----------
    pred_type : str
        a key of ``LAPLACE_PREDICTIVES``.
    form : str
        a key of ``FORMS``.
    setting : PosteriorSetting
        pseudo-count and prior precision.
    """

    pred_type: str
    form: str
    setting: PosteriorSetting

    @property
    def link_approx(self) -> str:
        """The link of :attr:`pred_type` (``LAPLACE_PREDICTIVES``)."""
        return LAPLACE_PREDICTIVES[self.pred_type]


def predictive_kwargs(seed: int, mc_samples: int = MC_SAMPLES) -> dict[str, dict]:
    """``la(x, **kwargs)`` of every Laplace predictive, named by method.

    Parameters
    ----------
    seed : int
        seed of the one generator all Monte Carlo predictives draw from.
    mc_samples : int
        samples of the Monte Carlo predictive.

    Returns
    -------
    dict of str to dict
        :func:`laplace_method` -> ``pred_type``, ``link_approx`` and, for Monte Carlo,
        ``n_samples`` and the shared ``generator``.
    """
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for pred_type, link in LAPLACE_PREDICTIVES.items():
        kwargs = {"pred_type": pred_type, "link_approx": link}
        if link == "mc":
            kwargs.update(n_samples=mc_samples, generator=generator)
        out[laplace_method(pred_type)] = kwargs
    return out
