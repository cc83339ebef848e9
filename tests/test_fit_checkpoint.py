"""Resumable, streaming fits: SIGKILL mid-way and resume, stale checkpoints, loaders without len."""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors import safe_open
from safetensors.torch import save_file
from test_dual_encoder_laplace import make_problem
from torch.utils.data import DataLoader, IterableDataset

from laplace_vlm import DualEncoderLaplace

pytestmark = pytest.mark.usefixtures("float64")

N_BATCHES, BATCH = 12, 4
TOL = dict(rtol=1e-12, atol=1e-13)


def problem(contrastive: str = "siglip", seed: int = 0):
    """Heads and 48 pairs; SigLIP with biases exercises every factor block."""
    return make_problem(bias=True, seed=seed, n=N_BATCHES * BATCH, contrastive=contrastive)


class SlowLoader:
    """A deterministic loader of class batches that sleeps before each one (a slow disk).

    ``poison_before`` replaces the first batches by NaN: a fit that really skips the batches
    a checkpoint already counted never looks at them, one that recomputes them fails.
    """

    def __init__(
        self, a_i, a_t, delay: float = 0.0, poison_before: int = 0, crash_at: int | None = None
    ) -> None:
        self.a_i, self.a_t, self.delay, self.poison_before = a_i, a_t, delay, poison_before
        self.crash_at = crash_at

    def __iter__(self):
        for b in range(N_BATCHES):
            if b == self.crash_at:
                raise RuntimeError("simulated crash")
            time.sleep(self.delay)
            rows = slice(b * BATCH, (b + 1) * BATCH)
            a_i, a_t = self.a_i[rows], self.a_t[rows]
            if b < self.poison_before:
                a_i = torch.full_like(a_i, float("nan"))
            yield a_i, a_t


def factors(la: DualEncoderLaplace) -> list[torch.Tensor]:
    return [F for block in la.H_facs.kfacs for F in block]


def assert_same_fit(got: DualEncoderLaplace, want: DualEncoderLaplace) -> None:
    assert got.n_data == want.n_data
    for g, w in zip(factors(got), factors(want), strict=True):
        torch.testing.assert_close(g, w, **TOL)
    torch.testing.assert_close(got.loss, want.loss, **TOL)


def uninterrupted(contrastive: str = "siglip") -> DualEncoderLaplace:
    kw, a_i, a_t = problem(contrastive)
    la = DualEncoderLaplace(**kw)
    la.fit(SlowLoader(a_i, a_t))
    return la


def checkpointed_batches(path: Path) -> int:
    with safe_open(str(path), framework="pt") as f:
        return int(f.metadata()["batches"])


def _fit_until_killed(ckpt: str, done: str, delay: float) -> None:
    """The child: a slow, checkpointed fit (float64, like the parent's reference)."""
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    kw, a_i, a_t = problem()
    la = DualEncoderLaplace(**kw)
    la.fit(SlowLoader(a_i, a_t, delay=delay), checkpoint=ckpt, checkpoint_every=1)
    Path(done).write_text("finished")


def test_sigkill_mid_fit_then_resume_equals_an_uninterrupted_fit(tmp_path):
    ckpt, done = tmp_path / "fit.ckpt", tmp_path / "done"
    # a forked child inherits the imported modules (a fresh interpreter spends seconds
    # importing laplace on a shared machine); 0.3 s a batch: the fit takes 3.6 s, the kill
    # lands after the first checkpoint
    start = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    proc = mp.get_context(start).Process(target=_fit_until_killed,
                                         args=(str(ckpt), str(done), 0.3))  # fmt: skip
    proc.start()
    try:
        deadline = time.monotonic() + 120
        while not ckpt.exists():
            if not proc.is_alive():
                pytest.fail(f"fit process ended early ({proc.exitcode})")
            if time.monotonic() > deadline:
                pytest.fail("no checkpoint appeared within 120 s")
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(timeout=30)
    finally:
        if proc.is_alive():
            proc.kill()
    assert proc.exitcode == -signal.SIGKILL
    assert not done.exists(), "the fit finished before the kill: nothing was interrupted"
    counted = checkpointed_batches(ckpt)
    assert 1 <= counted < N_BATCHES
    # resume twice from the file the killed process left: with the same loader, and with a
    # loader whose already-counted batches are NaN (so they must come from the checkpoint)
    poisoned_ckpt = tmp_path / "copy.ckpt"
    shutil.copy(ckpt, poisoned_ckpt)
    kw, a_i, a_t = problem()
    resumed = DualEncoderLaplace(**kw)
    resumed.fit(SlowLoader(a_i, a_t), checkpoint=str(ckpt), checkpoint_every=1)
    reference = uninterrupted()
    assert_same_fit(resumed, reference)
    from_file = DualEncoderLaplace(**kw)
    from_file.fit(SlowLoader(a_i, a_t, poison_before=counted), checkpoint=str(poisoned_ckpt))
    assert_same_fit(from_file, reference)


def crash(kw, loader, ckpt, every: int) -> None:
    """A fit interrupted by an error in the loader, leaving its last checkpoint behind."""
    with pytest.raises(RuntimeError, match="simulated crash"):
        DualEncoderLaplace(**kw).fit(loader, checkpoint=str(ckpt), checkpoint_every=every)


def test_a_completed_fit_removes_its_checkpoint_and_a_longer_checkpoint_is_refused(tmp_path):
    ckpt = tmp_path / "fit.ckpt"
    kw, a_i, a_t = problem()
    crash(kw, SlowLoader(a_i, a_t, crash_at=11), ckpt, every=5)
    la = DualEncoderLaplace(**kw)
    la.fit(SlowLoader(a_i, a_t), checkpoint=str(ckpt), checkpoint_every=5)
    assert_same_fit(la, uninterrupted())
    assert not ckpt.exists()  # a later fit on another loader must not skip batches
    crash(kw, SlowLoader(a_i, a_t, crash_at=11), ckpt, every=5)
    short = [(a_i[:BATCH], a_t[:BATCH])] * 3  # fewer batches than the checkpoint counted
    with pytest.raises(ValueError, match="counted 10 batches"):
        DualEncoderLaplace(**kw).fit(short, checkpoint=str(ckpt))


def test_a_stale_checkpoint_for_other_heads_or_likelihood_is_refused(tmp_path):
    ckpt = tmp_path / "fit.ckpt"
    kw, a_i, a_t = problem("siglip", seed=0)
    crash(kw, SlowLoader(a_i, a_t, crash_at=11), ckpt, every=5)
    assert checkpointed_batches(ckpt) == 10
    other_kw, _, _ = problem("siglip", seed=1)  # same shapes, other weights
    with pytest.raises(ValueError, match="belongs to another fit"):
        DualEncoderLaplace(**other_kw).fit(SlowLoader(a_i, a_t), checkpoint=str(ckpt))
    clip_kw = {**kw, "contrastive": "clip"}
    clip_kw.pop("logit_bias")
    with pytest.raises(ValueError, match="belongs to another fit"):
        DualEncoderLaplace(**clip_kw).fit(SlowLoader(a_i, a_t), checkpoint=str(ckpt))


@pytest.mark.parametrize(
    "content, match",
    [
        (b"\x00\x01garbage" * 10, "unreadable"),
        (None, "not a laplace-vlm fit checkpoint"),  # a valid safetensors file of someone else
    ],
)
def test_a_foreign_checkpoint_file_is_refused(tmp_path, content, match):
    ckpt = tmp_path / "fit.ckpt"
    if content is None:
        save_file({"w": torch.zeros(2)}, str(ckpt), metadata={"format": "other"})
    else:
        ckpt.write_bytes(content)
    kw, a_i, a_t = problem()
    with pytest.raises(ValueError, match=match):
        DualEncoderLaplace(**kw).fit(SlowLoader(a_i, a_t), checkpoint=str(ckpt))


@pytest.mark.parametrize(
    "tamper, match",
    [
        (lambda t: t.pop("A_text"), "incomplete"),
        (lambda t: t.update(B_image=torch.full_like(t["B_image"], float("nan"))), "NaN or inf"),
        (lambda t: t.update(A_image=torch.zeros(2, 2)), "shape"),
    ],
    ids=["missing", "nan", "shape"],
)
def test_a_tampered_checkpoint_of_the_right_fit_is_refused(tmp_path, tamper, match):
    ckpt = tmp_path / "fit.ckpt"
    kw, a_i, a_t = problem()
    crash(kw, SlowLoader(a_i, a_t, crash_at=10), ckpt, every=4)
    with safe_open(str(ckpt), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tamper(tensors)
    save_file(tensors, str(ckpt), metadata=meta)  # same format and key
    with pytest.raises(ValueError, match=match):
        DualEncoderLaplace(**kw).fit(SlowLoader(a_i, a_t), checkpoint=str(ckpt))


class PairStream(IterableDataset):
    """A stream of single pairs with no ``__len__`` (webdataset-like)."""

    def __init__(self, a_i: torch.Tensor, a_t: torch.Tensor) -> None:
        self.a_i, self.a_t = a_i, a_t

    def __iter__(self):
        yield from zip(self.a_i, self.a_t)


def test_loaders_without_length_work_and_count_the_pairs():
    reference = uninterrupted()
    kw, a_i, a_t = problem()

    def generator():
        for b in range(N_BATCHES):
            yield {
                "image": a_i[b * BATCH : (b + 1) * BATCH],
                "text": a_t[b * BATCH : (b + 1) * BATCH],
            }

    la = DualEncoderLaplace(**kw)
    la.fit(generator())
    assert_same_fit(la, reference)
    stream = DataLoader(PairStream(a_i, a_t), batch_size=BATCH)
    with pytest.raises(TypeError):
        len(stream)  # really no length
    la = DualEncoderLaplace(**kw)
    la.fit(stream)
    assert_same_fit(la, reference)
    assert la.n_data == N_BATCHES * BATCH
