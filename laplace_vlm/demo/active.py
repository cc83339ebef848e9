"""The active-learning experiment on the embedded digits demo (``laplace-vlm active``).

Pool: clean plus shifted training digits; target: shifted test digits. The runner itself is
:mod:`laplace_vlm.active.loop`.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from laplace_vlm.active.loop import (
    DEFAULT_STRATEGIES,
    STRATEGIES,
    TARGETING,
    ActiveLearningConfig,
    ActiveLearningProblem,
    format_table,
    plot_learning_curves,
    run_experiment,
    select_pseudo_count,
    summarize,
)
from laplace_vlm.active.adaptation import class_distinct_batches


@dataclass
class DigitsSetting:
    """The digits demo: pool = clean + shifted training images, target = shifted test images."""

    shift: str = "rotation"
    severity: float = 0.4
    pseudo_count: float | None = None
    cache_dir: str | None = None


def digits_setup(setting: DigitsSetting, progress_bar: bool = False):
    """The zero-shot posterior and a ``seed -> ActiveLearningProblem`` factory for the digits demo.

    The posterior is fitted on the CLIP's own training pairs (clean training images with
    random captions, one pair per digit in each class batch, as in training), temperature
    ``1 / pseudo_count`` (None: chosen by :func:`select_pseudo_count` on the labelled target
    validation split), prior precision by marginal likelihood per head. Each seed redraws
    the shift of the pool's shifted copy (validation and test shifts stay fixed).

    Returns
    -------
    la : DualEncoderLaplace
        the zero-shot posterior (feature mode).
    problem : callable
        ``seed -> ActiveLearningProblem`` (cached per seed).
    """
    from laplace_vlm import DualEncoderLaplace
    from laplace_vlm.adapters import get_adapter
    from laplace_vlm.demo.data import SHIFTS, load_digits_splits
    from laplace_vlm.demo.prompts import CLASSNAMES, TEMPLATES, captions
    from laplace_vlm.demo.train import load_or_train_digits_clip
    from laplace_vlm.adapters.features import extract_features
    from laplace_vlm.tasks.zeroshot import class_text_activations

    if setting.shift not in SHIFTS:
        raise ValueError(f"shift must be one of {sorted(SHIFTS)}, got {setting.shift!r}.")
    if setting.pseudo_count is not None and setting.pseudo_count <= 0:
        raise ValueError(f"pseudo_count must be positive, got {setting.pseudo_count}.")
    model, tokenizer = load_or_train_digits_clip(setting.cache_dir, progress_bar=progress_bar)
    adapter = get_adapter(model)
    splits = load_digits_splits(seed=0)  # the split the demo CLIP was trained on

    def encode(images: torch.Tensor) -> torch.Tensor:
        batches = [(images[i : i + 256], torch.zeros(len(images[i : i + 256]), dtype=torch.long))
                   for i in range(0, len(images), 256)]  # fmt: skip
        return extract_features(adapter, batches).image.activations

    shift = SHIFTS[setting.shift]
    class_text, _ = class_text_activations(adapter, tokenizer, CLASSNAMES, TEMPLATES)
    train_x, train_y = splits["train"]
    clean = encode(train_x)
    caps = tokenizer(captions(train_y, torch.Generator().manual_seed(0)))
    caption_acts = torch.cat(
        [adapter.encode_text(caps[i : i + 256]).activations for i in range(0, len(caps), 256)]
    )
    # one pair per digit in a class batch, as the demo CLIP was trained: no false negatives
    batches = class_distinct_batches(train_y, torch.Generator().manual_seed(0))
    pairs = [(clean[b], caption_acts[b]) for b in batches]
    la = DualEncoderLaplace(
        None,
        "classification",
        image_projection=adapter.image_head.weight,
        text_projection=adapter.text_head.weight,
        logit_scale=adapter.logit_scale,
    )
    la.fit(pairs, progress_bar=progress_bar)
    val_x, val_y = splits["val"]
    test_x, test_y = splits["test"]
    val = encode(shift(val_x, setting.severity, torch.Generator().manual_seed(10_001)))
    test = encode(shift(test_x, setting.severity, torch.Generator().manual_seed(10_002)))
    if setting.pseudo_count is None:
        select_pseudo_count(la, (val, val_y), class_text)
    else:
        la.temperature = 1.0 / setting.pseudo_count
        la.optimize_prior_precision(method="marglik", prior_structure="layerwise")

    @functools.lru_cache(maxsize=None)  # re-encoding a shifted pool costs seconds
    def problem(seed: int) -> ActiveLearningProblem:
        g = torch.Generator().manual_seed(20_000 + int(seed))
        shifted = encode(shift(train_x, setting.severity, g))
        return ActiveLearningProblem(
            pool=torch.cat([clean, shifted]),
            pool_labels=torch.cat([train_y, train_y]),
            val=val,
            val_labels=val_y,
            test=test,
            test_labels=test_y,
            class_text=class_text,
        )

    return la, problem


# --------------------------------------------------------------------------- CLI


def configure_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of ``laplace-vlm active`` (the digits demo)."""
    parser.description = (
        "Active few-shot adaptation on the digits demo: pool = clean + shifted training "
        "images, target = shifted test images; accuracy/ECE/NLPD vs labelled budget."
    )
    parser.add_argument("--json", type=Path, default=None, help="write the summary here")
    parser.add_argument("--plot", type=Path, default=None, help="accuracy-vs-budget PNG")
    parser.add_argument(
        "--strategies",
        default=",".join(DEFAULT_STRATEGIES),
        help=f"comma-separated subset of {','.join(STRATEGIES)}",
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--budget", type=int, default=20, help="labels per round")
    parser.add_argument("--seeds", type=int, default=10, help="number of seeds (0..n-1)")
    parser.add_argument("--shift", default="rotation", help="noise | rotation | invert")
    parser.add_argument("--severity", type=float, default=0.4)
    parser.add_argument("--targeting", choices=TARGETING, default="wasserstein")
    parser.add_argument("--k", type=int, default=1, help="pool neighbours per target")
    parser.add_argument("--class-balanced", action="store_true")
    parser.add_argument(
        "--pseudo-count",
        type=float,
        default=None,
        help="n = 1/temperature (default: lowest NLPD on the target validation split)",
    )
    parser.add_argument("--n-samples", type=int, default=200, help="samples for BALD/EPIG")
    parser.add_argument("--predictive", default="probcosine")
    parser.add_argument(
        "--recalibrate",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="re-choose the pseudo-count on the validation split after every round",
    )
    parser.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate")
    parser.add_argument("--epochs", type=int, default=300, help="maximum fine-tuning epochs")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (the matrices are tiny: 1 is fastest)"
    )
    parser.add_argument("--cache-dir", default=None, help="where the demo CLIP is cached")
    parser.add_argument("--progress-bar", action=argparse.BooleanOptionalAction, default=True)
    return parser


def main(args: argparse.Namespace) -> int:
    """Run ``laplace-vlm active``; prints the results table, writes JSON / PNG if asked."""
    if args.threads < 1:
        raise ValueError(f"threads must be >= 1, got {args.threads}.")
    previous = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _main(args)
    finally:
        torch.set_num_threads(previous)


def _main(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    config = ActiveLearningConfig(
        strategies=tuple(s.strip() for s in args.strategies.split(",") if s.strip()),
        rounds=args.rounds,
        budget=args.budget,
        seeds=tuple(range(args.seeds)),
        targeting=args.targeting,
        k=args.k,
        class_balanced=args.class_balanced,
        n_samples=args.n_samples,
        predictive=args.predictive,
        lr=args.lr,
        epochs=args.epochs,
        recalibrate=args.recalibrate,
    )
    setting = DigitsSetting(args.shift, args.severity, args.pseudo_count, cache_dir=args.cache_dir)
    la, problem = digits_setup(setting, progress_bar=args.progress_bar)
    results = run_experiment(la, problem, config, progress_bar=args.progress_bar)
    summary = summarize(results)
    print(format_table(summary))
    print(f"[{setting.shift} severity {setting.severity}, pseudo-count {1 / la.temperature:g}, "
          f"{len(config.seeds)} seeds, "
          f"{time.perf_counter() - start:.0f} s]")  # fmt: skip
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2))
    if args.plot is not None:
        title = f"digits, target = {setting.shift} {setting.severity}"
        plot_learning_curves(summary, args.plot, title=title)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main(configure_parser(argparse.ArgumentParser()).parse_args()))
