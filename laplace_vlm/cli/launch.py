"""The torchrun environment of a command: process group, this rank's device, rank-0 output.

``torchrun`` (or any launcher that sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``) starts one process per GPU or CPU slot; each joins the
group here: NCCL when it runs on CUDA, gloo on the CPU.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass(frozen=True)
class World:
    """Where this process stands in the launch.

    Attributes
    ----------
    rank, size : int
        this process's rank and the number of processes (0 and 1 without a launcher).
    device : str
        the torch device this rank computes on (``cuda:LOCAL_RANK`` for CUDA under torchrun).
    """

    rank: int
    size: int
    device: str

    @property
    def is_main(self) -> bool:
        """Whether this rank writes the results (rank 0).

        Returns
        -------
        bool
            True on rank 0.
        """
        return self.rank == 0

    def per_rank(self, path: os.PathLike | str) -> str:
        """``path`` itself in one process, ``{path}.rank{r}of{size}`` with several ranks.

        Parameters
        ----------
        path : os.PathLike or str
            a file every rank writes its own copy of (a fit checkpoint).

        Returns
        -------
        str
            this rank's file.
        """
        path = os.fspath(path)
        return path if self.size == 1 else f"{path}.rank{self.rank}of{self.size}"


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    if not value.isdigit():
        raise ValueError(
            f"environment variable {name} must be a non-negative integer, got {value!r}."
        )
    return int(value)


def rank_device(device: str | None, local_rank: int) -> str:
    """The device of the rank with ``local_rank`` on its machine.

    Parameters
    ----------
    device : str or None
        ``--device``: None picks ``cuda`` when available, else ``cpu``; a bare ``cuda``
        becomes this rank's GPU, ``cuda:LOCAL_RANK``.
    local_rank : int
        the rank on this machine (torchrun's ``LOCAL_RANK``).

    Returns
    -------
    str
        a torch device string.
    """
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return f"cuda:{local_rank}" if device == "cuda" else device


@contextmanager
def launched(device: str | None) -> Iterator[World]:
    """Join the process group that ``torchrun`` describes in the environment, if any.

    With ``WORLD_SIZE`` above 1 and no group yet, the group is initialised from the
    environment (``env://``) with NCCL on CUDA, gloo otherwise, and destroyed on exit.
    An already initialised group (a caller's own) is used and left alone.

    Parameters
    ----------
    device : str or None
        ``--device`` (see :func:`rank_device`).

    Yields
    ------
    World
        this process's rank, the world size and its device.
    """
    import torch
    import torch.distributed as dist

    size = _env_int("WORLD_SIZE", 1)
    own = size > 1 and not dist.is_initialized()
    if dist.is_initialized():
        size = dist.get_world_size()
    dev = rank_device(device, _env_int("LOCAL_RANK", 0))
    if own:
        if dev.startswith("cuda"):
            torch.cuda.set_device(dev)  # NCCL collectives and all_gather_object use it
        dist.init_process_group("nccl" if dev.startswith("cuda") else "gloo", init_method="env://")
    rank = dist.get_rank() if size > 1 else 0
    try:
        yield World(rank, size, dev)
    finally:
        if own:
            dist.destroy_process_group()
