"""Scale: fit throughput on 1 and 2 processes (gloo), predictive throughput and peak memory
at N = 50,000 images x C = 1,000 classes; all as ratios to the deterministic model's cost.

ViT-B/32 sizes (d_img = 768, d_txt = 512, D = 512), cached activations, float32.

- fit: pairs per second of ``DualEncoderLaplace.fit`` over class batches of 256 pairs, in
  one process (all threads) and in two gloo processes (one thread each, a shard each, one
  all-reduce); against the deterministic cost of the same pairs (projections, normalisation,
  logits and the contrastive loss: what computing the MAP loss costs).
- predict: ``predictive_moments`` with ``chunk_size=4096`` against the deterministic logits;
  peak memory from the torch CPU allocator (profiler memory events), in total and beyond
  the `(N, C)` outputs themselves.

Run: python benchmarks/bench_scale.py [--threads N]
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(__file__))
from _common import (  # noqa: E402
    compare,
    fmt_bytes,
    peak_bytes,
    setup,
    threads_from_argv,
    vit_b32_posterior,
)

D_IMG, D_TXT, D = 768, 512, 512
BATCH, N_BATCHES = 256, 32
N_PRED, C_PRED, CHUNK = 50_000, 1_000, 4096


def batches(start: int = 0, stop: int = N_BATCHES):
    """Class batches generated from their index: every process can make its own shard."""
    for b in range(start, stop):
        g = torch.Generator().manual_seed(1000 + b)
        yield torch.randn(BATCH, D_IMG, generator=g), torch.randn(BATCH, D_TXT, generator=g)


def deterministic_fit_cost(la, data) -> None:
    """What the MAP model computes on the pairs: embeddings, logits, the contrastive loss."""
    from torch.nn import functional as F

    with torch.no_grad():
        for a_i, a_t in data:
            logits = la.heads({"image": a_i, "text": a_t})
            labels = torch.arange(len(a_i))
            F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)


def _rank(rank: int, world: int, init_file: str, out_file: str) -> None:
    setup(threads=1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)  # fmt: skip
    la = vit_b32_posterior(D_IMG, D_TXT, D)
    per_rank = N_BATCHES // world
    shard = list(batches(rank * per_rank, (rank + 1) * per_rank))
    la.fit(shard[:1])  # warm-up (not distributed-relevant: overwritten below)
    times = []
    for _ in range(3):
        dist.barrier()
        start = time.perf_counter()
        la.fit(shard)  # sums its shard, one all-reduce
        times.append(time.perf_counter() - start)
    assert la.n_data == N_BATCHES * BATCH
    if rank == 0:
        torch.save(torch.tensor(sorted(times)[1]), out_file)
    dist.destroy_process_group()


def fit_two_processes() -> float:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "time.pt")
        mp.spawn(_rank, args=(2, os.path.join(tmp, "pg"), out), nprocs=2, join=True)
        return float(torch.load(out))


def main() -> None:
    threads = threads_from_argv()
    setup(threads)
    la = vit_b32_posterior(D_IMG, D_TXT, D)
    data = list(batches())
    pairs = N_BATCHES * BATCH
    print(f"fit: {pairs} pairs in class batches of {BATCH}, d_img = {D_IMG}, d_txt = {D_TXT}, "
          f"D = {D}, float32")  # fmt: skip
    t = compare({"fit": lambda: la.fit(data), "det": lambda: deterministic_fit_cost(la, data)},
                rounds=3)  # fmt: skip
    torch.set_num_threads(1)
    t_one = compare({"fit": lambda: la.fit(data)}, rounds=3)["fit"]
    torch.set_num_threads(threads)
    t_two = fit_two_processes()
    print(f"  deterministic (MAP loss), {threads} threads: {pairs / t['det']:10,.0f} pairs/s")
    print(f"  fit, 1 process x {threads} threads:          {pairs / t['fit']:10,.0f} pairs/s  "
          f"= {t['fit'] / t['det']:.1f}x the deterministic cost")  # fmt: skip
    print(f"  fit, 1 process x 1 thread:            {pairs / t_one:10,.0f} pairs/s")
    print(f"  fit, 2 processes x 1 thread (gloo):   {pairs / t_two:10,.0f} pairs/s  "
          f"= {t_two / t['det']:.1f}x the deterministic cost; {t_one / t_two:.2f}x the "
          f"1-thread and {t['fit'] / t_two:.2f}x the {threads}-thread "
          "1-process throughput")  # fmt: skip

    g = torch.Generator().manual_seed(1)
    x = {"image": torch.randn(N_PRED, D_IMG, generator=g),
         "text": torch.randn(C_PRED, D_TXT, generator=g)}  # fmt: skip
    print(f"predict: N = {N_PRED:,} x C = {C_PRED:,}, chunk_size = {CHUNK}, {threads} threads")

    def det():
        with torch.no_grad():
            return la.heads(x)

    fns = {"deterministic": det}
    for method in ("probcosine", "probcosine_diag", "glm"):
        fns[method] = lambda m=method: la.predictive_moments(x, pred_type=m, chunk_size=CHUNK)
    t = compare(fns, rounds=3)
    out_bytes = N_PRED * C_PRED * 4  # one (N, C) float32 tensor
    peak_det, _ = peak_bytes(det)
    print(f"  deterministic logits: {N_PRED / t['deterministic']:10,.0f} images/s, peak "
          f"{fmt_bytes(peak_det)} (output {fmt_bytes(out_bytes)})")  # fmt: skip
    for method in ("probcosine", "probcosine_diag", "glm"):
        peak, _ = peak_bytes(fns[method])
        print(f"  {method:16s}      {N_PRED / t[method]:10,.0f} images/s = "
              f"{t[method] / t['deterministic']:.2f}x the time; peak {fmt_bytes(peak)} = "
              f"{peak / peak_det:.2f}x, beyond the mean and variance "
              f"{fmt_bytes(peak - 2 * out_bytes)}")  # fmt: skip


if __name__ == "__main__":
    main()
