"""A small open_clip ``CLIP`` trained on digit/caption pairs, cached on disk with safetensors."""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import open_clip
import platformdirs
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tqdm.auto import tqdm

from laplace_vlm.io.safetensors_file import write_safetensors
from laplace_vlm.demo.data import load_digits_splits
from laplace_vlm.demo.prompts import captions

CONTEXT_LENGTH = 16
# open_clip architecture at toy size: ViT on 32x32 inputs with 8x8 patches, a 2-layer text
# transformer; the full CLIP vocabulary keeps the bundled ViT-B-32 tokenizer's ids valid
DIGITS_CLIP_CONFIG: dict = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
    "text_cfg": {
        "context_length": CONTEXT_LENGTH,
        "vocab_size": 49408,
        "width": 64,
        "heads": 2,
        "layers": 2,
    },
}
TRAIN_CONFIG: dict = {"epochs": 16, "lr": 2e-3, "weight_decay": 0.05, "seed": 0}


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run torch on ``n`` threads inside the block, then restore the previous count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def digits_tokenizer():
    """The ViT-B-32 BPE tokenizer (bundled with open_clip, works offline) with 16 tokens."""
    return open_clip.get_tokenizer("ViT-B-32", context_length=CONTEXT_LENGTH)


def build_digits_clip(seed: int = 0) -> open_clip.model.CLIP:
    """A randomly initialised digits CLIP (3.4 M parameters, 3.2 M of them token embeddings)."""
    with torch.random.fork_rng():  # open_clip initialises from the global RNG: leave it as it was
        torch.manual_seed(seed)
        return open_clip.model.CLIP(**DIGITS_CLIP_CONFIG)


def config_hash(train_config: dict) -> str:
    """12 hex digits identifying the architecture, the training set-up and the data split."""
    blob = json.dumps({"model": DIGITS_CLIP_CONFIG, "train": train_config}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def clip_loss(
    model: open_clip.model.CLIP, images: torch.Tensor, tokens: torch.Tensor
) -> torch.Tensor:
    """Symmetric InfoNCE of a batch of matched pairs (in-batch negatives), as CLIP is trained."""
    image = model.encode_image(images, normalize=True)
    text = model.encode_text(tokens, normalize=True)
    logits = model.logit_scale.exp() * image @ text.T
    target = torch.arange(len(images))
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def class_unique_batches(labels: torch.Tensor, generator: torch.Generator) -> list[torch.Tensor]:
    """Shuffled batches holding one example of every class, for one epoch.

    With one pair per class in a batch, CLIP's in-batch negatives are never the same digit,
    so the InfoNCE loss has no false negatives (a batch with two "seven"s asks the model to
    tell apart captions that say the same thing, which caps its confidence). Examples of the
    larger classes beyond the smallest class's count wait for a later epoch.

    Parameters
    ----------
    labels : torch.Tensor
        `(N,)` class labels in ``0..C-1``.
    generator : torch.Generator

    Returns
    -------
    batches : list of torch.Tensor
        `min_c N_c` index tensors of length C, in random class order.
    """
    classes = labels.unique()
    per_class = [torch.nonzero(labels == c)[:, 0] for c in classes]
    n_batches = min(len(idx) for idx in per_class)
    columns = [idx[torch.randperm(len(idx), generator=generator)[:n_batches]] for idx in per_class]
    grid = torch.stack(columns, 1)  # (n_batches, C)
    order = torch.argsort(torch.rand(grid.shape, generator=generator), dim=1)
    return list(grid.gather(1, order))


def train_digits_clip(
    images: torch.Tensor,
    labels: torch.Tensor,
    train_config: dict | None = None,
    progress_bar: bool = True,
) -> open_clip.model.CLIP:
    """Train a digits CLIP from scratch with the CLIP contrastive loss on image/caption pairs.

    Parameters
    ----------
    images : torch.Tensor
        `(N, 3, 32, 32)` normalised digit images.
    labels : torch.Tensor
        `(N,)` digit labels; each step draws a fresh random caption per image.
    train_config : dict, optional
        overrides of ``TRAIN_CONFIG`` (epochs, lr, weight_decay, seed).
    progress_bar : bool

    Returns
    -------
    model : open_clip.model.CLIP
        in eval mode.
    """
    cfg = {**TRAIN_CONFIG, **(train_config or {})}
    model, tokenizer = build_digits_clip(cfg["seed"]).train(), digits_tokenizer()
    # the captions use ~40 of the 49,408 token rows: keeping the table at its random
    # initialisation leaves distinct token vectors and cuts the optimiser step ~10x
    model.token_embedding.weight.requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(cfg["seed"])
    optimizer = torch.optim.AdamW(trainable, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    epochs = [class_unique_batches(labels, generator) for _ in range(cfg["epochs"])]
    total = sum(len(batches) for batches in epochs)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, cfg["lr"], total_steps=total)
    bar = tqdm(total=total, desc="training digits CLIP", disable=not progress_bar)
    for batches in epochs:
        for batch in batches:
            loss = clip_loss(model, images[batch], tokenizer(captions(labels[batch], generator)))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    return model.eval()


def default_cache_dir() -> Path:
    """``platformdirs.user_cache_dir("laplace-vlm")``."""
    return Path(platformdirs.user_cache_dir("laplace-vlm"))


def load_or_train_digits_clip(
    cache_dir: str | os.PathLike | None = None,
    progress_bar: bool = True,
    train_config: dict | None = None,
):
    """The digits CLIP of the demo: loaded from the cache, or trained (under a minute) and cached.

    Trained on the ``"train"`` split of ``load_digits_splits(seed)`` with the config's seed
    (0 by default), so evaluation on that split's ``"val"`` / ``"test"`` images is zero-shot
    on unseen images.

    Parameters
    ----------
    cache_dir : path, optional
        where the safetensors file lives; ``platformdirs.user_cache_dir("laplace-vlm")`` if None.
    progress_bar : bool
    train_config : dict, optional
        overrides of ``TRAIN_CONFIG``; part of the cache key.

    Returns
    -------
    model : open_clip.model.CLIP
        in eval mode.
    tokenizer : callable
        list of str -> `(n, 16)` token ids.
    """
    cfg = {**TRAIN_CONFIG, **(train_config or {})}
    path = Path(cache_dir or default_cache_dir()) / f"digits-clip-{config_hash(cfg)}.safetensors"
    if path.is_file():
        model = build_digits_clip(cfg["seed"])
        model.load_state_dict(load_file(path))
        return model.eval(), digits_tokenizer()
    images, labels = load_digits_splits(seed=cfg["seed"])["train"]
    # the toy model's GEMMs are too small to gain from threads, and on a busy machine extra
    # threads stall: one thread trained 2-5x faster than two on 2 shared cores
    with torch_threads(1):
        model = train_digits_clip(images, labels, cfg, progress_bar=progress_bar)
    # atomic: a concurrent or interrupted run never reads half a file
    write_safetensors(path, model.state_dict(), overwrite=True)
    return model, digits_tokenizer()
