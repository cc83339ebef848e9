"""Shared helpers of the benchmark scripts: threads, timing, peak memory, a fitted posterior.

Benchmarks print ratios measured in one run (both sides on the same machine and load);
they are never collected by pytest.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable

import torch

THREADS = 2  # the benchmark machine has 2 cores


def threads_from_argv(default: int = THREADS) -> int:
    """``--threads N`` on the command line (default 2: the machine's cores)."""
    import sys

    if "--threads" in sys.argv:
        return int(sys.argv[sys.argv.index("--threads") + 1])
    return default


def setup(threads: int = THREADS, seed: int = 0) -> None:
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    warnings.filterwarnings("ignore")


def timeit(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def compare(
    fns: dict[str, Callable[[], object]],
    rounds: int = 5,
    inner: dict[str, int] | None = None,
    warmup: int = 1,
) -> dict[str, float]:
    """Median seconds per call of each function, measured interleaved.

    Each round times every function once (``inner[name]`` calls, averaged): load from
    other processes on a shared machine then hits all of them alike, so their ratios are
    steadier than those of back-to-back measurements.
    """
    inner = inner or {}
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            calls = inner.get(name, 1)
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            times[name].append((time.perf_counter() - start) / calls)
    return {name: statistics.median(t) for name, t in times.items()}


def peak_bytes(fn: Callable[[], object]) -> tuple[int, object]:
    """Peak bytes of torch CPU tensor storage allocated while ``fn()`` runs, and its result.

    The measure ``tests/test_memory.py`` checks (it sees intermediates), so both agree.
    """
    tests = os.path.join(os.path.dirname(__file__), "..", "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    from test_memory import torch_peak_bytes

    return torch_peak_bytes(fn)


def vit_b32_posterior(
    d_img: int = 768,
    d_txt: int = 512,
    D: int = 512,
    contrastive: str = "clip",
    fit_batches: int = 4,
    batch: int = 256,
    bias: bool = False,
    **kwargs,
):
    """A DualEncoderLaplace with random ViT-B/32-sized heads, fitted on random activations."""
    from torch import nn

    from laplace_vlm import DualEncoderLaplace

    g = torch.Generator().manual_seed(0)
    W_i = torch.randn(D, d_img, generator=g) / d_img**0.5
    W_t = torch.randn(D, d_txt, generator=g) / d_txt**0.5
    if bias:  # nn.Linear heads with a bias each
        heads = []
        for W in (W_i, W_t):
            linear = nn.Linear(W.shape[1], D)
            with torch.no_grad():
                linear.weight.copy_(W)
                linear.bias.copy_(0.1 * torch.randn(D, generator=g))
            heads.append(linear)
        W_i, W_t = heads
    la = DualEncoderLaplace(image_projection=W_i, text_projection=W_t, logit_scale=4.6,
                            contrastive=contrastive, prior_precision=10.0, **kwargs)  # fmt: skip
    la.fit(
        [(torch.randn(batch, d_img, generator=g), torch.randn(batch, d_txt, generator=g))
         for _ in range(fit_batches)]
    )  # fmt: skip
    return la


def fmt_bytes(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"
