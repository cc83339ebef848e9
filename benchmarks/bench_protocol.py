"""The paper's curvature protocol: KFAC fit of both heads over class batches, against the MAP logits.

Full protocol (``--full``): 327,680 pairs in class batches of 32,768 (each batch's texts are
the classes of its images and vice versa), ViT-B/32 sizes (d_img = 768, d_txt = 512 -> D =
512), feature mode, random activations, ``chunk_size = 4096`` (the `(chunk, K)` working set;
one `32,768 x 32,768` float32 logit matrix alone is 4 GiB). ``--scaled`` (default) is the
quick run for a 2-core machine: 4 batches of 8,192 pairs.

Every configuration runs in a fresh subprocess (peak RSS from ``getrusage``; on CUDA
``torch.cuda.max_memory_allocated``), in interleaved rounds, median wall time reported; the
batches are generated from their index and the generation time is not counted.

Configurations
--------------
- ``logits``: MAP logits only: embed both towers, normalise, one `M x K` logit GEMM per
  chunk of ``chunk_size`` rows into one reused buffer (no loss).
- ``map``: the MAP baseline: ``logits`` plus the loss from the same logit matrix (CLIP:
  InfoNCE both ways, the column log-sum-exp accumulated over row chunks; SigLIP: the
  pairwise sigmoid loss), with reused buffers. All ratios are to this one.
- ``fit``: ``DualEncoderLaplace(None, image_projection=W_img, text_projection=W_txt,
  logit_scale=..., contrastive=..., chunk_size=...).fit(loader)``, exactly as the library
  runs it: the closed-form backend's
  :func:`~laplace_vlm.curvature.closed_form.pair_factors` (both heads and the loss from
  shared logits).

FLOP floor
----------
GEMM FLOPs per class batch of ``M`` pairs, ``K = M`` classes, a GEMM `(p, q) @ (q, r)`
counted as ``2 p q r`` (normalisation, softmax/sigmoid, reductions and GEMVs are
``O(M K)``, at most ``1/D`` of one logit GEMM each, and not counted)::

    MAP  = 2 M (d_img + d_txt) D            embeddings of both towers
         + 2 M K D                          one logit matrix
    fit  = 2 M (d_img + d_txt) D            embeddings of both towers
         + 2 M (d_img^2 + d_txt^2)          A = a^T a of both heads
         + G x 2 M K D                      logit-sized GEMMs (below)
         + 2 x (4 M D^2 + 2 K D^2)          CLIP D^2 terms per head: [X; Q]^T [Y; Q/2] and
                                            T^T diag(c) T   (SigLIP: 2 M D^2 + 2 K D^2)
    floor = fit / MAP

``G``: per head the logits ``s U T^T`` and one stacked GEMM ``[p * l; p] @ T`` (CLIP: 3) or
``(w * l) @ T`` (SigLIP: 2); from shared logits CLIP needs 6 (each head its own row chunks;
the loss from their softmax), SigLIP 3 (one logit matrix for both heads and the loss).

Output: absolute times on CPU (or on the CUDA device with ``--device cuda``), peak memory,
ratio to ``map``, the floor and measured/floor, pairs per second.

Run: python benchmarks/bench_protocol.py [--scaled | --full] [--batches N] [--chunk C] ...
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import THREADS, setup  # noqa: E402

CONFIGS = ("logits", "map", "fit")
PRESETS = {"scaled": dict(batch=8192, batches=4, chunk=4096),
           "full": dict(batch=32768, batches=10, chunk=4096)}  # fmt: skip


# ------------------------------------------------------------------------------ FLOPs
def map_flops(M: int, K: int, d_img: int, d_txt: int, D: int) -> int:
    return 2 * M * (d_img + d_txt) * D + 2 * M * K * D


def fit_flops(M, K, d_img, d_txt, D, contrastive) -> int:
    logit_gemms = 6 if contrastive == "clip" else 3  # ``G``, of ``2 M K D`` FLOPs each
    d2 = 2 * ((4 if contrastive == "clip" else 2) * M * D**2 + 2 * K * D**2)
    return (
        2 * M * (d_img + d_txt) * D
        + 2 * M * (d_img**2 + d_txt**2)
        + logit_gemms * 2 * M * K * D
        + d2
    )


def floor(args) -> float:
    M = K = args.batch
    dims = (args.d_img, args.d_txt, args.dim)
    return fit_flops(M, K, *dims, args.contrastive) / map_flops(M, K, *dims)


# ------------------------------------------------------------------ the configurations
def weights(args, device, dtype):
    g = torch.Generator().manual_seed(0)
    W_i = torch.randn(args.dim, args.d_img, generator=g) / args.d_img**0.5
    W_t = torch.randn(args.dim, args.d_txt, generator=g) / args.d_txt**0.5
    return W_i.to(device, dtype), W_t.to(device, dtype)


def posterior(args, device, dtype):
    from laplace_vlm import DualEncoderLaplace

    W_i, W_t = weights(args, device, dtype)
    kw = dict(logit_bias=-10.0) if args.contrastive == "siglip" else {}
    return DualEncoderLaplace(None, image_projection=W_i, text_projection=W_t,
                              logit_scale=4.6 if args.contrastive == "clip" else 2.3,
                              contrastive=args.contrastive, chunk_size=args.chunk,
                              **kw)  # fmt: skip


class Batches:
    """Class batch ``b`` generated from seed ``1000 + b``; ``generating`` counts the seconds."""

    def __init__(self, args, device, dtype, n=None, batch=None):
        self.args, self.device, self.dtype = args, device, dtype
        self.n, self.batch = n or args.batches, batch or args.batch
        self.generating = self.generating_cpu = 0.0

    def __iter__(self):
        for b in range(self.n):
            start, start_cpu = time.perf_counter(), time.process_time()
            g = torch.Generator(self.device).manual_seed(1000 + b)
            a_i = torch.randn(self.batch, self.args.d_img, generator=g, device=self.device)
            a_t = torch.randn(self.batch, self.args.d_txt, generator=g, device=self.device)
            a_i, a_t = a_i.to(self.dtype), a_t.to(self.dtype)
            _sync(self.device)
            self.generating += time.perf_counter() - start
            self.generating_cpu += time.process_time() - start_cpu
            yield a_i, a_t


def map_pass(la, loader, with_loss: bool) -> torch.Tensor:
    """MAP logits (and loss) over the batches, in row chunks of ``la.chunk_size``."""
    heads, total = la.heads, None
    with torch.no_grad():
        for a_i, a_t in loader:
            z, t = heads.embed_image(a_i), heads.embed_text(a_t)
            u = torch.nn.functional.normalize(z, dim=-1) * heads.scale
            v = torch.nn.functional.normalize(t, dim=-1)
            M, K = len(u), len(v)
            step = min(la.chunk_size or M, M)
            L = u.new_empty(step, K)
            E = u.new_empty(step, K) if with_loss else None
            loss = u.new_zeros(())
            col_max = u.new_full((K,), -float("inf"))
            col_sum = u.new_zeros(K)
            for s in range(0, M, step):
                m = min(step, M - s)
                logits = torch.mm(u[s : s + m], v.T, out=L[:m])
                if heads.logit_bias is not None:
                    logits.add_(heads.logit_bias)
                if not with_loss:
                    continue
                e = E[:m]
                diag = logits.diagonal(s)
                if la.contrastive == "siglip":  # -sum log sigmoid(-l) - sum_diag l
                    torch.neg(logits, out=e)
                    torch._C._nn.log_sigmoid(e, out=e)
                    loss -= e.sum() + diag.sum()
                    continue
                mx = logits.amax(1, keepdim=True)  # image -> text: rows
                torch.sub(logits, mx, out=e).exp_()
                loss += (mx.squeeze(1) + e.sum(1).log() - diag).sum()
                new_max = torch.maximum(col_max, logits.amax(0))  # text -> image: columns
                torch.sub(logits, new_max, out=e).exp_()
                col_sum.mul_((col_max - new_max).exp_()).add_(e.sum(0))
                col_max = new_max
                loss -= diag.sum()
            if with_loss and la.contrastive == "clip":
                loss += (col_max + col_sum.log()).sum()
            total = loss if total is None else total + loss
    return total


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(args) -> dict:
    """Run one configuration in this (fresh) process: seconds, peak and baseline memory."""
    setup(args.threads)
    device, dtype = args.device, getattr(torch, args.dtype)
    la = posterior(args, device, dtype)
    if args.worker == "fit":
        run = la.fit
    else:
        run = lambda loader: map_pass(la, loader, args.worker == "map")  # noqa: E731
    run(Batches(args, device, dtype, n=1, batch=min(512, args.batch)))  # warm-up, untimed
    loader = Batches(args, device, dtype)
    _sync(device)
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = _rss_bytes()
    start, start_cpu = time.perf_counter(), time.process_time()
    run(loader)
    _sync(device)
    seconds = time.perf_counter() - start - loader.generating
    cpu = time.process_time() - start_cpu - loader.generating_cpu
    peak = (torch.cuda.max_memory_allocated(device) if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # fmt: skip
    return dict(seconds=seconds, cpu=cpu, peak=peak, base=base)


# ------------------------------------------------------------------------------ driver
def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--scaled", action="store_true",
                      help="quick run (default): 4 batches of 8,192 pairs, chunk 4,096")  # fmt: skip
    mode.add_argument("--full", action="store_true",
                      help="the paper's protocol: 10 batches of 32,768 pairs, chunk 4,096")  # fmt: skip
    p.add_argument("--batch", type=int, help="pairs per class batch (M = K)")
    p.add_argument("--batches", type=int, help="number of class batches")
    p.add_argument("--chunk", type=int, help="chunk_size; 0 = None (one chunk per batch)")
    p.add_argument("--d-img", type=int, default=768)
    p.add_argument("--d-txt", type=int, default=512)
    p.add_argument("--dim", type=int, default=512, help="embedding dim D")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    p.add_argument("--contrastive", default="clip", choices=("clip", "siglip"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=THREADS)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median)")
    p.add_argument("--clock", default="wall", choices=("wall", "cpu"),
                   help="what the ratios compare: wall time, or the process's CPU time (with "
                        "--threads 1 the measure least disturbed by other load)")  # fmt: skip
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"subset of {CONFIGS}")
    p.add_argument("--worker", choices=CONFIGS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    preset = PRESETS["full" if args.full else "scaled"]
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.chunk == 0:
        args.chunk = None
    return args, argv if argv is not None else sys.argv[1:]


def spawn(config: str, argv: list[str]) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--worker", config]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None) -> None:
    args, raw = parse(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    configs = [c for c in args.configs.split(",") if c]
    pairs = args.batch * args.batches
    M = K = args.batch
    where = "CPU" if torch.device(args.device).type == "cpu" else args.device
    print(f"curvature protocol: {pairs:,} pairs in {args.batches} class batches of {M:,} "
          f"(K = {K:,} classes), d_img = {args.d_img}, d_txt = {args.d_txt}, D = {args.dim}, "
          f"{args.contrastive}, {args.dtype}, chunk_size = {args.chunk}, {args.threads} threads; "
          f"absolute times on {where}, {args.clock} clock, median of {args.rounds} interleaved rounds, "
          f"a fresh process each")  # fmt: skip
    runs: dict[str, list[dict]] = {c: [] for c in configs}
    for _ in range(args.rounds):
        for config in configs:
            runs[config].append(spawn(config, raw))
    key = "seconds" if args.clock == "wall" else "cpu"
    t = {c: statistics.median(r[key] for r in runs[c]) for c in configs}
    peak = {c: max(r["peak"] for r in runs[c]) for c in configs}
    base = {c: min(r["base"] for r in runs[c]) for c in configs}
    ref, gemm = t.get("map"), t.get("logits")
    mem = "peak alloc" if where != "CPU" else "peak RSS"
    print(f"{'configuration':14s} {args.clock + ' (s)':>9s} {mem + ' GiB':>13s} {'beyond base':>11s} "
          f"{'x MAP':>7s} {'floor':>6s} {'meas/floor':>10s} {'x logits':>9s} "
          f"{'logits/floor':>12s} {'pairs/s':>10s}")  # fmt: skip
    dash = "-"
    for c in configs:
        fl = floor(args) if c == "fit" else None
        x_map = t[c] / ref if ref else None
        x_gemm = t[c] / gemm if gemm else None
        cols = [f"{x_map:7.2f}" if x_map else f"{dash:>7s}", f"{fl:6.2f}" if fl else f"{dash:>6s}",
                f"{x_map / fl:10.2f}" if fl and x_map else f"{dash:>10s}",
                f"{x_gemm:9.2f}" if x_gemm else f"{dash:>9s}",
                f"{x_gemm / fl:12.2f}" if fl and x_gemm else f"{dash:>12s}"]  # fmt: skip
        print(f"{c:14s} {t[c]:9.2f} {peak[c] / 2**30:13.2f} {(peak[c] - base[c]) / 2**30:11.2f} "
              f"{' '.join(cols)} {pairs / t[c]:10,.0f}")  # fmt: skip
    step = min(args.chunk or M, M)
    print(f"one (chunk, K) = ({step:,}, {K:,}) {args.dtype} matrix = "
          f"{step * K * torch.finfo(getattr(torch, args.dtype)).bits / 8 / 2**30:.2f} GiB; "
          f"'beyond base' = peak minus the process's memory before the timed pass")  # fmt: skip
    print("floor = GEMM FLOPs of the configuration / GEMM FLOPs of MAP (embeddings + one logit "
          "matrix; the loss adds none), see the module docstring; 'x MAP' and 'x logits' are "
          f"{args.clock}-time ratios to the map and logits rows")  # fmt: skip


if __name__ == "__main__":
    main()
