"""The active-learning experiment on the demo data sets (``laplace-vlm active``).

Pool: a stratified subset of the training images, clean, plus a shifted copy of it (the shift
redrawn for every seed); with ``protocol="reference"`` the pool holds a copy in *every* shift
of :data:`laplace_vlm.experiments.recipe.SHIFTS` at the cell's severity (the reference's pool
is the training images of all domains). Target: shifted test images, whose inputs are the
unlabelled queries. The zero-shot posterior is the paper's method (``bayesvlm``): the demo
recipe's (:func:`laplace_vlm.experiments.recipe.fit_zero_shot_posterior`, fitted on the
held-out curvature split) in the symmetric form, at the config's pseudo-count (10) with the
marginal-likelihood prior, in feature mode. The runner is :mod:`laplace_vlm.active`.

The default target is chosen by a rule, not by its result: the embedded data set (digits,
no files needed) with its rotation shift, at the severity of the sweep's grid whose zero-shot
accuracy lies in 0.5-0.8, the range of real CLIP models on OfficeHome or ImageNet-R that the
paper studies, and, when several do, the one nearest 0.65, the middle of that range (rotation
0.1 / 0.2 / 0.3: 0.794 / 0.528 / 0.397 with the curvature split). The default strategy the
report judges is :data:`laplace_vlm.active.config.DEFAULT_STRATEGY` (EPIG), fixed before any
result.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from laplace_vlm import DualEncoderLaplace
from laplace_vlm.active import selection
from laplace_vlm.active.config import (
    DEFAULT_STRATEGY,
    ActiveLearningConfig,
    ActiveLearningProblem,
    option,
)
from laplace_vlm.active.experiment import run_experiment
from laplace_vlm.active.figures import learning_curves_figure, save_figure
from laplace_vlm.active.markdown import cell_markdown
from laplace_vlm.active.report import (
    beats_baselines,
    format_agreement,
    format_balance,
    format_differences,
    format_table,
    paired_differences,
    summarize,
)
from laplace_vlm.datasets.images import stratified_subset
from laplace_vlm.docstrings import fill_doc
from laplace_vlm.evaluation.markdown import write_new
from laplace_vlm.evaluation.pseudo_count import tune_prior_at
from laplace_vlm.experiments import recipe
from laplace_vlm.experiments.processes import run_in_processes

BASELINES: tuple[str, ...] = ("random", "map_entropy")
"""The paired comparisons of the report: targeted random and MAP entropy."""
# fixed shifts of the evaluation splits; the pool's shifted copy is redrawn per seed
_VAL_SEED, _TEST_SEED, _POOL_SEED = 10_001, 10_002, 20_000

# what one run of the experiment is given
_fill_doc = fill_doc.extend(
    cell="""
        setting : DemoSetting
            the cell: data set, target shift and sizes.
        config : ActiveLearningConfig
            the experiment.
        """,
    zero_shot_acc="""
        zero_shot_acc : float
            MAP zero-shot accuracy on the target.
        """,
)


@dataclass
class DemoSetting:
    """Which data an experiment runs on.

    Attributes
    ----------
    dataset : str
        one of :data:`laplace_vlm.experiments.recipe.DATASETS`.
    shift, severity : str, float
        the target domain: :data:`laplace_vlm.experiments.recipe.SHIFTS` at ``severity`` in [0, 1].
    max_pool, max_test : int
        clean pool images (the pool also holds their shifted copies) and target test inputs.
    cache_dir, data_dir : str, optional
        the trained CLIP's cache; Fashion-MNIST's idx files.
    train_seed : int
        training seed of the stand-in (0: the shipped model; others are trained into the
        cache on first use, minutes each); the splits, shifts and captions stay at seed 0.
    """

    dataset: str = field(default="digits", metadata=option("data set", choices=recipe.DATASETS))
    shift: str = field(default="rotation", metadata=option(
        "target shift", choices=tuple(recipe.SHIFTS)))  # fmt: skip
    severity: float = field(default=0.2, metadata=option("target shift severity in [0, 1]"))
    max_pool: int = field(default=1000, metadata=option("clean pool images (plus shifted copies)"))
    max_test: int = field(default=400, metadata=option("target test inputs (queries)"))
    cache_dir: str | None = field(default=None, metadata=option("cache of the demo CLIPs",
                                                                type=str))  # fmt: skip
    data_dir: str | None = field(default=None, metadata=option("Fashion-MNIST's folder",
                                                               type=str))  # fmt: skip
    train_seed: int = field(default=0, metadata=option(
        "training seed of the stand-in (0: the shipped one)", type=int))  # fmt: skip

    def __post_init__(self) -> None:
        if self.dataset not in recipe.DATASETS:
            raise ValueError(f"dataset must be one of {recipe.DATASETS}, got {self.dataset!r}.")
        if self.shift not in recipe.SHIFTS:
            raise ValueError(f"shift must be one of {tuple(recipe.SHIFTS)}, got {self.shift!r}.")
        if not 0.0 <= self.severity <= 1.0:
            raise ValueError(f"severity must lie in [0, 1], got {self.severity}.")
        for name in ("max_pool", "max_test"):
            if getattr(self, name) < 10:
                raise ValueError(f"{name} must be >= 10, got {getattr(self, name)}.")
        seed = self.train_seed
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"train_seed must be an int >= 0, got {self.train_seed!r}.")


@dataclass
class Prepared:
    """The zero-shot posterior, the problem of every seed and the zero-shot accuracy.

    Attributes
    ----------
    la : DualEncoderLaplace
        the zero-shot posterior (feature mode) at the config's ``pseudo_count``.
    problem : callable
        ``seed -> ActiveLearningProblem``; the pool's shifted half is re-drawn per seed
        (cached).
    zero_shot_acc : float
        MAP accuracy of ``la`` on the shifted target test set.
    """

    la: DualEncoderLaplace
    problem: Callable[[int], ActiveLearningProblem]
    zero_shot_acc: float


def feature_mode(la: DualEncoderLaplace) -> DualEncoderLaplace:
    """The same posterior without the model: copies are cheap and read activations only.

    Parameters
    ----------
    la : DualEncoderLaplace
        a fitted posterior (model or feature mode).

    Returns
    -------
    DualEncoderLaplace
        a feature-mode copy: ``la``'s heads and state, no model.
    """
    h = la.heads
    out = DualEncoderLaplace(None, image_projection=h.image_projection,
                             text_projection=h.text_projection, logit_scale=h.logit_scale,
                             logit_bias=h.logit_bias, contrastive=la.contrastive)  # fmt: skip
    out.load_state_dict(la.state_dict())
    return out


@functools.lru_cache(maxsize=2)
def _zero_shot(dataset: str, cache_dir: str | None, data_dir: str | None, train_seed: int = 0):
    """Model, splits, class texts and the fitted zero-shot posterior of ``dataset`` (cached)."""
    # another training draw on the same split (seed 0: the shipped stand-in)
    model, tokenizer = recipe.load_clip(dataset, cache_dir, train_config={"seed": train_seed},
                                        data_dir=data_dir)  # fmt: skip
    splits = recipe.load_splits(dataset, data_dir=data_dir)
    # the curvature comes from held-out pairs, not the ones the stand-in memorised
    la = recipe.fit_zero_shot_posterior(model, tokenizer, *splits["curvature"], seed=0,
                                        dataset=dataset)  # fmt: skip
    class_text = recipe.class_text_activations(model, tokenizer, dataset).detach()
    return model, splits, class_text, feature_mode(la)


def _subset(split, size: int):
    keep = stratified_subset(split[1], size, 0)
    return split[0][keep], split[1][keep]


@_fill_doc
def pool_shifts(setting: DemoSetting, config: ActiveLearningConfig) -> tuple[str, ...]:
    """The shifts of the pool's shifted copies of the training images.

    Parameters
    ----------
    %(cell)s

    Returns
    -------
    tuple of str
        the target's shift (rounds protocol), or every shift of ``recipe.SHIFTS`` (reference
        protocol; none on a clean cell, where every domain is the clean one).
    """
    if config.protocol != "reference":
        return (setting.shift,)
    return tuple(recipe.SHIFTS) if setting.severity > 0 else ()


def prepare(setting: DemoSetting, config: ActiveLearningConfig) -> Prepared:
    """The zero-shot posterior at ``config.pseudo_count`` and a ``seed -> problem`` factory.

    Parameters
    ----------
    setting : DemoSetting
        data set, target shift and sizes.
    config : ActiveLearningConfig
        its ``pseudo_count`` (the posterior before any label).

    Returns
    -------
    Prepared
        the posterior, the problem factory and the zero-shot accuracy.
    """
    model, splits, class_text, la0 = _zero_shot(setting.dataset, setting.cache_dir,
                                                setting.data_dir, setting.train_seed)  # fmt: skip
    la = copy.deepcopy(la0)
    tune_prior_at(la, config.pseudo_count)
    shift = recipe.SHIFTS[setting.shift]

    def encode(images: torch.Tensor, seed: int, how=shift) -> torch.Tensor:
        shifted = how(images, setting.severity, torch.Generator().manual_seed(seed))
        return recipe.encode_images(model, shifted).detach()

    # the reference's pool: the training images of every domain (clean and every shift)
    domains = [recipe.SHIFTS[name] for name in pool_shifts(setting, config)]

    pool_x, pool_y = _subset(splits["train"], setting.max_pool)
    test_x, test_y = _subset(splits["test"], setting.max_test)
    val_x, val_y = _subset(splits["val"], setting.max_test)
    clean = recipe.encode_images(model, pool_x).detach()
    test, val = encode(test_x, _TEST_SEED), encode(val_x, _VAL_SEED)

    @functools.lru_cache(maxsize=None)  # re-encoding a shifted pool costs a second
    def problem(seed: int) -> ActiveLearningProblem:
        shifted = [encode(pool_x, _POOL_SEED + 1000 * i + int(seed), how)
                   for i, how in enumerate(domains)]  # fmt: skip
        return ActiveLearningProblem(pool=torch.cat([clean, *shifted]),
                                     pool_labels=pool_y.repeat(1 + len(domains)), test=test,
                                     test_labels=test_y, class_text=class_text, val=val,
                                     val_labels=val_y)  # fmt: skip

    with torch.no_grad():
        probs = la({"image": test, "text": class_text}, pred_type="map")
    zero_shot = (probs.argmax(-1) == test_y).double().mean().item()
    return Prepared(la, problem, zero_shot)


def _run_seeds(setting: DemoSetting, config: ActiveLearningConfig) -> dict:
    """:func:`laplace_vlm.active.experiment.run_experiment` of a cell, prepared in this process."""
    prepared = prepare(setting, config)
    return run_experiment(prepared.la, prepared.problem, config)


@_fill_doc
def run_setting(setting: DemoSetting, config: ActiveLearningConfig, progress_bar: bool = False,
                workers: int = 1):  # fmt: skip
    """Prepare and run one experiment.

    Parameters
    ----------
    %(cell)s
    progress_bar : bool
        show progress (with one worker).
    workers : int
        processes running interleaved groups of the paired seeds (one torch thread each). A
        seed's run depends on its seed alone, so the results equal one process's.

    Returns
    -------
    summary : dict
        :func:`laplace_vlm.active.report.summarize` of the runs.
    prepared : Prepared
        the posterior and problems it ran on (``zero_shot_acc`` for the report).
    """
    prepared = prepare(setting, config)
    groups = [config.seeds[i::workers] for i in range(workers) if config.seeds[i::workers]]
    if len(groups) <= 1:
        results = run_experiment(prepared.la, prepared.problem, config, progress_bar=progress_bar)
        return summarize(results), prepared
    calls = [(setting, dataclasses.replace(config, seeds=g)) for g in groups]
    parts = run_in_processes(_run_seeds, calls, len(groups))
    # back in the config's seed order, so that every strategy's seeds stay paired
    position = {seed: (g, i) for g, group in enumerate(groups) for i, seed in enumerate(group)}
    results = {strategy: {budget: [parts[position[seed][0]][strategy][budget][position[seed][1]]
                                   for seed in config.seeds]
                          for budget in parts[0][strategy]}
               for strategy in config.strategies}  # fmt: skip
    return summarize(results), prepared


@_fill_doc
def describe(setting: DemoSetting, config: ActiveLearningConfig, zero_shot_acc: float) -> str:
    """One line naming the cell, the protocol and the label accounting.

    Parameters
    ----------
    %(cell)s
    %(zero_shot_acc)s

    Returns
    -------
    str
        the data set, target shift and severity, zero-shot accuracy, protocol, number of seeds
        and the labels validation may use.
    """
    labels = ("labelled support set only" if config.validation == "support"
              else "support set + the labelled target validation split")  # fmt: skip
    return (f"{setting.dataset}, target = {setting.shift} {setting.severity:g} (zero-shot "
            f"accuracy {zero_shot_acc:.3f}); protocol {config.protocol}; {len(config.seeds)} "
            f"paired seeds; validation and pseudo-count from the {labels}")  # fmt: skip


@_fill_doc
def report_text(
    summary: dict, setting: DemoSetting, config: ActiveLearningConfig, zero_shot_acc: float
) -> str:
    """The results table, the label balance and the paired differences to the baselines.

    Parameters
    ----------
    summary : dict
        :func:`laplace_vlm.active.report.summarize`'s output.
    %(cell)s
    %(zero_shot_acc)s

    Returns
    -------
    str
        :func:`describe`'s line, :func:`laplace_vlm.active.report.format_table`, the label
        entropy of the picks, one :func:`laplace_vlm.active.report.format_differences` per
        baseline and the verdict on the default strategy, blank-line separated.
    """
    parts = [describe(setting, config, zero_shot_acc), format_table(summary),
             format_balance(summary)]  # fmt: skip
    differences = {b: paired_differences(summary, b) for b in BASELINES if b in summary}
    parts += [format_differences(d, b) for b, d in differences.items()]
    if DEFAULT_STRATEGY in summary and len(differences) == len(BASELINES):
        verdict = beats_baselines(differences, DEFAULT_STRATEGY, BASELINES)
        parts.append(f"default strategy {DEFAULT_STRATEGY}: beats {' and '.join(BASELINES)} at "
                     f"every budget: {verdict['every_budget']}; by > 2 paired SE at the largest "
                     f"budget: {verdict['clear_at_largest']}")  # fmt: skip
    return "\n\n".join(parts)


@_fill_doc
def main(setting: DemoSetting, config: ActiveLearningConfig, json_path: Path | None = None,
         out: Path | None = None, progress_bar: bool = True, workers: int = 1,
         markdown: Path | None = None) -> int:  # fmt: skip
    """Run one experiment, print the report, write the JSON and the curves if asked.

    Parameters
    ----------
    %(cell)s
    json_path : Path, optional
        ``{"description", "zero_shot_acc", "mc_agreement", "summary": {strategy: {budget:
        {"acc_mean", "acc_std", "ece_mean", ...}}}}``.
    out : Path, optional
        folder for ``curves.png``.
    progress_bar : bool
        show progress.
    workers : int
        processes running groups of the paired seeds (:func:`run_setting`).
    markdown : Path, optional
        a new file for the tables (:func:`laplace_vlm.active.markdown.cell_markdown`).

    Returns
    -------
    %(exit_status)s
    """
    start = time.perf_counter()
    summary, prepared = run_setting(setting, config, progress_bar, workers)
    agreement = selection.mc_agreement(prepared.la, prepared.problem(0), config)
    print(report_text(summary, setting, config, prepared.zero_shot_acc))
    print(format_agreement(agreement))
    print(f"[{time.perf_counter() - start:.0f} s]")
    description = describe(setting, config, prepared.zero_shot_acc)
    if markdown is not None:
        write_new(markdown, cell_markdown(summary, description, BASELINES))
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"description": description,
                   "zero_shot_acc": prepared.zero_shot_acc, "mc_agreement": agreement,
                   "config": dataclasses.asdict(config), "summary": summary}  # fmt: skip
        json_path.write_text(json.dumps(payload, indent=2))
    if out is not None:
        title = f"{setting.dataset}, target = {setting.shift} {setting.severity:g}"
        save_figure(learning_curves_figure(summary, title=title), out / "curves.png")
    return 0
