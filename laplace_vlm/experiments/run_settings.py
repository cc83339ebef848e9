"""The JSON ``settings`` of a benchmark run: everything needed to read and reproduce its rows.

Besides the run's configuration and every method's fitted setting, it holds the regime card
(:mod:`laplace_vlm.evaluation.regime`) of the stand-in's posterior beside the released
ViT-B/32 factors'.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from laplace_vlm.datasets.shifts import SHIFTS
from laplace_vlm.evaluation.regime import posterior_card, reference_card
from laplace_vlm.experiments.experiment import Experiment
from laplace_vlm.experiments.methods import PAPER_METHOD, laplace_method

# the released ViT-B/32 factors beside a checkout (the project's shared folder); elsewhere the
# regime card falls back to their stored figures
REFERENCE_DIR = os.environ.get(
    "LAPLACE_VLM_REFERENCE", os.path.join("..", "shared", "reference", "bayesvlm-clip-vit-b-32")
)


def settings(
    exp: Experiment,
    alpha: float,
    severities: Sequence[float],
    pseudo_counts: Sequence[float],
    skipped: list[str],
    target_labels: int,
    test_acts: torch.Tensor,
    reference_dir: str | os.PathLike | None = REFERENCE_DIR,
) -> dict:
    """The JSON ``settings`` of a run: everything needed to read and reproduce its rows.

    Parameters
    ----------
    exp : Experiment
        the fitted experiment.
    alpha : float
        conformal miscoverage level.
    severities : sequence of float
        the shift severities.
    pseudo_counts : sequence of float
        the validation grid.
    skipped : list of str
        parts left out, with the reason.
    target_labels : int
        labelled target images of the recalibrated conformal baseline.
    test_acts : torch.Tensor
        `(N, d_img)` activations of the clean test images, already encoded by the run.
    reference_dir : path, optional
        the released ViT-B/32 factors for the regime card (stored figures where absent).

    Returns
    -------
    dict
        JSON-safe: data set, seed, alpha, split sizes, shifts and severities, methods and
        their predictive, form, pseudo-count and prior precision, temperature, the grid, the
        chosen pseudo-counts at an edge of it, validation NLPD per pseudo-count, the regime
        card of the stand-in and of ViT-B/32, and ``skipped``.
    """
    return {
        "dataset": exp.dataset,
        "seed": exp.seed,
        "alpha": alpha,
        "target_labels": target_labels,
        "sizes": {name: len(labels) for name, (_, labels) in exp.splits.items()},
        "shifts": list(SHIFTS),
        "severities": [float(s) for s in severities],
        "methods": list(exp.methods),
        "laplace_methods": {
            name: {"pred_type": m.pred_type, "link_approx": m.link_approx, "form": m.form}
            for name, m in exp.settings.items()
        },
        "mc_samples": exp.mc_samples,
        "temperature": exp.scaler.temperature,
        "pseudo_count_grid": [float(n) for n in pseudo_counts],
        "pseudo_counts": {m: s.setting.pseudo_count for m, s in exp.settings.items()},
        "pseudo_count_at_grid_edge": {m: c.at_edge for m, c in exp.choices.items()},
        "prior_precision": {m: s.setting.prior_precision.tolist() for m, s in exp.settings.items()},
        "validation_nlpd_by_pseudo_count": {
            m: {f"{n:g}": v for n, v in c.nlpd_by_pseudo_count.items()}
            for m, c in exp.choices.items()
        },
        "regime": regime(exp, test_acts, reference_dir),
        "skipped": skipped,
    }


def regime(
    exp: Experiment,
    test_acts: torch.Tensor,
    reference_dir: str | os.PathLike | None = REFERENCE_DIR,
) -> dict:
    """The regime card of the stand-in's posterior beside the released ViT-B/32 factors'.

    Parameters
    ----------
    exp : Experiment
        the fitted experiment; its symmetric posterior is left at the chosen setting.
    test_acts : torch.Tensor
        `(N, d_img)` activations of the clean test images (the relative variance's inputs).
    reference_dir : path, optional
        the released factors' folder.

    Returns
    -------
    dict
        ``{"stand_in": ..., "vit_b_32": ..., "map_temperature": T}``: the stand-in's card at
        the paper's and the chosen ``n`` in the paper's form (relative variance on the clean
        test images), ViT-B/32's, and the temperature scaling's ``T`` on clean validation.
    """
    name = laplace_method("probcosine")
    chosen = {"paper": exp.settings[PAPER_METHOD].setting, "chosen": exp.settings[name].setting}
    batches = exp.splits[exp.curvature_pairs][1].bincount().max().item()
    card = posterior_card(exp.la, test_acts, chosen, exp.la.n_data / batches)
    card["pseudo_count"] = {k: s.pseudo_count for k, s in chosen.items()}
    return {
        "stand_in": card,
        "vit_b_32": reference_card(reference_dir),
        "map_temperature": exp.scaler.temperature,
    }
