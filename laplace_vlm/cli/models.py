"""Loading open_clip models for the commands, with a one-line error when a checkpoint is missing."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from laplace_vlm.cli.errors import CliError

DEFAULT_MODEL, DEFAULT_PRETRAINED = "ViT-B-32", "laion2b_s34b_b79k"


def load_open_clip(name: str, pretrained: str, device: str | None):
    """``(model, preprocess, tokenizer)``; a checkpoint that cannot be had is a :class:`CliError`.

    Parameters
    ----------
    name : str
        open_clip architecture name.
    pretrained : str
        open_clip pretrained tag or checkpoint path.
    device : str or None
        torch device; None: ``cuda`` if available, else ``cpu``.

    Returns
    -------
    tuple
        the model in eval mode, its image transform and its tokenizer.
    """
    import open_clip
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        with _quiet_root_logger():  # open_clip logs the same failure, with all tags, first
            model, _, preprocess = open_clip.create_model_and_transforms(
                name, pretrained=pretrained, device=device
            )
            tokenizer = open_clip.get_tokenizer(name)
    except ImportError as err:
        raise CliError(f"{name} needs the package {err.name!r}: pip install {err.name}") from None
    except (RuntimeError, OSError, ValueError) as err:
        raise CliError(_checkpoint_message(name, pretrained, err)) from None
    return model.eval(), preprocess, tokenizer


def _checkpoint_message(name: str, pretrained: str, err: Exception) -> str:
    reason = " ".join(str(err).split())
    reason = reason.split(". Last error")[0][:160]
    fetch = (
        f'python -c "import open_clip; open_clip.create_model_and_transforms({name!r}, '
        f'pretrained={pretrained!r})"'
    )
    return (
        f"cannot load open_clip model {name!r} with pretrained={pretrained!r} ({reason}). "
        f"Download it once with network access: {fetch}, or pass --pretrained /path/to/checkpoint."
    )


@contextmanager
def _quiet_root_logger() -> Iterator[None]:
    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        yield
    finally:
        logging.disable(previous)
