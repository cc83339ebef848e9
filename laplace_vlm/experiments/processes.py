"""Independent experiment runs in worker processes, one torch thread each.

The experiments' matrices are small: one thread per process runs them fastest, and processes
(not threads) let several runs use the cores. Each run is seeded by its own arguments, so the
results do not depend on the number of workers or on which worker ran what.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


def run_in_processes(
    fn: Callable[..., Any],
    calls: Sequence[tuple],
    workers: int,
    on_result: Callable[[dict[int, Any]], None] | None = None,
    order: Sequence[int] | None = None,
) -> list[Any]:
    """``[fn(*args) for args in calls]``, in ``workers`` spawned processes (1: in this one).

    Parameters
    ----------
    fn : callable
        a module-level function (it is pickled by name).
    calls : sequence of tuple
        the positional arguments of every call (picklable).
    workers : int
        processes, ``>= 1``; 1 runs the calls here, in order.
    on_result : callable, optional
        called with ``{index: result}`` of every call finished so far, after each one.
    order : sequence of int, optional
        the order in which calls are submitted (e.g. the longest first); default: as given.

    Returns
    -------
    list
        the results, in the order of ``calls``.
    """
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive int, got {workers!r}.")
    order = list(range(len(calls))) if order is None else list(order)
    if sorted(order) != list(range(len(calls))):
        raise ValueError(f"order must be a permutation of range({len(calls)}), got {order}.")
    done: dict[int, Any] = {}
    if workers == 1:
        for i in order:
            done[i] = fn(*calls[i])
            if on_result:
                on_result(dict(sorted(done.items())))
        return [done[i] for i in range(len(calls))]
    context = multiprocessing.get_context("spawn")  # no forked torch thread pools
    with ProcessPoolExecutor(workers, context, initializer=_one_thread) as pool:
        futures = {pool.submit(fn, *calls[i]): i for i in order}
        for future in as_completed(futures):
            done[futures[future]] = future.result()
            if on_result:
                on_result(dict(sorted(done.items())))
    return [done[i] for i in range(len(calls))]
