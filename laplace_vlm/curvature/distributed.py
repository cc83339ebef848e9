"""Fitting on several processes: each rank sums its shard, one all-reduce joins them."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist

from laplace_vlm.curvature.factor_sums import FactorSums


def is_distributed() -> bool:
    """Whether this process is in an initialised ``torch.distributed`` group of several ranks.

    Returns
    -------
    bool
        True inside an initialised process group of more than one rank.
    """
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sums(sums: FactorSums) -> FactorSums:
    """Sum ``sums`` over all ranks in place (a no-op without a process group).

    The sums are additive over pairs, so the result equals one process fitting the union
    of the shards, with ``n`` the total pair count. Works with gloo (CPU) and NCCL (GPU):
    the tensors stay on the device they were computed on.

    Parameters
    ----------
    sums : FactorSums
        this rank's sums, overwritten with the sums over all ranks.

    Returns
    -------
    FactorSums
        ``sums`` itself.
    """
    if is_distributed():
        for tensor in sums.tensors().values():
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return sums


@contextmanager
def failures_shared_across_ranks() -> Iterator[None]:
    """Make every rank raise when one rank's block raises, instead of leaving the others
    blocked in the next collective (the all-reduce of the factor sums).

    Each rank all-reduces a failure flag after the block; a rank that failed re-raises its
    own error, the others raise a ``RuntimeError`` that says another rank failed. Without a
    process group of several ranks the block runs unchanged.

    Yields
    ------
    None
        once: the guarded block runs there.

    Raises
    ------
    RuntimeError
        on the ranks whose block succeeded when another rank's block raised.
    """
    if not is_distributed():
        yield
        return
    error: BaseException | None = None
    try:
        yield
    except Exception as err:  # shared below, then re-raised
        error = err
    flag = torch.tensor([float(error is not None)])
    if dist.get_backend() == "nccl":
        flag = flag.cuda()
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if error is not None:
        raise error
    if flag.item() > 0:
        raise RuntimeError("fit failed on another rank; see that rank's error.")
