"""Distributed fit: two gloo ranks, each on its own shard, end with the factors of the union."""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_dual_encoder_laplace import loader, make_problem

from laplace_vlm import DualEncoderLaplace
from laplace_vlm.curvature.distributed import all_reduce_sums, is_distributed
from laplace_vlm.curvature.factor_sums import FactorSums

pytestmark = pytest.mark.usefixtures("float64")

WORLD_SIZE = 2
N_PAIRS = 40
# uneven shards of whole class batches: rank 0 gets 3 batches (24 pairs), rank 1 two (16)
SHARDS = {0: (0, 24), 1: (24, 40)}
TOL = dict(rtol=1e-10, atol=1e-12)


def _problem(contrastive: str):
    return make_problem(bias=True, n=N_PAIRS, contrastive=contrastive)


def _state(la: DualEncoderLaplace) -> dict[str, torch.Tensor]:
    """What must agree between ranks and with one process: factors, N and the loss."""
    state = {
        f"H.{i}.{j}": F.clone() for i, b in enumerate(la.H_facs.kfacs) for j, F in enumerate(b)
    }
    state["n_data"] = torch.tensor(la.n_data)
    state["loss"] = la.loss.clone()
    return state


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    """One rank: fit its shard (CLIP and SigLIP), then a fit where this rank's shard is empty."""
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE
    )
    try:
        assert is_distributed()
        results = {}
        for contrastive in ("clip", "siglip"):
            kw, a_i, a_t = _problem(contrastive)
            start, stop = SHARDS[rank]
            la = DualEncoderLaplace(**kw)
            la.fit(loader(a_i[start:stop], a_t[start:stop]))
            results.update({f"{contrastive}.{k}": v for k, v in _state(la).items()})
        # rank 1 holds no pairs at all: only the all-reduce brings it the factors
        kw, a_i, a_t = _problem("clip")
        la = DualEncoderLaplace(**kw)
        la.fit(loader(a_i, a_t) if rank == 0 else [])
        results.update({f"empty.{k}": v for k, v in _state(la).items()})
        # rank 1 meets a NaN batch: both ranks must raise instead of rank 0 waiting forever
        bad = a_t.clone()
        bad[0] = float("nan")
        try:
            DualEncoderLaplace(**kw).fit(loader(a_i[:8], a_t[:8] if rank == 0 else bad[:8]))
            results["failure"] = "no error"
        except (ValueError, RuntimeError) as err:
            results["failure"] = str(err)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _start_method() -> str:
    # fork inherits the imported modules: a spawned rank re-imports laplace (seconds of CPU
    # each on a shared 2-core box); conftest's single intra-op thread keeps fork safe
    return "fork" if "fork" in mp.get_all_start_methods() else "spawn"


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    """Run both ranks once; fail (never hang) if a rank deadlocks in the collective."""
    tmp = tmp_path_factory.mktemp("dist")
    args = (str(tmp / "pg_init"), str(tmp))
    ctx = mp.start_processes(_worker, args, WORLD_SIZE, join=False, start_method=_start_method())
    deadline = time.monotonic() + 120
    try:
        while not ctx.join(timeout=1):  # raises ProcessRaisedException if a rank failed
            if time.monotonic() > deadline:
                pytest.fail("distributed fit did not finish within 120 s")
    finally:
        for process in ctx.processes:
            if process.is_alive():
                process.kill()
    return [torch.load(tmp / f"rank{r}.pt", weights_only=True) for r in range(WORLD_SIZE)]


def _single_process(contrastive: str) -> dict[str, torch.Tensor]:
    kw, a_i, a_t = _problem(contrastive)
    la = DualEncoderLaplace(**kw)
    la.fit(loader(a_i, a_t))  # the union, batch by batch in one process
    return _state(la)


@pytest.mark.parametrize("case, contrastive", [("clip", "clip"), ("siglip", "siglip"),
                                               ("empty", "clip")])  # fmt: skip
def test_every_rank_ends_with_the_single_process_fit_of_the_union(rank_results, case, contrastive):
    expected = _single_process(contrastive)
    assert expected["n_data"].item() == N_PAIRS
    for rank, results in enumerate(rank_results):
        for key, want in expected.items():
            got = results[f"{case}.{key}"]
            torch.testing.assert_close(got, want, **TOL, msg=lambda m: f"rank {rank} {key}: {m}")


def test_a_failing_rank_makes_every_rank_raise(rank_results):
    assert "another rank" in rank_results[0]["failure"]
    assert "NaN" in rank_results[1]["failure"]


def test_shards_alone_differ_from_the_union():
    # guards the comparison above: without the all-reduce a rank would keep its shard's sums
    kw, a_i, a_t = _problem("clip")
    la = DualEncoderLaplace(**kw)
    la.fit(loader(a_i[:24], a_t[:24]))
    union = _single_process("clip")
    assert la.n_data == 24
    assert not torch.allclose(la.H_facs.kfacs[0][0], union["H.0.0"])


def test_all_reduce_is_a_no_op_without_a_process_group():
    assert not is_distributed()
    sums = FactorSums.zeros((3, 2, 3, 4), torch.ones(1, dtype=torch.float64))
    sums.B_image += 1.5
    assert all_reduce_sums(sums) is sums
    torch.testing.assert_close(sums.B_image, torch.full((3, 3), 1.5, dtype=torch.float64))
