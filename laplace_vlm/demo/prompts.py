"""Class names, zero-shot templates and training captions of the digits demo."""

from __future__ import annotations

import torch

CLASSNAMES: tuple[str, ...] = (
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
)

# open_clip convention: "{}"-format strings (callables work too wherever templates are taken)
TEMPLATES: tuple[str, ...] = (
    "a photo of the number {}.",
    "a handwritten {}.",
    "the digit {}.",
    "a scan of a handwritten {}.",
)

# the training captions use more phrasings than the zero-shot templates, so zero-shot prompts are
# a subset of what the model saw, as with web-scale caption data
CAPTION_TEMPLATES: tuple[str, ...] = TEMPLATES + (
    "a blurry {}.",
    "a small picture of a {}.",
    "someone wrote the number {}.",
    "{}",
)


def captions(labels: torch.Tensor, generator: torch.Generator) -> list[str]:
    """One random caption per label.

    Parameters
    ----------
    labels : torch.Tensor
        `(N,)` digit labels in ``0..9``.
    generator : torch.Generator
        source of the template choice.

    Returns
    -------
    captions : list of str
        `N` captions, e.g. ``"a handwritten seven."``.
    """
    choice = torch.randint(0, len(CAPTION_TEMPLATES), (len(labels),), generator=generator)
    return [
        CAPTION_TEMPLATES[t].format(CLASSNAMES[y]) for t, y in zip(choice.tolist(), labels.tolist())
    ]
