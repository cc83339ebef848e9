"""Class names, zero-shot templates and training captions of the demo's data sets."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from laplace_vlm.docstrings import fill_doc


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
DATASETS: tuple[str, ...] = tuple(PROMPTS)

# the one argument of the prompt look-ups
_fill_doc = fill_doc.extend(
    dataset_parameters="""
        Parameters
        ----------
        %(demo_dataset)s
        """
)


@_fill_doc
def prompts_of(dataset: str) -> Prompts:
    """The prompts of ``dataset``, or a ``ValueError`` naming the argument.

    %(dataset_parameters)s

    Returns
    -------
    Prompts
        its class names, templates and caption templates.
    """
    if dataset not in PROMPTS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}.")
    return PROMPTS[dataset]


@_fill_doc
def classnames(dataset: str) -> tuple[str, ...]:
    """The class names of ``dataset``, in label order.

    %(dataset_parameters)s

    Returns
    -------
    tuple of str
        C names; label ``y`` is the ``y``-th.
    """
    return prompts_of(dataset).classnames


@_fill_doc
def templates(dataset: str) -> tuple[str, ...]:
    """The ``"{}"``-format zero-shot templates of ``dataset``.

    %(dataset_parameters)s

    Returns
    -------
    tuple of str
        the templates; a class's text activations are their mean (``recipe.class_text_activations``).
    """
    return prompts_of(dataset).templates


@fill_doc
def captions(dataset: str, labels: torch.Tensor, generator: torch.Generator) -> list[str]:
    """One random training-style caption per label (see ``Prompts.captions``).

    Parameters
    ----------
    %(demo_dataset)s
    labels : torch.Tensor
        `(N,)` labels.
    generator : torch.Generator
        source of the template choice.

    Returns
    -------
    list of str
        `N` captions, each a caption template filled with its label's class name.
    """
    return prompts_of(dataset).captions(labels, generator)
