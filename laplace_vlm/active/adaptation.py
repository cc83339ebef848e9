"""Adaptation: fine-tune the image projection on labelled data, then update the posterior.

The paper's active few-shot protocol fine-tunes *only* the image projection (text head,
logit scale and bias frozen) with AdamW on the cross-entropy of the deterministic cosine
logits against the class text embeddings, keeping the epoch with the best validation loss.
After fine-tuning, the Laplace posterior is moved to the new weights and the labelled pairs
are added to its curvature (``la.fit(loader, override=False)``), so the next round's
uncertainty reflects what was learnt.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from laplace_vlm.heads import DualHead


@dataclass
class FinetuneResult:
    """Outcome of :func:`finetune_image_projection`.

    Attributes
    ----------
    projection : nn.Linear
        the image projection at the best validation epoch (a new module).
    best_epoch : int
        0 means the initial weights were never beaten.
    best_val_loss : float
        mean validation cross-entropy at ``best_epoch``.
    epochs_run : int
    """

    projection: nn.Linear
    best_epoch: int
    best_val_loss: float
    epochs_run: int


def _check_labelled(name: str, acts: torch.Tensor, labels: torch.Tensor, d: int, c: int) -> None:
    if acts.dim() != 2 or acts.shape[1] != d:
        raise ValueError(f"{name} activations must be (N, {d}), got {tuple(acts.shape)}.")
    if labels.shape != acts.shape[:1]:
        raise ValueError(f"{name} labels must be ({len(acts)},), got {tuple(labels.shape)}.")
    if len(labels) and (labels.min() < 0 or labels.max() >= c):
        raise ValueError(f"{name} labels must lie in [0, {c}).")


def class_embeddings(heads: DualHead, class_text: torch.Tensor, residual=None) -> torch.Tensor:
    """Normalised, frozen class text embeddings `(C, D)`."""
    with torch.no_grad():
        return F.normalize(heads.embed_text(class_text, residual), dim=-1)


def _cosine_logits(heads, projection, acts, text_unit, residual=None):
    z = projection(acts) if residual is None else projection(acts) + residual
    logits = heads.scale * F.normalize(z, dim=-1) @ text_unit.T
    return logits if heads.logit_bias is None else logits + heads.logit_bias


def finetune_image_projection(
    heads: DualHead,
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    class_text: torch.Tensor,
    *,
    init: nn.Linear | None = None,
    lr: float = 1e-3,
    weight_decay: float = 5e-2,
    epochs: int = 100,
    batch_size: int = 32,
    patience: int = 10,
    generator: torch.Generator | int | None = None,
) -> FinetuneResult:
    """Fine-tune the image projection with AdamW and early stopping on a validation split.

    Parameters
    ----------
    heads : DualHead
        provides the text head, logit scale and bias (frozen; not modified).
    train : tuple of torch.Tensor
        ``(activations (N, d_img), labels (N,))`` of the labelled images.
    val : tuple of torch.Tensor
        ``(activations (M, d_img), labels (M,))`` for early stopping (M >= 1).
    class_text : torch.Tensor
        `(C, d_txt)` class text activations.
    init : nn.Linear, optional
        starting projection (default: ``heads.image_projection``); copied, never modified.
    lr, weight_decay : float
        AdamW hyperparameters.
    epochs : int
        maximum number of passes over ``train``.
    batch_size : int
    patience : int
        stop after this many epochs without a better validation loss.
    generator : torch.Generator or int, optional
        shuffling (an int is a seed).

    Returns
    -------
    FinetuneResult
    """
    d_img, n_cls = heads.image_projection.in_features, class_text.shape[0]
    _check_labelled("train", *train, d_img, n_cls)
    _check_labelled("val", *val, d_img, n_cls)
    if len(val[1]) == 0:
        raise ValueError("val must hold at least one labelled example for early stopping.")
    for name, value in (("epochs", epochs), ("batch_size", batch_size), ("patience", patience)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}.")
    if not isinstance(generator, torch.Generator):
        generator = torch.Generator().manual_seed(0 if generator is None else int(generator))
    like = heads.image_projection.weight
    text_unit = class_embeddings(heads, class_text.to(like))
    x_tr, y_tr = train[0].to(like), train[1].to(like.device)
    x_va, y_va = val[0].to(like), val[1].to(like.device)
    projection = copy.deepcopy(init if init is not None else heads.image_projection)
    projection.requires_grad_(True)
    best = copy.deepcopy(projection)

    def val_loss() -> float:
        with torch.no_grad():
            return F.cross_entropy(_cosine_logits(heads, projection, x_va, text_unit), y_va).item()

    best_loss, best_epoch, epoch = val_loss(), 0, 0
    if len(y_tr) == 0:
        return FinetuneResult(best.requires_grad_(False), 0, best_loss, 0)
    optimizer = torch.optim.AdamW(projection.parameters(), lr=lr, weight_decay=weight_decay)
    for epoch in range(1, epochs + 1):
        order = torch.randperm(len(y_tr), generator=generator).to(y_tr.device)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            loss = F.cross_entropy(
                _cosine_logits(heads, projection, x_tr[idx], text_unit), y_tr[idx]
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        current = val_loss()
        if current < best_loss:
            best_loss, best_epoch = current, epoch
            best.load_state_dict(projection.state_dict())
        elif epoch - best_epoch >= patience:
            break
    return FinetuneResult(best.requires_grad_(False), best_epoch, best_loss, epoch)


def class_distinct_batches(
    labels: torch.Tensor, generator: torch.Generator | int | None = None
) -> list[torch.Tensor]:
    """Split labelled examples into batches in which no class appears twice.

    A class batch of the contrastive fit treats the batch's texts as the classes; with one
    image per class and its class prompt as the text, the image head's curvature is exactly
    that of the C-way classification (over the classes present in the batch).

    Parameters
    ----------
    labels : torch.Tensor
        `(N,)` class indices.
    generator : torch.Generator or int, optional
        shuffles the examples within each class.

    Returns
    -------
    batches : list of torch.Tensor
        index tensors; batch j holds the j-th example of every class that has one.
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


def update_posterior(
    la,
    projection: nn.Linear,
    new: tuple[torch.Tensor, torch.Tensor] | None,
    class_text: torch.Tensor,
    generator: torch.Generator | int | None = None,
) -> None:
    """Move the posterior mean to ``projection`` and add the newly labelled pairs.

    Parameters
    ----------
    la : DualEncoderLaplace
        fitted posterior; its image projection is overwritten in place.
    projection : nn.Linear
        the fine-tuned image projection.
    new : tuple of torch.Tensor, optional
        ``(activations (M, d_img), labels (M,))`` labelled since the last update; each is
        paired with its class text in class-distinct batches (:func:`class_distinct_batches`)
        and added with ``la.fit(..., override=False)``. None or empty: only the mean moves.
    class_text : torch.Tensor
        `(C, d_txt)` class text activations.
    generator : torch.Generator or int, optional
        batch composition.
    """
    target = la.model.image_projection
    if projection.weight.shape != target.weight.shape:
        raise ValueError(
            f"projection weight must be {tuple(target.weight.shape)}, got "
            f"{tuple(projection.weight.shape)}."
        )
    with torch.no_grad():
        target.weight.copy_(projection.weight)
        if target.bias is not None:
            target.bias.copy_(projection.bias)
    if new is None or len(new[1]) == 0:
        la.refresh_mean()
        return
    acts, labels = new
    _check_labelled("new", acts, labels, target.in_features, class_text.shape[0])
    loader = [(acts[b], class_text[labels[b]]) for b in class_distinct_batches(labels, generator)]
    la.fit(loader, override=False)  # recomputes curvature at the new weights, refreshes the mean
