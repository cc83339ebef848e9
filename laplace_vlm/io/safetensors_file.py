"""Writing safetensors files atomically: a reader never sees half a file."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import torch
from safetensors.torch import save_file


def write_safetensors(
    path: str | os.PathLike,
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str] | None = None,
    overwrite: bool = False,
) -> None:
    """Write ``tensors`` to ``path`` through a sibling temporary file and an atomic rename.

    The uniquely named sibling lives on the same file system, so ``os.replace`` is atomic and
    concurrent writers never share a temporary file. An existing ``path`` is kept unless
    ``overwrite``. (safetensors creates the file readable by its owner only.)
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it.")
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
