"""``laplace-vlm fit`` under torchrun: 2 gloo ranks equal one process, resume after SIGKILL,
a bad shard on one rank ends every rank with its name.

The ranks are forked processes with torchrun's environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``): the command's own code path, without
the seconds a fresh interpreter per rank costs on a shared 2-core machine.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import sys
import tarfile
import time

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from conftest import TINY_TEXT, TINY_VISION
from PIL import Image
from safetensors import safe_open

from laplace_vlm import DualEncoderLaplace
from laplace_vlm.cli.main import main

WORLD = 2
N_SHARDS, PER_SHARD, BATCH = 4, 4, 2  # whole class batches per shard: the same batches on any split
TOL = dict(rtol=1e-10, atol=1e-12)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny registered open_clip config and its weights (the ranks fork with it registered)."""
    import open_clip

    root = tmp_path_factory.mktemp("tiny_dist_clip")
    config = {"embed_dim": 16, "vision_cfg": TINY_VISION, "text_cfg": TINY_TEXT}
    (root / "tiny-dist-clip.json").write_text(json.dumps(config))
    open_clip.add_model_config(root)
    torch.manual_seed(0)
    path = root / "tiny.pt"
    torch.save(open_clip.create_model("tiny-dist-clip").state_dict(), path)
    return path


def _jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def _write_shard(path, first: int, corrupt: int | None = None) -> None:
    with tarfile.open(path, "w") as tar:
        for i in range(first, first + PER_SHARD):
            image = b"\xff\xd8 not a jpeg" if i == corrupt else _jpeg(i)
            for name, payload in ((f"{i:05d}.jpg", image), (f"{i:05d}.txt", f"pair {i}".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shards")
    for s in range(N_SHARDS):
        _write_shard(folder / f"{s:06d}.tar", s * PER_SHARD)
    return folder


def _argv(checkpoint, data, output, *extra: str) -> list[str]:
    model = ["--model", "tiny-dist-clip", "--pretrained", str(checkpoint), "--device", "cpu"]
    return ["fit", *model, "--no-progress", "--precision", "fp64", "--data", str(data),
            "--batch-size", str(BATCH), "--output", str(output), *extra]  # fmt: skip


def _rank(rank: int, argv: list[str], port: int, log_dir: str, delay: float) -> None:
    """One torchrun rank: its environment, then the command; exit code and stderr to files."""
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    if delay:  # a slow disk: each class batch takes `delay` seconds to collate
        from laplace_vlm.cli import pairs

        collate = pairs._Collate.__call__
        pairs._Collate.__call__ = lambda self, s: (time.sleep(delay), collate(self, s))[1]
    sys.stderr = err = io.StringIO()
    code = main(argv)
    with open(os.path.join(log_dir, f"rank{rank}.log"), "w") as f:
        f.write(f"{code}\n{err.getvalue()}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(argv, log_dir, delay: float = 0.0):
    start = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    args = (argv, _free_port(), str(log_dir), delay)
    return mp.start_processes(_rank, args, WORLD, join=False, start_method=start)


def _join(ctx, log_dir, timeout: float = 120.0) -> list[tuple[int, str]]:
    """Wait for both ranks (never hang); their exit codes and stderr."""
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=0.5):
            if time.monotonic() > deadline:
                pytest.fail(f"ranks did not finish within {timeout:.0f} s")
    finally:
        for process in ctx.processes:
            if process.is_alive():
                process.kill()
    logs = [(log_dir / f"rank{r}.log").read_text().split("\n", 1) for r in range(WORLD)]
    return [(int(code), err) for code, err in logs]


def _factors(path) -> dict[str, torch.Tensor]:
    la = DualEncoderLaplace.load(path)
    state = {f"H.{i}.{j}": F for i, b in enumerate(la.H_facs.kfacs) for j, F in enumerate(b)}
    state.update(n=torch.tensor(la.n_data), loss=la.loss, prior=la.prior_precision)
    return state


def _assert_same(got: dict, want: dict) -> None:
    assert got["n"].item() == want["n"].item() == N_SHARDS * PER_SHARD
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, **TOL, msg=lambda m: f"{key}: {m}")


@pytest.fixture(scope="module")
def one_process(checkpoint, shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "posterior.safetensors"
    assert main(_argv(checkpoint, shards, out)) == 0
    return _factors(out)


def test_two_ranks_with_loader_workers_equal_one_process(checkpoint, shards, one_process, tmp_path):
    out = tmp_path / "posterior.safetensors"
    pattern = str(shards / f"{{000000..{N_SHARDS - 1:06d}}}.tar")  # webdataset's brace notation
    ctx = _launch(_argv(checkpoint, pattern, out, "--num-workers", "2"), tmp_path)
    results = _join(ctx, tmp_path)
    assert [code for code, _ in results] == [0, 0], results
    _assert_same(_factors(out), one_process)
    assert list(tmp_path.glob("posterior*")) == [out]  # rank 0 alone wrote


def test_a_rank_killed_mid_fit_resumes_from_its_checkpoint(
    checkpoint, shards, one_process, tmp_path
):
    out, ckpt = tmp_path / "posterior.safetensors", tmp_path / "fit.ckpt"
    argv = _argv(checkpoint, shards, out, "--checkpoint", str(ckpt), "--checkpoint-every", "1")
    ctx = _launch(argv, tmp_path, delay=0.4)
    rank1 = tmp_path / f"fit.ckpt.rank1of{WORLD}"
    deadline = time.monotonic() + 120
    while not rank1.exists():
        if time.monotonic() > deadline or not all(p.is_alive() for p in ctx.processes):
            pytest.fail("rank 1 wrote no checkpoint")
        time.sleep(0.02)
    for process in reversed(ctx.processes):  # rank 1 dies; torchrun then ends rank 0
        os.kill(process.pid, signal.SIGKILL)
    for process in ctx.processes:
        process.join(timeout=30)
    assert not out.exists(), "the fit finished before the kill"
    with safe_open(str(rank1), framework="pt") as f:
        counted = int(f.metadata()["batches"])
    assert 1 <= counted < N_SHARDS * PER_SHARD // BATCH // WORLD
    results = _join(_launch(argv, tmp_path), tmp_path)  # the restart, at full speed
    assert [code for code, _ in results] == [0, 0], results
    _assert_same(_factors(out), one_process)
    assert not list(tmp_path.glob("fit.ckpt*")), "finished ranks must remove their checkpoints"


def test_a_bad_shard_on_one_rank_stops_every_rank_naming_it(checkpoint, shards, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for s in range(N_SHARDS):  # rank 1 reads shards 1 and 3; 3 holds an unreadable image
        _write_shard(data / f"{s:06d}.tar", s * PER_SHARD, corrupt=14 if s == 3 else None)
    out = tmp_path / "posterior.safetensors"
    results = _join(_launch(_argv(checkpoint, data, out), tmp_path), tmp_path)
    for rank, (code, err) in enumerate(results):
        assert code == 2, (rank, err)
        assert "000003.tar" in err and "00014" in err and len(err.strip().splitlines()) == 1, err
    assert "another rank" in results[0][1]
    assert not out.exists()


@pytest.mark.slow
def test_torchrun_launches_the_command(checkpoint, shards, one_process, tmp_path):
    """The real launcher: ``torchrun --nproc_per_node=2 -m laplace_vlm.cli fit ...``."""
    import subprocess
    from pathlib import Path

    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun is not installed next to this python")
    out = tmp_path / "posterior.safetensors"
    config_dir = checkpoint.parent  # a fresh interpreter must register the tiny config again
    code = (f"import open_clip, runpy, sys; open_clip.add_model_config({str(config_dir)!r}); "
            "sys.argv = ['laplace-vlm', *sys.argv[1:]]; runpy.run_module('laplace_vlm.cli', "
            "run_name='__main__')")  # fmt: skip
    script = tmp_path / "launch.py"
    script.write_text(code)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    argv = [str(torchrun), "--nproc_per_node=2", "--master_port", str(_free_port()), str(script),
            *_argv(checkpoint, shards, out)]  # fmt: skip
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "on 2 ranks" in proc.stdout
    _assert_same(_factors(out), one_process)
