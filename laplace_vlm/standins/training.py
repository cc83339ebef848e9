"""The stand-in CLIP: a small open_clip ``CLIP`` trained on image/caption pairs.

One architecture for every stand-in data set; the training set-up per data set is in
``TRAIN_CONFIGS``. Where the data come from and when the cache (:mod:`.cache`) is used is
decided by :func:`laplace_vlm.experiments.recipe.load_clip`.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import open_clip
import torch
from open_clip.loss import ClipLoss
from tqdm.auto import tqdm

from laplace_vlm.datasets.prompts import Prompts

CONTEXT_LENGTH = 16
# open_clip architecture at toy size: ViT on 32x32 inputs with 8x8 patches, a 2-layer text
# transformer; the full CLIP vocabulary keeps the bundled ViT-B-32 tokenizer's ids valid
CLIP_CONFIG: dict = {
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
# Fashion-MNIST's 10,000 training images give ~9x the digits' steps per epoch: fewer epochs
# (8 reached 0.83 test accuracy, 4 reached 0.81)
TRAIN_CONFIGS: dict[str, dict] = {
    "digits": {"epochs": 16, "lr": 2e-3, "weight_decay": 0.05, "seed": 0},
    "fashion-mnist": {"epochs": 8, "lr": 2e-3, "weight_decay": 0.05, "seed": 0},
}


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run torch on ``n`` threads inside the block, then restore the previous count.

    Parameters
    ----------
    n : int
        threads inside the block, ``>= 1``.

    Yields
    ------
    None
        once, with torch on ``n`` threads.
    """
    if n < 1:
        raise ValueError(f"n must be a positive number of threads, got {n}.")
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def clip_tokenizer():
    """The ViT-B-32 BPE tokenizer (bundled with open_clip, works offline) with 16 tokens.

    Returns
    -------
    callable
        list of str -> `(n, 16)` token ids.
    """
    return open_clip.get_tokenizer("ViT-B-32", context_length=CONTEXT_LENGTH)


def build_clip(seed: int = 0) -> open_clip.model.CLIP:
    """A randomly initialised demo CLIP (3.4 M parameters, 3.2 M of them token embeddings).

    Parameters
    ----------
    seed : int
        seed of the initialisation (the global RNG is left as it was).

    Returns
    -------
    open_clip.model.CLIP
        the model of :data:`CLIP_CONFIG`, in training mode.
    """
    with torch.random.fork_rng():  # open_clip initialises from the global RNG
        torch.manual_seed(seed)
        return open_clip.model.CLIP(**CLIP_CONFIG)


def class_distinct_batches(
    labels: torch.Tensor, generator: torch.Generator | int | None = None
) -> list[torch.Tensor]:
    """Shuffled batches in which no class appears twice, every example used once.

    With one pair per class in a batch, CLIP's in-batch negatives are never the same class,
    so the InfoNCE loss has no false negatives, and for the posterior each image's classes are
    the distinct captions of its batch, the zero-shot problem. Batch ``j`` holds the ``j``-th
    example (in a seeded shuffle) of every class that has one, so the larger classes' surplus
    forms the last, smaller batches instead of being dropped.

    Parameters
    ----------
    labels : torch.Tensor
        `(N,)` class labels.
    generator : torch.Generator or int, optional
        source of the shuffles (an int seeds a new generator; None seeds with 0).

    Returns
    -------
    batches : list of torch.Tensor
        index tensors, ``max_c N_c`` of them, classes in label order within a batch (the
        contrastive loss and its curvature do not depend on the order).
    """
    if not isinstance(generator, torch.Generator):
        generator = torch.Generator().manual_seed(0 if generator is None else int(generator))
    labels = labels.cpu()
    per_class = []
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().squeeze(1)
        per_class.append(idx[torch.randperm(len(idx), generator=generator)])
    depth = max((len(idx) for idx in per_class), default=0)
    return [torch.stack([idx[j] for idx in per_class if len(idx) > j]) for j in range(depth)]


def train_clip(
    images: torch.Tensor,
    labels: torch.Tensor,
    prompts: Prompts,
    train_config: dict,
    progress_bar: bool = True,
) -> open_clip.model.CLIP:
    """Train a demo CLIP from scratch with open_clip's ``ClipLoss`` on image/caption pairs.

    Parameters
    ----------
    images : torch.Tensor
        `(N, 3, 32, 32)` normalised images.
    labels : torch.Tensor
        `(N,)` labels; each step draws a fresh random caption per image from ``prompts``.
    prompts : Prompts
        class names and caption templates of the data set.
    train_config : dict
        ``epochs``, ``lr``, ``weight_decay``, ``seed`` (see ``TRAIN_CONFIGS``).
    progress_bar : bool
        show a tqdm bar.

    Returns
    -------
    model : open_clip.model.CLIP
        in eval mode.
    """
    cfg = train_config
    model, tokenizer = build_clip(cfg["seed"]).train(), clip_tokenizer()
    # the captions use ~40 of the 49,408 token rows: keeping the table at its random
    # initialisation leaves distinct token vectors and cuts the optimiser step ~10x
    model.token_embedding.weight.requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(cfg["seed"])
    optimizer = torch.optim.AdamW(trainable, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    epochs = [class_distinct_batches(labels, generator) for _ in range(cfg["epochs"])]
    total = sum(len(batches) for batches in epochs)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, cfg["lr"], total_steps=total)
    loss_fn = ClipLoss()
    bar = tqdm(total=total, desc="training CLIP", disable=not progress_bar)
    for batch in (b for batches in epochs for b in batches):
        tokens = tokenizer(prompts.captions(labels[batch], generator))
        loss = loss_fn(*model(images[batch], tokens))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        bar.update()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    return model.eval()
