"""The safetensors cache of trained stand-in CLIPs: one file per data set and training set-up."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import open_clip
import platformdirs
import torch
from safetensors.torch import load_file

from laplace_vlm.io.safetensors_file import write_safetensors
from laplace_vlm.standins.training import CLIP_CONFIG, build_clip


def default_cache_dir() -> Path:
    """``platformdirs.user_cache_dir("laplace-vlm")``.

    Returns
    -------
    Path
        the user's cache folder of the package (not created here).
    """
    return Path(platformdirs.user_cache_dir("laplace-vlm"))


def digest(*tensors: torch.Tensor) -> str:
    """SHA-256 of the tensors' dtypes, shapes and bytes: the identity of a training set.

    Parameters
    ----------
    *tensors : torch.Tensor
        e.g. the training images and labels.

    Returns
    -------
    str
        64 hex digits.
    """
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def cache_path(cache_dir: str | os.PathLike | None, dataset: str, key: dict) -> Path:
    """The cache file of a model: data set name plus 12 hex digits of everything that made it.

    Parameters
    ----------
    cache_dir : path or None
        the folder; :func:`default_cache_dir` if None.
    dataset : str
        e.g. ``"digits"``.
    key : dict
        JSON-serialisable description of the training data and set-up; the architecture is
        added here.

    Returns
    -------
    Path
        ``<cache_dir>/<dataset>-clip-<digest>.safetensors``; it may not exist yet.
    """
    name = f"{dataset}-clip-{key_digest(key)[:12]}.safetensors"
    return Path(cache_dir or default_cache_dir()) / name


def key_digest(key: dict) -> str:
    """SHA-256 of a model's cache key with the architecture: what names a trained stand-in.

    Parameters
    ----------
    key : dict
        JSON-serialisable description of the training data and set-up (see :func:`cache_path`).

    Returns
    -------
    str
        64 hex digits; the cache file name holds the first 12, a shipped file all of them.
    """
    blob = json.dumps({"model": CLIP_CONFIG, **key}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def load_cached(path: Path) -> open_clip.model.CLIP:
    """A demo CLIP with the weights of ``path``, in eval mode.

    Parameters
    ----------
    path : Path
        a safetensors file written by :func:`save`.

    Returns
    -------
    open_clip.model.CLIP
        the model.
    """
    model = build_clip()
    model.load_state_dict(load_file(path))
    return model.eval()


def save(model: open_clip.model.CLIP, path: Path) -> None:
    """Write the weights atomically: a concurrent or interrupted run never reads half a file.

    Parameters
    ----------
    model : open_clip.model.CLIP
        the model whose ``state_dict`` is written.
    path : Path
        the safetensors file; an existing one is replaced.
    """
    write_safetensors(path, model.state_dict(), overwrite=True)
