"""The digits demo: data and shift invariants, the model cache, and a mini end-to-end run."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from laplace_vlm.demo import data, prompts, train
from laplace_vlm.demo.data import SEVERITIES, SHIFTS, load_digits_splits, to_pixels
from laplace_vlm.evaluation.metrics import classification_metrics

TINY_TRAINING = {"epochs": 1}


@pytest.fixture(scope="module")
def splits():
    return load_digits_splits(seed=0)


def test_splits_are_seeded_stratified_and_normalised(splits):
    sizes = {name: len(x) for name, (x, _) in splits.items()}
    assert sizes == {"train": 1078, "val": 359, "test": 360}
    total = sum(torch.bincount(y, minlength=10) for _, y in splits.values())
    for (x, y), fraction in zip(splits.values(), (0.6, 0.2, 0.2)):
        assert x.shape[1:] == (3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.long
        assert x.min() >= -1 and x.max() <= 1 and x.min() == -1  # black background
        # stratified: every digit's share of the split is its share of the data set
        assert (torch.bincount(y, minlength=10) - fraction * total).abs().max() <= 1
    again = load_digits_splits(seed=0)
    assert torch.equal(again["test"][0], splits["test"][0])
    assert not torch.equal(load_digits_splits(seed=1)["test"][1], splits["test"][1])


def test_images_are_the_upsampled_digits(splits):
    from sklearn.datasets import load_digits

    raw = torch.as_tensor(load_digits().images[:5], dtype=torch.float32) / 16
    pixels = to_pixels(data.digits_to_images(load_digits().data[:5]))
    assert torch.equal(pixels[:, 0], pixels[:, 2])  # grey in three channels
    # averaging each 4x4 block recovers the 8x8 digit up to the bilinear blur
    down = F.avg_pool2d(pixels[:, :1], 4)[:, 0]
    assert torch.corrcoef(torch.stack([down.flatten(), raw.flatten()]))[0, 1] > 0.95


@pytest.mark.parametrize("shift", sorted(SHIFTS))
def test_shifts_keep_range_and_severity_zero_is_identity(splits, shift):
    x = splits["test"][0][:32]
    gen = torch.Generator().manual_seed(0)
    torch.testing.assert_close(SHIFTS[shift](x, 0.0, gen), x, atol=1e-5, rtol=0)
    for severity in SEVERITIES:
        out = SHIFTS[shift](x, severity, gen)
        assert out.shape == x.shape and out.min() >= -1 - 1e-6 and out.max() <= 1 + 1e-6
        assert not torch.allclose(out, x)
    with pytest.raises(ValueError, match="severity"):
        SHIFTS[shift](x, 1.5, gen)


def test_shift_strength_grows_with_severity(splits):
    x = splits["test"][0][:64]
    change = {
        shift: [
            (SHIFTS[shift](x, s, torch.Generator().manual_seed(0)) - x).abs().mean()
            for s in SEVERITIES
        ]
        for shift in ("noise", "invert")
    }
    for shift, values in change.items():
        assert all(a < b for a, b in zip(values, values[1:])), shift


def test_full_inversion_and_quarter_turn_are_exact(splits):
    x = splits["test"][0][:16]
    gen = torch.Generator().manual_seed(0)
    inverted = to_pixels(SHIFTS["invert"](x, 1.0, gen))
    torch.testing.assert_close(inverted, 1 - to_pixels(x))
    rotated = to_pixels(SHIFTS["rotation"](x, 1.0, gen))
    pixels = to_pixels(x)
    directions = set()
    for r, p in zip(rotated, pixels):
        for k in (1, -1):
            if torch.allclose(r, torch.rot90(p, k, dims=(1, 2)), atol=1e-4):
                directions.add(k)
                break
        else:
            pytest.fail("a 90-degree rotation is not a quarter turn of the pixel grid")
    assert directions == {1, -1}  # both senses occur


def test_prompts_and_captions():
    assert prompts.CLASSNAMES == (
        "zero",
        "one",
        "two",
        "three",
        "four",
        "five",
        "six",
        "seven",
        "eight",
        "nine",
    )
    assert all("{}" in t for t in prompts.TEMPLATES)
    assert set(prompts.TEMPLATES) <= set(prompts.CAPTION_TEMPLATES)
    labels = torch.tensor([3, 7, 0])
    caps = prompts.captions(labels, torch.Generator().manual_seed(0))
    assert caps == prompts.captions(labels, torch.Generator().manual_seed(0))
    assert all(prompts.CLASSNAMES[y] in c for y, c in zip(labels.tolist(), caps))


def test_class_unique_batches_have_one_example_per_class(splits):
    labels = splits["train"][1]
    batches = train.class_unique_batches(labels, torch.Generator().manual_seed(0))
    assert len(batches) == int(torch.bincount(labels).min())
    for b in batches:
        assert sorted(labels[b].tolist()) == list(range(10))
    flat = torch.cat(batches)
    assert len(flat.unique()) == len(flat)  # no example twice in an epoch


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("digits_clip_cache")


def test_model_is_trained_once_then_loaded_from_cache(cache_dir, monkeypatch):
    model, tokenizer = train.load_or_train_digits_clip(cache_dir, False, TINY_TRAINING)
    files = list(cache_dir.glob("digits-clip-*.safetensors"))
    assert (
        len(files) == 1
        and train.config_hash({**train.TRAIN_CONFIG, **TINY_TRAINING}) in files[0].name
    )

    def no_training(*args, **kwargs):
        raise AssertionError("a cached model must not be retrained")

    monkeypatch.setattr(train, "train_digits_clip", no_training)
    cached, _ = train.load_or_train_digits_clip(cache_dir, False, TINY_TRAINING)
    for (name, a), b in zip(model.state_dict().items(), cached.state_dict().values()):
        assert torch.equal(a, b), name
    assert tokenizer(["a handwritten seven."]).shape == (1, train.CONTEXT_LENGTH)


def test_mini_end_to_end_run(cache_dir, tmp_path):
    from laplace_vlm.demo.run import METHODS, format_table, run_demo

    result = run_demo(
        cache_dir=cache_dir,
        out_dir=tmp_path / "plots",
        json_path=tmp_path / "metrics.json",
        progress_bar=False,
        train_config=TINY_TRAINING,
        severities=(1.0,),
        pseudo_counts=(10.0, 1000.0),
    )
    stored = json.loads((tmp_path / "metrics.json").read_text())
    assert set(stored) == {"clean", *SHIFTS} and set(stored["clean"]) == {"0"}
    assert all(set(stored[s]) == {"1"} for s in SHIFTS)
    for by_method in (stored[s][k] for s in stored for k in stored[s]):
        assert tuple(by_method) == METHODS
        for values in by_method.values():
            assert set(values) == {"acc", "nlpd", "ece", "auroc", "brier"}
            assert 0 <= values["acc"] <= 1 and 0 <= values["ece"] <= 1 and values["nlpd"] > 0
    assert set(result.pseudo_counts.values()) <= {10.0, 1000.0}
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == [
        "reliability_clean.png",
        "shift_acc.png",
        "shift_auroc.png",
        "shift_ece.png",
        "shift_nlpd.png",
    ]
    assert "laplace_probcosine" in format_table(result.results)

    # independent check of the MAP row: open_clip's own encoders and template ensemble
    model, tokenizer = train.load_or_train_digits_clip(cache_dir, False, TINY_TRAINING)
    x, y = load_digits_splits(0)["test"]
    with torch.no_grad():
        u = model.encode_image(x, normalize=True)
        prompts_ = [t.format(c) for c in prompts.CLASSNAMES for t in prompts.TEMPLATES]
        t = model.encode_text(tokenizer(prompts_)).reshape(10, len(prompts.TEMPLATES), -1).mean(1)
        probs = torch.softmax(model.logit_scale.exp() * u @ F.normalize(t, dim=-1).T, -1)
    expected = classification_metrics(probs, y)
    for key in ("acc", "nlpd", "ece", "brier"):
        assert stored["clean"]["0"]["map"][key] == pytest.approx(expected[key], rel=1e-4, abs=1e-6)
    assert expected["acc"] > 0.3  # one epoch already beats chance (0.1) clearly
