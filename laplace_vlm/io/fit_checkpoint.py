"""Resumable fits: partial KFAC sums written atomically every few batches."""

from __future__ import annotations

import os

import torch

from laplace_vlm.io.safetensors_file import read_safetensors, write_safetensors
from laplace_vlm.validation import check_finite

FORMAT = "laplace_vlm.fit_checkpoint"
Sums = dict[str, torch.Tensor]


class FitCheckpoint:
    """Partial sums of one ``fit`` call at ``path``, saved every ``every`` batches.

    A deterministic loader replayed after a crash skips the batches already counted and
    ends with the same factors as an uninterrupted run. ``key`` ties the file to one
    posterior (heads fingerprint, contrastive type, backend, rank and world size) so a
    stale file is never mixed in.

    Parameters
    ----------
    path : str or os.PathLike
        the checkpoint file.
    every : int
        save after every ``every``-th batch; at least 1.
    key : str
        what the file must match to be resumed (:func:`checkpoint_key`).

    Raises
    ------
    ValueError
        if ``every`` is below 1.
    """

    def __init__(self, path: str | os.PathLike, every: int, key: str) -> None:
        if every < 1:
            raise ValueError(f"checkpoint_every must be a positive integer, got {every}.")
        self.path, self.every, self.key = os.fspath(path), every, key

    def resume(self, like: Sums) -> tuple[Sums, int]:
        """The saved sums and the number of batches they cover, or ``(like, 0)``.

        Parameters
        ----------
        like : dict of str to torch.Tensor
            empty sums: their names, shapes, dtypes and device are what the file must hold.

        Returns
        -------
        sums : dict of str to torch.Tensor
            the saved sums, on the device and in the dtypes of ``like``; ``like`` itself
            if there is no file.
        batches : int
            the number of batches they cover.

        Raises
        ------
        ValueError
            if the file is unreadable, belongs to another fit (``key`` differs) or is
            incomplete, misshapen or not finite.
        """
        if not os.path.exists(self.path):
            return like, 0
        device = str(next(iter(like.values())).device)
        try:
            tensors, meta = read_safetensors(self.path, FORMAT, "laplace-vlm fit checkpoint",
                                             device)  # fmt: skip
        except ValueError as err:
            raise ValueError(f"checkpoint {self.path} is unreadable: {err}") from err
        if meta.get("key") != self.key:
            raise ValueError(
                f"checkpoint {self.path} belongs to another fit (heads, likelihood, rank or "
                "world size differ): delete it or pass another path."
            )
        return self._validated(like, tensors, meta), int(meta["batches"])

    def _validated(self, like: Sums, tensors: Sums, meta: dict) -> Sums:
        """The saved sums, refused with a clear error if a hand-edited file is incomplete."""
        expected = like
        if set(tensors) != set(expected) or not str(meta.get("batches", "")).isdigit():
            raise ValueError(
                f"checkpoint {self.path} is incomplete (tensors {sorted(tensors)}, batches "
                f"{meta.get('batches')!r}): delete it to start the fit afresh."
            )
        for name, value in tensors.items():
            if value.shape != expected[name].shape:
                raise ValueError(
                    f"checkpoint {self.path}: {name} has shape {tuple(value.shape)}, "
                    f"expected {tuple(expected[name].shape)}."
                )
            check_finite(f"checkpoint {self.path}: {name}", value)
        return {k: v.to(expected[k].dtype) for k, v in tensors.items()}

    def finish(self) -> None:
        """Delete the file once the fit has completed and its sums are in the posterior.

        A file left behind would make a later fit with the same heads but another loader
        skip that loader's first batches and add the old sums instead.
        """
        if os.path.exists(self.path):
            os.remove(self.path)

    def maybe_save(self, sums: Sums, batches: int) -> None:
        """Save after every ``every``-th batch (write to a temporary file, then rename).

        Parameters
        ----------
        sums : dict of str to torch.Tensor
            the partial sums so far.
        batches : int
            the number of batches they cover; saved when a multiple of ``every``.
        """
        if batches % self.every == 0:
            self.save(sums, batches)

    def save(self, sums: Sums, batches: int) -> None:
        """Write ``sums`` and the number of batches they cover (atomically, replacing).

        Parameters
        ----------
        sums : dict of str to torch.Tensor
            the partial sums.
        batches : int
            the number of batches they cover.
        """
        meta = {"format": FORMAT, "key": self.key, "batches": str(batches)}
        write_safetensors(self.path, sums, meta, overwrite=True)


def checkpoint_key(fingerprint: str, contrastive: str, curvature: str) -> str:
    """What a checkpoint must match to be resumed: heads, likelihood, backend, rank and world.

    The world size is part of it because the shards, hence each rank's partial sums, change
    with the number of processes.

    Parameters
    ----------
    fingerprint : str
        the heads' fingerprint (:func:`laplace_vlm.io.posterior_file.heads_fingerprint`).
    contrastive : str
        the contrastive type.
    curvature : str
        the curvature backend's name.

    Returns
    -------
    str
        ``"{fingerprint}:{contrastive}:{curvature}:rank{rank}of{world}"``; rank 0 of 1
        outside an initialised ``torch.distributed`` process group.
    """
    import torch.distributed as dist

    rank, world = 0, 1
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    return f"{fingerprint}:{contrastive}:{curvature}:rank{rank}of{world}"
