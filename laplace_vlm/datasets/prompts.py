"""Class names, zero-shot templates and training captions of the demo's data sets."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Prompts:
    """The text side of one data set.

    Attributes
    ----------
    classnames : tuple of str
        C names, in label order.
    templates : tuple of str
        ``"{}"``-format zero-shot templates (open_clip's convention).
    caption_templates : tuple of str
        the phrasings of the training captions: the zero-shot templates and more, so that
        zero-shot prompts are a subset of what the model saw, as with web-scale caption data.
    """

    classnames: tuple[str, ...]
    templates: tuple[str, ...]
    caption_templates: tuple[str, ...]

    def captions(self, labels: torch.Tensor, generator: torch.Generator) -> list[str]:
        """One random caption per label.

        Parameters
        ----------
        labels : torch.Tensor
            `(N,)` labels in ``0..C-1``.
        generator : torch.Generator
            source of the template choice.

        Returns
        -------
        captions : list of str
            `N` captions, e.g. ``"a handwritten seven."``.
        """
        if len(labels) and (labels.min() < 0 or labels.max() >= len(self.classnames)):
            raise ValueError(f"labels must lie in [0, {len(self.classnames)}).")
        choice = torch.randint(0, len(self.caption_templates), (len(labels),), generator=generator)
        return [
            self.caption_templates[t].format(self.classnames[y])
            for t, y in zip(choice.tolist(), labels.tolist())
        ]


_DIGIT_TEMPLATES = (
    "a photo of the number {}.",
    "a handwritten {}.",
    "the digit {}.",
    "a scan of a handwritten {}.",
)
DIGITS = Prompts(
    classnames=("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"),
    templates=_DIGIT_TEMPLATES,
    caption_templates=_DIGIT_TEMPLATES
    + ("a blurry {}.", "a small picture of a {}.", "someone wrote the number {}.", "{}"),
)

# open_clip's zero-shot metadata has no Fashion-MNIST entry: these are the data set's own class
# names (torchvision's FashionMNIST.classes), in lower case as in a caption
_FASHION_TEMPLATES = (
    "a photo of a {}.",
    "a black and white photo of a {}.",
    "a low resolution photo of a {}.",
    "a {}, a type of clothing.",
)
FASHION_MNIST = Prompts(
    classnames=(
        "t-shirt/top",
        "trouser",
        "pullover",
        "dress",
        "coat",
        "sandal",
        "shirt",
        "sneaker",
        "bag",
        "ankle boot",
    ),
    templates=_FASHION_TEMPLATES,
    caption_templates=_FASHION_TEMPLATES
    + ("a grey picture of a {}.", "a small photo of a {}.", "a product photo of a {}.", "{}"),
)

PROMPTS: dict[str, Prompts] = {"digits": DIGITS, "fashion-mnist": FASHION_MNIST}
