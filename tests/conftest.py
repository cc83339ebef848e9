"""Shared fixtures: offline, single-threaded, tiny random open_clip models."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

torch.set_num_threads(1)

TINY_VISION = dict(image_size=32, patch_size=8, width=64, layers=2, head_width=32)
TINY_TEXT = dict(context_length=16, vocab_size=49408, width=64, heads=2, layers=2)


def tiny_clip(embed_dim: int = 32, seed: int = 0):
    """A random open_clip ``CLIP`` with ViT towers (about 5 ms a batch)."""
    import open_clip

    torch.manual_seed(seed)
    model = open_clip.model.CLIP(embed_dim=embed_dim, vision_cfg=TINY_VISION, text_cfg=TINY_TEXT)
    return model.eval()


@pytest.fixture
def float64():
    """Exactness checks run in float64 (upstream laplace style), the default dtype restored after.

    A module opts in with ``pytestmark = pytest.mark.usefixtures("float64")``.
    """
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.fixture(scope="session")
def tokenizer():
    import open_clip

    return open_clip.get_tokenizer("ViT-B-32", context_length=16)


@pytest.fixture
def clip_model():
    return tiny_clip()
