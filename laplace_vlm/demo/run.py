"""The offline demo: zero-shot calibration of a digits CLIP, clean and under shift.

Steps: train (or load) the digits CLIP, encode every split once (feature mode), fit the KFAC
posterior of both heads on training image/caption pairs, choose the pseudo-count ``n`` of each
Laplace method on the validation split (the prior precision is re-optimised by the marginal
likelihood at every ``n``), fit the temperature-scaling baseline on the same split, then
evaluate zero-shot on the test split, clean and under each shift and severity.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from laplace_vlm.adapters import get_adapter
from laplace_vlm.evaluation.calibration import TemperatureScaling
from laplace_vlm.demo.data import SEVERITIES, SHIFTS, load_digits_splits
from laplace_vlm.demo.prompts import CLASSNAMES, TEMPLATES, captions
from laplace_vlm.demo.train import class_unique_batches, load_or_train_digits_clip, torch_threads
from laplace_vlm.dual_encoder_laplace import DualEncoderLaplace
from laplace_vlm.adapters.features import extract_features
from laplace_vlm.evaluation.metrics import classification_metrics, nlpd
from laplace_vlm.evaluation.plots import reliability_diagram, shift_plot
from laplace_vlm.tasks.zeroshot import ZeroShotClassifier

# method -> (pred_type, link_approx) of the Laplace predictive
LAPLACE_METHODS: dict[str, tuple[str, str]] = {
    "laplace_glm": ("glm", "probit"),
    "laplace_probcosine": ("probcosine", "probit"),
    "laplace_mc": ("glm", "mc"),
}
METHODS: tuple[str, ...] = ("map", "temperature", *LAPLACE_METHODS)
PSEUDO_COUNTS: tuple[float, ...] = (1, 3, 10, 30, 100, 300, 1000, 3000, 10000, 30000)
MC_SAMPLES = 100
METRIC_KEYS: tuple[str, ...] = ("acc", "nlpd", "ece", "auroc", "brier")


@dataclass
class Setting:
    """Posterior hyperparameters of one Laplace method, chosen on the validation split."""

    pseudo_count: float
    prior_precision: torch.Tensor


def encode_images(model, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """`(N, 3, 32, 32)` images -> `(N, d_img)` pre-projection activations."""
    batches = ({"image": images[i : i + batch_size]} for i in range(0, len(images), batch_size))
    return extract_features(model, batches).image.activations


def fit_posterior(model, tokenizer, images, labels, seed: int) -> DualEncoderLaplace:
    """KFAC posterior of both heads from the training pairs, one seeded caption per image.

    Class batches hold one pair per digit, as in training: each image's classes are the ten
    captions of its batch, the zero-shot problem the posterior is used for.
    """
    generator = torch.Generator().manual_seed(seed)
    tokens = tokenizer(captions(labels, generator))
    pairs = extract_features(model, DataLoader(TensorDataset(images, tokens), 512))
    acts_img, acts_txt = pairs.image.activations, pairs.text.activations
    batches = class_unique_batches(labels, generator)
    la = DualEncoderLaplace(model, contrastive="clip")
    la.fit([(acts_img[b], acts_txt[b]) for b in batches])
    return la


def apply_setting(la: DualEncoderLaplace, setting: Setting) -> None:
    la.temperature = 1.0 / setting.pseudo_count
    la.prior_precision = setting.prior_precision


def select_settings(
    clf: ZeroShotClassifier,
    val_acts: torch.Tensor,
    val_labels: torch.Tensor,
    pseudo_counts: tuple[float, ...] = PSEUDO_COUNTS,
) -> dict[str, Setting]:
    """For every Laplace method, the pseudo-count of lowest validation NLPD.

    At each pseudo-count the prior precision (one per head) maximises the marginal likelihood.
    """
    la, best = clf.la, {}
    scores = {method: [] for method in LAPLACE_METHODS}
    for n in pseudo_counts:
        la.temperature, la.prior_precision = 1.0 / n, 1.0
        la.optimize_prior_precision(method="marglik", prior_structure="layerwise")
        setting = Setting(n, la.prior_precision.detach().clone())
        for method, (pred_type, link) in LAPLACE_METHODS.items():
            probs = clf.predict(
                val_acts, pred_type=pred_type, link_approx=link, n_samples=MC_SAMPLES
            ).probs
            scores[method].append((nlpd(probs, val_labels), setting))
    for method, candidates in scores.items():
        best[method] = min(candidates, key=lambda item: item[0])[1]
    return best


def predict_methods(
    clf: ZeroShotClassifier,
    scaler: TemperatureScaling,
    settings: dict[str, Setting],
    image_acts: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """`(N, C)` probabilities of every method in ``METHODS``."""
    map_logits = clf.predict(image_acts, pred_type="map").logit_mean
    probs = {"map": torch.softmax(map_logits, -1), "temperature": scaler(map_logits)}
    for method, (pred_type, link) in LAPLACE_METHODS.items():
        apply_setting(clf.la, settings[method])
        probs[method] = clf.predict(
            image_acts, pred_type=pred_type, link_approx=link, n_samples=MC_SAMPLES
        ).probs
    return probs


def shifted_test_sets(images: torch.Tensor, seed: int, severities: tuple[float, ...] = SEVERITIES):
    """``(shift, severity, images)`` for every shift and severity, seeded per shift."""
    for index, (shift, transform) in enumerate(SHIFTS.items()):
        generator = torch.Generator().manual_seed(seed * 1000 + index)
        for severity in severities:
            yield shift, severity, transform(images, severity, generator)


@dataclass
class DemoResult:
    """What the demo measured.

    Attributes
    ----------
    results : dict
        ``{"shift": {"severity": {"method": {"acc", "nlpd", "ece", "auroc", "brier"}}}}``;
        the clean test split is shift ``"clean"``, severity ``"0"``.
    pseudo_counts : dict
        Laplace method -> pseudo-count chosen on the validation split.
    temperature : float
        the temperature-scaling baseline's T.
    """

    results: dict
    pseudo_counts: dict[str, float]
    temperature: float


def run_demo(
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    out_dir: str | os.PathLike | None = None,
    json_path: str | os.PathLike | None = None,
    progress_bar: bool = True,
    train_config: dict | None = None,
    severities: tuple[float, ...] = SEVERITIES,
    pseudo_counts: tuple[float, ...] = PSEUDO_COUNTS,
) -> DemoResult:
    """Run the whole experiment (prints nothing but progress bars).

    Parameters
    ----------
    seed : int
        seed of the data split, the model's training, the captions, the class batches and the
        shifts (a seed other than 0 trains and caches its own model on its own split).
    cache_dir : path, optional
        cache of the trained model (see ``load_or_train_digits_clip``).
    out_dir : path, optional
        where the PNG plots go; no plots if None.
    json_path : path, optional
        where ``DemoResult.results`` goes as JSON.
    progress_bar : bool
    train_config : dict, optional
        overrides of the training set-up (tests use a tiny budget).
    severities : tuple of float
        shift severities to evaluate, in ``(0, 1]``.
    pseudo_counts : tuple of float
        the validation grid of the pseudo-count ``n``.

    Returns
    -------
    result : DemoResult
    """
    # one thread: the toy model's GEMMs gain nothing from more, and they stall on busy cores
    with torch_threads(1):
        splits = load_digits_splits(seed)
        train_config = {"seed": seed, **(train_config or {})}
        model, tokenizer = load_or_train_digits_clip(cache_dir, progress_bar, train_config)
        (train_x, train_y), (val_x, val_y), (test_x, test_y) = (
            splits[name] for name in ("train", "val", "test")
        )
        la = fit_posterior(model, tokenizer, train_x, train_y, seed)
        clf = ZeroShotClassifier.from_prompts(
            la, get_adapter(model), tokenizer, CLASSNAMES, TEMPLATES
        )
        val_acts = encode_images(model, val_x)
        scaler = TemperatureScaling().fit(clf.predict(val_acts, pred_type="map").logit_mean, val_y)
        settings = select_settings(clf, val_acts, val_y, pseudo_counts)

        test_sets = [("clean", 0, test_x), *shifted_test_sets(test_x, seed, severities)]
        results: dict = {}
        clean_probs = None
        for shift, severity, images in tqdm(test_sets, desc="evaluating", disable=not progress_bar):
            probs = predict_methods(clf, scaler, settings, encode_images(model, images))
            clean_probs = probs if shift == "clean" else clean_probs
            results.setdefault(shift, {})[_severity_key(severity)] = {
                method: _metrics(p, test_y) for method, p in probs.items()
            }
    if out_dir is not None:
        write_plots(results, clean_probs, test_y, out_dir)
    if json_path is not None:
        write_json(results, json_path)
    pseudo_counts = {method: s.pseudo_count for method, s in settings.items()}
    return DemoResult(results, pseudo_counts, scaler.temperature)


def _severity_key(severity: float) -> str:
    return "0" if severity == 0 else f"{severity:g}"


def _metrics(probs: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    metrics = classification_metrics(probs, labels)
    return {key: metrics[key] for key in METRIC_KEYS}


def write_plots(results: dict, clean_probs: dict, labels: torch.Tensor, out_dir) -> list[Path]:
    """Reliability diagrams on clean test data and metric-vs-severity plots."""
    out = Path(out_dir)
    paths = [
        reliability_diagram(clean_probs, labels, out / "reliability_clean.png", title="clean test")
    ]
    for metric in ("ece", "nlpd", "acc", "auroc"):
        paths.append(shift_plot(results, metric, out / f"shift_{metric}.png"))
    return paths


def write_json(results: dict, path) -> Path:
    """Results as strict JSON (an undefined AUROC becomes null)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean = json.loads(json.dumps(results), parse_constant=lambda _: None)
    path.write_text(json.dumps(clean, indent=2, allow_nan=False))
    return path


def format_table(results: dict, metrics: tuple[str, ...] = METRIC_KEYS) -> str:
    """A fixed-width table: one row per (shift, severity, method)."""
    header = f"{'shift':<9} {'sev':>4}  {'method':<19}" + "".join(f"{m:>8}" for m in metrics)
    rows = [header, "-" * len(header)]
    for shift, by_severity in results.items():
        for severity, by_method in by_severity.items():
            for method, values in by_method.items():
                cells = "".join(_cell(values[m]) for m in metrics)
                rows.append(f"{shift:<9} {severity:>4}  {method:<19}{cells}")
    return "\n".join(rows)


def _cell(value: float | None) -> str:
    return f"{'nan':>8}" if value is None or math.isnan(value) else f"{value:>8.4f}"
