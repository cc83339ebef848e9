"""The regime card: the figures that place a posterior against the paper's ViT-B/32 posterior.

A small stand-in CLIP can sit in a very different regime from a real one: a different logit
scale, far fewer curvature pairs and in-batch classes, a model that has memorised its pairs.
The card states, for one fitted posterior, the numbers that decide how wide its predictive
is, next to the same numbers for the factors released with the paper for CLIP ViT-B/32:

- ``logit_scale`` (``exp`` of the log scale), ``embedding_dim``;
- ``curvature_pairs`` and ``in_batch_classes`` of the fit;
- ``trace_B_per_pair`` per head: ``tr(sum_i H_i) / N``, the output-side GGN of one pair;
- ``trace_A_per_pair`` per head: ``tr(sum_i a_i a_i^T) / N``, the mean squared activation;
- ``relative_variance`` per named setting: the median over inputs of
  ``tr Cov[z] / ||z||^2`` of the image embedding (the posterior's width relative to the
  embedding it perturbs, which is what the cosine sees).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

from laplace_vlm.io.bayesvlm import REFERENCE_N_DATA, read_bayesvlm_factors

# ViT-B/32 figures measured once on the released factors with open_clip's real heads (not
# shipped here): the median relative image-embedding variance at n = 10 in the symmetric form
REFERENCE_RELATIVE_VARIANCE = 0.029
REFERENCE_LOGIT_SCALE = 100.0
REFERENCE_IN_BATCH_CLASSES = 32_768


def relative_variance(la: Any, image_acts: torch.Tensor) -> float:
    """Median over inputs of ``tr Cov[z] / ||z||^2`` of the image embedding.

    Parameters
    ----------
    la : DualEncoderLaplace
        a fitted posterior at the setting to measure (temperature and prior as they are).
    image_acts : torch.Tensor
        `(N, d_img)` pre-projection image activations.

    Returns
    -------
    float
        the median relative variance.
    """
    text = torch.zeros(1, la.heads.in_features("text"), dtype=image_acts.dtype)
    with torch.no_grad():
        z, var = la.embedding_moments({"image": image_acts, "text": text})["image"]
    return (var.sum(-1) / z.square().sum(-1)).median().item()


def posterior_card(
    la: Any,
    image_acts: torch.Tensor,
    settings: Mapping[str, Any],
    in_batch_classes: float,
) -> dict[str, Any]:
    """The regime card of a fitted posterior.

    Parameters
    ----------
    la : DualEncoderLaplace
        fitted; left at the last of ``settings``.
    image_acts : torch.Tensor
        `(N, d_img)` activations of the inputs the relative variance is measured on.
    settings : mapping of str to PosteriorSetting
        name -> setting (``apply(la)`` sets its temperature and prior); e.g. the paper's
        ``n = 10`` and the chosen ``n``.
    in_batch_classes : float
        the mean number of classes (pairs) of the class batches of the fit.

    Returns
    -------
    dict
        JSON-safe: the figures listed in the module docstring.
    """
    sums = la.factor_sums()
    n = int(sums.n)
    card = {
        "logit_scale": float(la.heads.scale),
        "embedding_dim": int(sums.B_image.shape[0]),
        "curvature_pairs": n,
        "in_batch_classes": float(in_batch_classes),
        "trace_B_per_pair": {
            "image": float(sums.B_image.trace()) / n,
            "text": float(sums.B_text.trace()) / n,
        },
        "trace_A_per_pair": {
            "image": float(sums.A_image.trace()) / n,
            "text": float(sums.A_text.trace()) / n,
        },
        "relative_variance": {},
    }
    for name, setting in settings.items():
        setting.apply(la)
        card["relative_variance"][name] = relative_variance(la, image_acts)
    return card


def reference_card(directory: str | os.PathLike | None) -> dict[str, Any]:
    """The same figures for the released CLIP ViT-B/32 factors.

    The traces are computed from the released files where ``directory`` holds them (they
    store ``sum / sqrt(N)``), else stored; the relative variance needs the real heads, which
    are not shipped, so it is always the stored measurement.

    Parameters
    ----------
    directory : path or None
        the folder of the released factors (``read_bayesvlm_factors``).

    Returns
    -------
    dict
        as :func:`posterior_card`, plus ``"source"``: ``"files"`` or ``"stored"``.
    """
    card: dict[str, Any] = {
        "logit_scale": REFERENCE_LOGIT_SCALE,
        "embedding_dim": 512,
        "curvature_pairs": REFERENCE_N_DATA,
        "in_batch_classes": float(REFERENCE_IN_BATCH_CLASSES),
        "relative_variance": {"paper": REFERENCE_RELATIVE_VARIANCE},
    }
    try:
        factors = read_bayesvlm_factors(directory) if directory is not None else None
    except FileNotFoundError:
        factors = None
    if factors is None:
        # the traces of the released files divided by sqrt(N) (their README's statistics)
        traces = {"B_img": 6128.3, "B_txt": 9389.5, "A_img": 564881.7, "A_txt": 335626.2}
        card["source"] = "stored"
    else:
        traces = {k: float(v.trace()) for k, v in factors.items()}
        card["source"] = "files"
    root = REFERENCE_N_DATA**0.5  # a released factor is sum / sqrt(N)
    for factor in ("B", "A"):
        card[f"trace_{factor}_per_pair"] = {
            "image": traces[f"{factor}_img"] / root,
            "text": traces[f"{factor}_txt"] / root,
        }
    return card


def format_regime(regime: Mapping[str, Any]) -> str:
    """The regime card as a text table: the stand-in beside ViT-B/32.

    Parameters
    ----------
    regime : mapping
        ``{"stand_in": card, "vit_b_32": card, "map_temperature": T}`` (a benchmark's
        ``settings["regime"]``).

    Returns
    -------
    str
        one line per figure, the two cards in columns.
    """
    ours, ref = regime["stand_in"], regime["vit_b_32"]
    n = ours.get("pseudo_count", {})
    lines = [
        f"{'regime':42s} {'stand-in':>12s} {'ViT-B/32':>12s}",
        f"{'logit scale':42s} {ours['logit_scale']:12.2f} {ref['logit_scale']:12.2f}",
        f"{'embedding dim':42s} {ours['embedding_dim']:12d} {ref['embedding_dim']:12d}",
        f"{'curvature pairs':42s} {ours['curvature_pairs']:12d} {ref['curvature_pairs']:12d}",
        f"{'in-batch classes':42s} {ours['in_batch_classes']:12.1f} "
        f"{ref['in_batch_classes']:12.0f}",
    ]
    for factor in ("B", "A"):
        for head in ("image", "text"):
            label = f"tr {factor} per pair, {head} head"
            lines.append(
                f"{label:42s} {ours[f'trace_{factor}_per_pair'][head]:12.4g} "
                f"{ref[f'trace_{factor}_per_pair'][head]:12.4g}"
            )
    for key, value in ours["relative_variance"].items():
        label = f"median tr Cov[z]/|z|^2, {key} n = {n.get(key, float('nan')):g}"
        other = ref["relative_variance"].get(key)
        lines.append(f"{label:42s} {value:12.4g} {'' if other is None else f'{other:12.4g}'}")
    lines.append(f"{'MAP temperature (clean validation)':42s} {regime['map_temperature']:12.3f}")
    return "\n".join(lines)
