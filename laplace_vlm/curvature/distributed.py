"""Fitting on several processes: each rank sums its shard, one all-reduce joins them."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

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


class RankFailure(RuntimeError):
    """Raised on the ranks whose block succeeded when another rank's block raised."""


@contextmanager
def failures_shared_across_ranks() -> Iterator[None]:
    """Make every rank raise when one rank's block raises, instead of leaving the others
    blocked in the next collective (the all-reduce of the factor sums).

    The ranks gather each other's error messages after the block; a rank that failed
    re-raises its own error, the others raise a :class:`RankFailure` that names the failed
    ranks and their messages (a bad shard's name reaches every rank's log). Without a process
    group of several ranks the block runs unchanged.

    Yields
    ------
    None
        once: the guarded block runs there.

    Raises
    ------
    RankFailure
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
    messages: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(messages, None if error is None else one_line(error))
    if error is not None:
        raise error
    failed = [f"rank {r}: {m}" for r, m in enumerate(messages) if m is not None]
    if failed:
        raise RankFailure(f"fit failed on another rank ({'; '.join(failed)}).")


def one_line(error: BaseException) -> str:
    """The last line of an error's message, without a leading ``SomeError:``.

    A loader worker's error reaches the main process with the worker's traceback in its
    message; its last line is the original message.

    Parameters
    ----------
    error : BaseException
        the error.

    Returns
    -------
    str
        one line.
    """
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return re.sub(r"^\w*(Error|Exception): ", "", lines[-1]) if lines else type(error).__name__
