"""The shipped stand-in CLIPs: package data, so every machine evaluates the same two models.

Training on another machine gives another model (CPU kernels differ; torch promises no
bitwise-equal training across machines), so the digits and Fashion-MNIST stand-ins that the
recipe trains at its defaults are shipped as ``weights/<dataset>.safetensors``. A file holds
every trained weight except the token-embedding table, of which it keeps only the rows that
the package's prompts and captions produce (:func:`prompt_token_ids`): training freezes that
table at its seeded initialisation, and the other 49,356 rows are never read by those texts.
The loaded model has zeros there, so it knows only the package's vocabulary (any other word
embeds as a zero vector): 0.89 MB per file instead of 13.5 MB.

Each file's metadata holds the SHA-256 of its cache key (architecture, training set-up and
seed, digest of the training images and labels, prompts), the training recipe, and the torch
and open_clip versions that trained it; :func:`laplace_vlm.experiments.recipe.load_clip`
loads a shipped file only where the key it would train under is that file's.

To re-ship after a change of the recipe (the old file removed first; nothing is replaced)::

    model, _ = recipe.load_clip(dataset, retrain=True)
    write_shipped(model, shipped_path(dataset), recipe.standin_key(dataset), "<the recipe>")
"""

from __future__ import annotations

import json
import os
from importlib import resources

import open_clip
import torch

from laplace_vlm.datasets.prompts import PROMPTS
from laplace_vlm.io.safetensors_file import read_safetensors, write_safetensors
from laplace_vlm.standins.cache import key_digest
from laplace_vlm.standins.training import CLIP_CONFIG, build_clip, clip_tokenizer

FORMAT = "laplace-vlm-standin"
TOKEN_TABLE = "token_embedding.weight"
TOKEN_IDS = "token_embedding.ids"
TOKEN_ROWS = "token_embedding.rows"


def prompt_texts() -> list[str]:
    """Every text the package's prompts can produce: each (caption or zero-shot) template x class.

    Returns
    -------
    list of str
        the texts of both data sets, zero-shot templates first, no duplicates.
    """
    texts = []
    for prompts in PROMPTS.values():
        for template in dict.fromkeys(prompts.templates + prompts.caption_templates):
            texts += [template.format(name) for name in prompts.classnames]
    return list(dict.fromkeys(texts))


def prompt_token_ids() -> torch.Tensor:
    """The token ids of :func:`prompt_texts`, padding and start/end tokens included.

    Returns
    -------
    torch.Tensor
        `(R,)` sorted unique int64 ids (52 of the 49,408).
    """
    return clip_tokenizer()(prompt_texts()).unique()


def shipped_path(dataset: str):
    """The package-data file of ``dataset``'s stand-in (it may be absent from a source tree).

    Parameters
    ----------
    dataset : str
        ``"digits"`` or ``"fashion-mnist"``.

    Returns
    -------
    importlib.resources.abc.Traversable
        ``laplace_vlm/standins/weights/<dataset>.safetensors``.
    """
    if dataset not in PROMPTS:
        raise ValueError(f"dataset must be one of {tuple(PROMPTS)}, got {dataset!r}.")
    return resources.files("laplace_vlm.standins") / "weights" / f"{dataset}.safetensors"


def write_shipped(
    model: open_clip.model.CLIP, path: str | os.PathLike, key: dict, recipe: str
) -> None:
    """Write a trained stand-in as a shipped file (the prompt rows of its token table only).

    Parameters
    ----------
    model : open_clip.model.CLIP
        the stand-in trained under ``key``.
    path : path
        the file; an existing one is never replaced (``FileExistsError``).
    key : dict
        its cache key (see :func:`laplace_vlm.standins.cache.cache_path`).
    recipe : str
        how it was trained, in words (stored in the metadata).
    """
    state = dict(model.state_dict())
    ids = prompt_token_ids()
    state[TOKEN_ROWS] = state.pop(TOKEN_TABLE)[ids]
    state[TOKEN_IDS] = ids
    metadata = {
        "format": FORMAT,
        "key_sha256": key_digest(key),
        "key": json.dumps(key, sort_keys=True),
        "recipe": recipe,
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "vocabulary": "token-embedding rows of the package's prompts and captions only",
    }
    write_safetensors(path, state, metadata)


def read_shipped(path) -> tuple[open_clip.model.CLIP, dict[str, str]]:
    """A shipped stand-in, in eval mode, and its metadata.

    Parameters
    ----------
    path : path or Traversable
        a file written by :func:`write_shipped`.

    Returns
    -------
    model : open_clip.model.CLIP
        the stand-in; token-embedding rows outside the file's ids are zero.
    metadata : dict of str to str
        ``key_sha256``, ``key``, ``recipe``, ``torch``, ``open_clip``, ...
    """
    with resources.as_file(path) as file:
        state, metadata = read_shipped_tensors(file)
    ids, rows = state.pop(TOKEN_IDS), state.pop(TOKEN_ROWS)
    table = torch.zeros(CLIP_CONFIG["text_cfg"]["vocab_size"], rows.shape[1], dtype=rows.dtype)
    table[ids] = rows
    state[TOKEN_TABLE] = table
    model = build_clip()
    model.load_state_dict(state)
    return model.eval(), metadata


def read_shipped_tensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and metadata of a shipped file, checked for its format tag.

    Parameters
    ----------
    path : path
        the file.

    Returns
    -------
    tensors : dict of str to torch.Tensor
        the stored tensors (token ids and rows instead of the table).
    metadata : dict of str to str
        the header metadata.
    """
    return read_safetensors(path, FORMAT, "laplace-vlm shipped stand-in")


def load_shipped(dataset: str, key: dict) -> open_clip.model.CLIP | None:
    """The shipped stand-in of ``dataset`` if it was trained under ``key``, else None.

    Parameters
    ----------
    dataset : str
        ``"digits"`` or ``"fashion-mnist"``.
    key : dict
        the cache key the recipe would train under.

    Returns
    -------
    open_clip.model.CLIP or None
        in eval mode; None where no file is shipped or its key is another (another seed,
        training set-up or training data).
    """
    path = shipped_path(dataset)
    if not path.is_file():
        return None
    model, metadata = read_shipped(path)
    return model if metadata["key_sha256"] == key_digest(key) else None
