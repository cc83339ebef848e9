"""Safetensors files: an atomic writer and a checked reader, never pickle.

Every file format of the package (posteriors, feature sets, fit checkpoints, the demo's
model cache) goes through these two functions, so they share one set of guarantees: a
reader never sees half a file, nothing a user saved is overwritten without asking, and a
file that is not ours is refused with a message that names it.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from laplace_vlm.docstrings import fill_doc


def write_safetensors(
    path: str | os.PathLike,
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str] | None = None,
    overwrite: bool = False,
) -> None:
    """Write ``tensors`` to ``path`` through a sibling temporary file and an atomic rename.

    Parameters
    ----------
    path : str or os.PathLike
        the file; its folder is created if needed.
    tensors : dict of str to torch.Tensor
        saved detached, contiguous and on the CPU.
    metadata : dict of str to str, optional
        the file's header metadata.
    overwrite : bool, default=False
        replace an existing ``path``; otherwise a ``FileExistsError``.

    Raises
    ------
    FileExistsError
        if ``path`` exists and ``overwrite`` is False.

    Notes
    -----
    The uniquely named sibling lives on the same file system, so ``os.replace`` is atomic and
    concurrent writers never share a temporary file. (safetensors creates the file readable
    by its owner only.)
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


@fill_doc
def read_safetensors(
    path: str | os.PathLike, fmt: str, what: str, device: str = "cpu"
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a file written with ``metadata["format"] == fmt``.

    Parameters
    ----------
    %(path)s
    fmt : str
        the expected ``format`` tag of the metadata.
    what : str
        what the file should be, for the error messages (e.g. "laplace-vlm posterior").
    device : str, default='cpu'
        where the tensors are loaded.

    Returns
    -------
    tensors : dict of str to torch.Tensor
        every tensor of the file, by name.
    metadata : dict of str to str
        the header metadata (``format`` included).

    Raises
    ------
    FileNotFoundError
        if ``path`` does not exist.
    ValueError
        if it is not a readable safetensors file, or its format tag is not ``fmt``.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file: {path}")
    try:
        with safe_open(path, framework="pt", device=device) as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path} is not a readable safetensors file ({err}).") from err
    if metadata.get("format") != fmt:
        raise ValueError(f"{path} is not a {what} (format={metadata.get('format')!r}).")
    return tensors, metadata
