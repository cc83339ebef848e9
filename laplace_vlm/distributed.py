"""Fitting on several processes: each rank sums its shard, one all-reduce joins them."""

from __future__ import annotations

import torch.distributed as dist

from laplace_vlm.factor_sums import FactorSums


def is_distributed() -> bool:
    """True inside an initialised ``torch.distributed`` process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sums(sums: FactorSums) -> FactorSums:
    """Sum ``sums`` over all ranks in place (a no-op without a process group).

    The sums are additive over pairs, so the result equals one process fitting the union
    of the shards, with ``n`` the total pair count. Works with gloo (CPU) and NCCL (GPU):
    the tensors stay on the device they were computed on.
    """
    if is_distributed():
        for tensor in sums.tensors().values():
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return sums
