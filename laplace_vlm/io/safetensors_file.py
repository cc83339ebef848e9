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
        replace an existing ``path``; otherwise a ``FileExistsError``, also when another
        process creates ``path`` while this one writes.

    Raises
    ------
    FileExistsError
        if ``path`` exists and ``overwrite`` is False.

    Notes
    -----
    The uniquely named sibling lives on the same file system, so the final step is atomic and
    concurrent writers never share a temporary file. Without ``overwrite`` that step is a hard
    link, which the OS refuses if ``path`` exists (no check-then-rename race); on a file system
    without hard links, ``path`` is first created exclusively (``O_EXCL``) and the complete
    file renamed over that placeholder. (safetensors creates the file readable by its owner
    only.)
    """
    path = Path(path)
    if path.exists() and not overwrite:  # fail before serialising anything
        raise _exists(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        save_file(tensors, tmp, metadata=metadata)
        if overwrite:
            os.replace(tmp, path)
        else:
            _publish_new(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _exists(path: Path) -> FileExistsError:
    return FileExistsError(f"{path} exists; pass overwrite=True to replace it.")


def _publish_new(tmp: Path, path: Path) -> None:
    """Move the finished ``tmp`` to ``path`` only if ``path`` does not exist, atomically."""
    try:
        os.link(tmp, path)  # fails with EEXIST whatever appeared since the first check
        return
    except FileExistsError:
        raise _exists(path) from None
    except OSError:  # no hard links here (FAT, some network file systems): claim the name
        pass
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        raise _exists(path) from None
    os.replace(tmp, path)  # over our own empty placeholder, never over another file


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
