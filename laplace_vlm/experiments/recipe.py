"""The one demo recipe: data splits, the trained CLIP, activations and the zero-shot posterior.

Every experiment of the package (the demo, the benchmark, active learning) builds on these
functions, so all of them see the same data, the same model and the same posterior:

>>> splits = load_splits("digits")
>>> model, tokenizer = load_clip("digits")
>>> la = fit_zero_shot_posterior(model, tokenizer, *splits["curvature"], seed=0, dataset="digits")
>>> x = {"image": encode_images(model, splits["test"][0]),
...      "text": class_text_activations(model, tokenizer, "digits")}
>>> probs = la(x)

Data sets: ``"digits"`` (scikit-learn's 1,797 8x8 digits, embedded) and ``"fashion-mnist"``
(the four idx files of the release, see :mod:`laplace_vlm.datasets.fashion_mnist`).
"""

from __future__ import annotations

import os
from dataclasses import asdict

import torch
from torch.utils.data import DataLoader, TensorDataset

from laplace_vlm.adapters import get_adapter
from laplace_vlm.adapters.features import extract_features
from laplace_vlm.datasets.digits import load_digits_splits
from laplace_vlm.datasets.fashion_mnist import load_fashion_mnist_splits
from laplace_vlm.datasets.images import Split, normalize, stratified_subset
from laplace_vlm.datasets.prompts import (
    DATASETS,
    captions,
    classnames,
    prompts_of,
    templates,
)
from laplace_vlm.datasets.shifts import SEVERITIES, SHIFTS
from laplace_vlm.docstrings import fill_doc
from laplace_vlm.dual_encoder_laplace import DualEncoderLaplace
from laplace_vlm.standins import cache, shipped, training
from laplace_vlm.standins.training import class_distinct_batches, torch_threads
from laplace_vlm.tasks import zeroshot

__all__ = [
    "DATASETS",
    "MAX_EVAL",
    "MAX_TRAIN",
    "SEVERITIES",
    "SHIFTS",
    "captions",
    "class_distinct_batches",
    "class_text_activations",
    "classnames",
    "encode_images",
    "fit_zero_shot_posterior",
    "load_clip",
    "load_splits",
    "standin_key",
    "ood_images",
    "templates",
    "torch_threads",
]

# seeded subsets keep CPU runs short; the digits' splits (1078/359/360) are all below them
MAX_TRAIN = 10_000
MAX_EVAL = 2_000
NOISE = "uniform-noise"


@fill_doc
def load_splits(
    dataset: str,
    seed: int = 0,
    data_dir: str | os.PathLike | None = None,
    max_train: int | None = MAX_TRAIN,
    max_eval: int | None = MAX_EVAL,
) -> dict[str, Split]:
    """Seeded, stratified train/curvature/val/test splits as normalised `(N, 3, 32, 32)` images.

    ``"curvature"`` holds pairs of the training distribution the stand-in never trains on:
    the posterior's curvature is fitted on them (see :func:`fit_zero_shot_posterior`).

    Parameters
    ----------
    %(demo_dataset)s
    seed : int
        seed of the split (and of the subsets).
    data_dir : path, optional
        Fashion-MNIST only: folder of its four idx files (default
        ``/usr/share/datasets/fashion-mnist``); a ``FileNotFoundError`` names the files when
        they are missing.
    max_train : int or None
        at most this many training examples (a seeded stratified subset), and as many
        curvature examples; None keeps all.
    max_eval : int or None
        the same for ``"val"`` and ``"test"`` each.

    Returns
    -------
    splits : dict
        ``{"train": (images, labels), "curvature": ..., "val": ..., "test": ...}``, images
        float32, labels int64.
    """
    prompts_of(dataset)
    limits = {"train": max_train, "curvature": max_train, "val": max_eval, "test": max_eval}
    if dataset == "fashion-mnist":
        return load_fashion_mnist_splits(seed, data_dir, limits)
    if data_dir is not None:
        raise ValueError("data_dir: the digits are embedded in scikit-learn; pass None.")
    splits = load_digits_splits(seed)
    for name, (images, labels) in splits.items():
        keep = stratified_subset(labels, limits[name], seed)
        splits[name] = (images[keep], labels[keep])
    return splits


def ood_images(
    dataset: str, n: int, seed: int, data_dir: str | os.PathLike | None = None
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The OOD sets of ``dataset``: the other data set's test split and uniform noise.

    Parameters
    ----------
    dataset : str
        the in-distribution data set.
    n : int
        number of uniform-noise images (the in-distribution test size).
    seed : int
        seed of the noise and of the other data set's subset.
    data_dir : path, optional
        Fashion-MNIST's folder.

    Returns
    -------
    images : dict of str to torch.Tensor
        OOD set -> `(M, 3, 32, 32)` images.
    skipped : list of str
        one line per OOD set left out, with the reason.
    """
    generator = torch.Generator().manual_seed(seed)
    # grey noise in all three channels, as the in-distribution images are grey
    images = {NOISE: normalize(torch.rand(n, 1, 32, 32, generator=generator).expand(-1, 3, -1, -1))}
    other = next(d for d in DATASETS if d != dataset)
    try:
        folder = data_dir if other == "fashion-mnist" else None
        images[other] = load_splits(other, seed, folder, max_eval=n)["test"][0]
    except FileNotFoundError as err:
        return images, [f"ood {other}: {err}"]
    return images, []


@fill_doc
def load_clip(
    dataset: str,
    cache_dir: str | os.PathLike | None = None,
    progress_bar: bool = False,
    seed: int = 0,
    train_config: dict | None = None,
    data_dir: str | os.PathLike | None = None,
    max_train: int | None = MAX_TRAIN,
    retrain: bool = False,
):
    """The small CLIP of ``dataset``: the shipped one, else the cache's, else trained and cached.

    Trained on the ``"train"`` split of ``load_splits(dataset, seed, data_dir, max_train)``
    with caption pairs, so evaluation on that split's ``"val"`` / ``"test"`` images is
    zero-shot on unseen images. At the defaults the package ships the trained model
    (:mod:`laplace_vlm.standins.shipped`): every machine evaluates the same weights.

    Parameters
    ----------
    %(demo_dataset)s
    cache_dir : path, optional
        folder of the safetensors cache; ``platformdirs.user_cache_dir("laplace-vlm")`` if None.
    progress_bar : bool
        show the training progress.
    seed : int
        seed of the split and of the training (initialisation, batches, captions).
    train_config : dict, optional
        overrides of ``training.TRAIN_CONFIGS[dataset]`` (epochs, lr, weight_decay, and
        ``seed``: another training draw on the same split); part of the cache key, as are the
        architecture, the training seed and the caption templates.
    data_dir : path, optional
        Fashion-MNIST's folder (see :func:`load_splits`); not part of the cache key.
    max_train : int or None
        training subset size (see :func:`load_splits`); the training images and labels are
        part of the cache key (a SHA-256 of their bytes).
    retrain : bool
        train here even where a shipped or cached model exists, and replace the cache's file
        (never the shipped one); later calls without ``retrain`` load the shipped model again.

    Returns
    -------
    model : open_clip.model.CLIP
        in eval mode.
    tokenizer : callable
        list of str -> `(n, 16)` token ids.
    """
    images, labels, key = _training_data(dataset, seed, train_config, data_dir, max_train)
    path = cache.cache_path(cache_dir, dataset, key)
    if not retrain:
        # the shipped file is the model this key trains, so it wins over a cached retrain
        model = shipped.load_shipped(dataset, key)
        if model is None and path.is_file():
            model = cache.load_cached(path)
        if model is not None:
            return model, training.clip_tokenizer()
    # the toy model's GEMMs are too small to gain from threads, and on a busy machine extra
    # threads stall: one thread trained 2-5x faster than two on 2 shared cores
    with torch_threads(1):
        model = training.train_clip(images, labels, prompts_of(dataset), key["train"], progress_bar)
    cache.save(model, path)
    return model, training.clip_tokenizer()


def _training_data(
    dataset: str,
    seed: int,
    train_config: dict | None,
    data_dir: str | os.PathLike | None,
    max_train: int | None,
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The training images, labels and the cache key of a stand-in (see :func:`load_clip`)."""
    prompts = prompts_of(dataset)
    # a "seed" in train_config trains another draw of the stand-in on the same split
    cfg = {**training.TRAIN_CONFIGS[dataset], "seed": seed, **(train_config or {})}
    images, labels = load_splits(dataset, seed, data_dir, max_train)["train"]
    # the training data are part of the key: a changed split never loads a stale model
    key = {"train": cfg, "data": cache.digest(images, labels), "prompts": asdict(prompts)}
    return images, labels, key


@fill_doc
def standin_key(
    dataset: str,
    seed: int = 0,
    train_config: dict | None = None,
    data_dir: str | os.PathLike | None = None,
    max_train: int | None = MAX_TRAIN,
) -> dict:
    """The cache key :func:`load_clip` trains ``dataset``'s stand-in under (same arguments).

    Parameters
    ----------
    %(demo_dataset)s
    seed : int
        seed of the split and of the training.
    train_config : dict, optional
        overrides of the training set-up.
    data_dir : path, optional
        Fashion-MNIST's folder.
    max_train : int or None
        training subset size.

    Returns
    -------
    dict
        ``{"train": ..., "data": ..., "prompts": ...}`` (JSON-serialisable).
    """
    return _training_data(dataset, seed, train_config, data_dir, max_train)[2]


def encode_images(model, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Pre-projection image activations (feature mode's input).

    Parameters
    ----------
    model : open_clip.model.CLIP
        the model.
    images : torch.Tensor
        `(N, 3, 32, 32)` normalised images.
    batch_size : int
        images per forward pass.

    Returns
    -------
    torch.Tensor
        `(N, d_img)`.
    """
    batches = ({"image": images[i : i + batch_size]} for i in range(0, len(images), batch_size))
    return extract_features(model, batches).image.activations


def class_text_activations(model, tokenizer, dataset: str) -> torch.Tensor:
    """Template-ensembled pre-projection text activations of every class of ``dataset``.

    Parameters
    ----------
    model : open_clip.model.CLIP
        the model.
    tokenizer : callable
        list of str -> token ids.
    dataset : {'digits', 'fashion-mnist'}
        whose class names and templates.

    Returns
    -------
    torch.Tensor
        `(C, d_txt)`, the mean over the templates.
    """
    prompts = prompts_of(dataset)
    acts, _ = zeroshot.class_text_activations(
        get_adapter(model), tokenizer, prompts.classnames, prompts.templates
    )
    return acts


def fit_zero_shot_posterior(
    model,
    tokenizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    seed: int,
    dataset: str = "digits",
    damping: bool | str = "symmetric",
) -> DualEncoderLaplace:
    """KFAC posterior of both heads from labelled images, one seeded caption per image.

    The experiments pass the ``"curvature"`` split of :func:`load_splits`: pairs of the
    training distribution the stand-in never trained on.

    Class batches hold distinct classes (:func:`class_distinct_batches`, every example used):
    each image's classes are the captions of its batch, the zero-shot problem the posterior is
    used for.

    Parameters
    ----------
    model : open_clip.model.CLIP
        the model (the posterior is over its two projection heads).
    tokenizer : callable
        list of str -> token ids.
    images : torch.Tensor
        `(N, 3, 32, 32)` normalised images.
    labels : torch.Tensor
        `(N,)` labels.
    seed : int
        seed of the captions and the batches.
    dataset : {'digits', 'fashion-mnist'}
        whose captions.
    damping : {'symmetric', False, True}, default='symmetric'
        the posterior form (the paper's by default; see ``DualEncoderLaplace``).

    Returns
    -------
    DualEncoderLaplace
        fitted, at laplace's default prior precision and temperature (tune them next).
    """
    generator = torch.Generator().manual_seed(seed)
    tokens = tokenizer(captions(dataset, labels, generator))
    pairs = extract_features(model, DataLoader(TensorDataset(images, tokens), 512))
    acts_img, acts_txt = pairs.image.activations, pairs.text.activations
    la = DualEncoderLaplace(model, contrastive="clip", damping=damping)
    la.fit([(acts_img[b], acts_txt[b]) for b in class_distinct_batches(labels, generator)])
    return la


def in_form(la: DualEncoderLaplace, damping: bool | str) -> DualEncoderLaplace:
    """The same fitted curvature in another posterior form (``damping`` of the class).

    Parameters
    ----------
    la : DualEncoderLaplace
        a fitted posterior (model mode).
    damping : {'symmetric', False, True}
        the other form.

    Returns
    -------
    DualEncoderLaplace
        over the same model, with ``la``'s factor sums, at laplace's default prior and
        temperature.
    """
    other = DualEncoderLaplace(la.adapter.model, contrastive=la.contrastive, damping=damping)
    other.set_factor_sums(la.factor_sums())
    return other
