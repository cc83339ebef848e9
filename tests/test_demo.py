"""The digits demo: data, shifts, prompts, the recipe, the model cache, and a mini end-to-end run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from laplace_vlm.datasets import digits as data
from laplace_vlm.datasets.digits import load_digits_splits
from laplace_vlm.datasets.images import to_pixels
from laplace_vlm.datasets.prompts import PROMPTS
from laplace_vlm.datasets.shifts import SEVERITIES, SHIFTS
from laplace_vlm.evaluation.metrics import classification_metrics
from laplace_vlm.evaluation.tables import ROW_KEYS, value
from laplace_vlm.experiments import recipe
from laplace_vlm.standins import training as train

TINY_TRAINING = {"epochs": 1}


@pytest.fixture(scope="module")
def splits():
    return load_digits_splits(seed=0)


def test_splits_are_seeded_stratified_and_normalised(splits):
    sizes = {name: len(x) for name, (x, _) in splits.items()}
    assert sizes == {"train": 808, "curvature": 270, "val": 359, "test": 360}
    total = sum(torch.bincount(y, minlength=10) for _, y in splits.values())
    for (x, y), fraction in zip(splits.values(), (0.45, 0.15, 0.2, 0.2)):
        assert x.shape[1:] == (3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.long
        assert x.min() >= -1 and x.max() <= 1 and x.min() == -1  # black background
        # stratified: every digit's share of the split is its share of the data set
        assert (torch.bincount(y, minlength=10) - fraction * total).abs().max() <= 1
    again = load_digits_splits(seed=0)
    assert torch.equal(again["test"][0], splits["test"][0])
    assert not torch.equal(load_digits_splits(seed=1)["test"][1], splits["test"][1])
    # the parts partition the data set: the curvature pairs are never trained on
    assert sum(sizes.values()) == 1797
    train, curvature = splits["train"][0].flatten(1), splits["curvature"][0].flatten(1)
    assert not (torch.cdist(curvature, train).amin(1) == 0).any()


def test_recipe_splits_are_the_digits_splits_and_subsets_are_stratified(splits):
    full = recipe.load_splits("digits")
    for name in splits:
        assert torch.equal(full[name][0], splits[name][0])
    small = recipe.load_splits("digits", max_train=200, max_eval=50)
    assert [len(small[n][1]) for n in ("train", "curvature", "val", "test")] == [200, 200, 50, 50]
    assert torch.bincount(small["train"][1]).min() >= 19  # ~20 of each digit
    with pytest.raises(ValueError, match="dataset"):
        recipe.load_splits("mnist")
    with pytest.raises(ValueError, match="data_dir"):
        recipe.load_splits("digits", data_dir="/tmp")


def test_images_are_the_upsampled_digits():
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
    for shift in ("noise", "invert", "blur", "contrast"):
        change = [
            (SHIFTS[shift](x, s, torch.Generator().manual_seed(0)) - x).abs().mean()
            for s in SEVERITIES
        ]
        assert all(a < b for a, b in zip(change, change[1:])), shift


def test_full_inversion_quarter_turn_blur_and_contrast_are_exact(splits):
    x = splits["test"][0][:16]
    gen = torch.Generator().manual_seed(0)
    pixels = to_pixels(x)
    torch.testing.assert_close(to_pixels(SHIFTS["invert"](x, 1.0, gen)), 1 - pixels)
    rotated = to_pixels(SHIFTS["rotation"](x, 1.0, gen))
    directions = set()
    for r, p in zip(rotated, pixels):
        for k in (1, -1):
            if torch.allclose(r, torch.rot90(p, k, dims=(1, 2)), atol=1e-4):
                directions.add(k)
                break
        else:
            pytest.fail("a 90-degree rotation is not a quarter turn of the pixel grid")
    assert directions == {1, -1}  # both senses occur
    # contrast: a tenth of the deviation from each image's mean grey is left at severity 1
    mean = pixels.mean((1, 2, 3), keepdim=True)
    low = to_pixels(SHIFTS["contrast"](x, 1.0, gen))
    # (torchvision's grey weights sum to 0.9999, hence the tolerance)
    torch.testing.assert_close(low, mean + 0.1 * (pixels - mean), atol=1e-4, rtol=0)
    # blur at severity 1: a separable Gaussian of sigma 3 over +-9 pixels, reflected borders
    offsets = torch.arange(-9, 10, dtype=torch.float32)
    kernel = torch.exp(-(offsets**2) / 18)
    kernel = kernel / kernel.sum()
    padded = F.pad(pixels, (9, 9, 9, 9), mode="reflect")
    rows = F.conv2d(padded.flatten(0, 1)[:, None], kernel.view(1, 1, 1, -1))
    expected = F.conv2d(rows, kernel.view(1, 1, -1, 1)).view_as(pixels)
    blurred = to_pixels(SHIFTS["blur"](x, 1.0, gen))
    torch.testing.assert_close(blurred, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dataset", sorted(PROMPTS))
def test_prompts_fit_the_context_and_name_their_class(dataset, tokenizer):
    import open_clip

    prompts = PROMPTS[dataset]
    assert len(set(prompts.classnames)) == len(prompts.classnames) == 10
    assert set(prompts.templates) <= set(prompts.caption_templates)
    # the tokenizer truncates silently: a prompt longer than the context would lose its class
    long = open_clip.get_tokenizer("ViT-B-32", context_length=77)
    for c in prompts.classnames:
        for t in prompts.caption_templates:
            assert int((long([t.format(c)])[0] != 0).sum()) <= train.CONTEXT_LENGTH, t.format(c)
    labels = torch.tensor([3, 7, 0, 9])
    caps = prompts.captions(labels, torch.Generator().manual_seed(0))
    assert caps == prompts.captions(labels, torch.Generator().manual_seed(0))
    assert all(prompts.classnames[y] in c for y, c in zip(labels.tolist(), caps))
    with pytest.raises(ValueError, match="labels"):
        prompts.captions(torch.tensor([10]), torch.Generator())


def test_class_distinct_batches_use_every_example_once_with_distinct_classes():
    labels = torch.tensor([0] * 5 + [1] * 3 + [2] * 1 + [3] * 4)
    batches = train.class_distinct_batches(labels, torch.Generator().manual_seed(0))
    assert len(batches) == 5  # the largest class's count: nothing is dropped
    for b in batches:
        assert len(labels[b].unique()) == len(b)
    flat = torch.cat(batches)
    assert sorted(flat.tolist()) == list(range(len(labels)))
    assert [len(b) for b in batches] == [4, 3, 3, 2, 1]
    again = train.class_distinct_batches(labels, torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(batches, again))


def test_torch_threads_restores_the_count():
    before = torch.get_num_threads()
    with pytest.raises(RuntimeError), recipe.torch_threads(1):
        assert torch.get_num_threads() == 1
        raise RuntimeError
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="n"):
        with recipe.torch_threads(0):
            pass


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("digits_clip_cache")


def test_model_is_trained_once_then_loaded_from_cache(cache_dir, monkeypatch):
    model, tokenizer = recipe.load_clip("digits", cache_dir, train_config=TINY_TRAINING)
    files = list(cache_dir.glob("digits-clip-*.safetensors"))
    assert len(files) == 1

    def no_training(*args, **kwargs):
        raise AssertionError("a cached model must not be retrained")

    monkeypatch.setattr(train, "train_clip", no_training)
    cached, _ = recipe.load_clip("digits", cache_dir, train_config=TINY_TRAINING)
    for (name, a), b in zip(model.state_dict().items(), cached.state_dict().values()):
        assert torch.equal(a, b), name
    assert tokenizer(["a handwritten seven."]).shape == (1, train.CONTEXT_LENGTH)
    with pytest.raises(AssertionError, match="retrained"):  # another set-up is another file
        recipe.load_clip("digits", cache_dir, train_config={"epochs": 2})


def test_training_uses_open_clips_loss(monkeypatch, splits):
    from open_clip.loss import ClipLoss

    calls = []
    original = ClipLoss.forward

    def spy(self, image_features, text_features, logit_scale, *args, **kwargs):
        calls.append(len(image_features))
        return original(self, image_features, text_features, logit_scale, *args, **kwargs)

    monkeypatch.setattr(ClipLoss, "forward", spy)
    x, y = splits["train"]
    config = {**train.TRAIN_CONFIGS["digits"], "epochs": 1}
    train.train_clip(x[:40], y[:40], PROMPTS["digits"], config, progress_bar=False)
    assert sum(calls) == 40 and max(calls) <= 10  # every pair once, batches of distinct digits


def mini_demo(cache_dir, out_dir, json_path):
    from laplace_vlm.experiments.demo import run_demo

    return run_demo(
        cache_dir=cache_dir,
        out_dir=out_dir,
        json_path=json_path,
        progress_bar=False,
        train_config=TINY_TRAINING,
        severities=(1.0,),
        pseudo_counts=(10.0, 1000.0),
    )


@pytest.mark.slow
def test_mini_end_to_end_run(cache_dir, tmp_path):
    from laplace_vlm.experiments.demo import DEMO_TASKS, format_report
    from laplace_vlm.experiments.figures import plot_names

    out = tmp_path / "plots"
    out.mkdir()
    (out / "notes.txt").write_text("mine")  # a user's file in the folder
    result = mini_demo(cache_dir, out, tmp_path / "metrics.json")
    stored = json.loads((tmp_path / "metrics.json").read_text())
    assert set(stored) == {"settings", "rows"} and stored["rows"] == result.rows
    assert {r["task"] for r in stored["rows"]} == set(DEMO_TASKS)
    assert all(tuple(r) == ROW_KEYS for r in stored["rows"])
    assert {r["condition"] for r in stored["rows"]} == {"clean", *SHIFTS}
    methods = ["map", "temperature", "bayesvlm", "laplace_probcosine", "laplace_glm",
               "laplace_nn", "laplace_probcosine_exact"]  # fmt: skip
    assert list(dict.fromkeys(r["method"] for r in stored["rows"])) == methods
    assert set(result.settings["pseudo_counts"].values()) <= {10.0, 1000.0}
    assert result.settings["pseudo_counts"]["bayesvlm"] == 10.0
    # only the demo's own files are written; the user's file is untouched
    names = plot_names(result)
    assert sorted(p.name for p in out.iterdir()) == sorted(names + ["notes.txt"])
    assert (out / "notes.txt").read_text() == "mine"
    report = format_report(result)
    assert "laplace_probcosine" in report and "tr B per pair, image head" in report

    # independent check of the MAP rows: open_clip's own encoders and template ensemble
    model, tokenizer = recipe.load_clip("digits", cache_dir, train_config=TINY_TRAINING)
    x, y = load_digits_splits(0)["test"]
    prompts = PROMPTS["digits"]
    with torch.no_grad():
        u = model.encode_image(x, normalize=True)
        text = [t.format(c) for c in prompts.classnames for t in prompts.templates]
        t = model.encode_text(tokenizer(text)).reshape(10, len(prompts.templates), -1).mean(1)
        probs = torch.softmax(model.logit_scale.exp() * u @ F.normalize(t, dim=-1).T, -1)
    expected = classification_metrics(probs, y)
    rows = stored["rows"]
    for key in ("acc", "nlpd", "ece15", "ece20", "brier"):
        got = value(rows, task="calibration", condition="clean", method="map", metric=key)
        assert got == pytest.approx(expected[key], rel=1e-4, abs=1e-6)
    # one epoch on 808 images beats chance (0.1, sd 0.016 on 360 images) by more than 3 sd
    assert expected["acc"] > 0.15


def test_demo_cli_writes_to_the_default_folder_unless_told_otherwise(monkeypatch, tmp_path):
    import laplace_vlm.experiments.demo as run_module
    from laplace_vlm.cli.main import main

    seen = []

    def fake_run_demo(seed, cache_dir, out_dir, json_path, progress_bar, retrain=False):
        seen.append(out_dir)
        return run_module.BenchmarkResult({"pseudo_counts": {}, "temperature": 1.0}, [], None)

    monkeypatch.setattr(run_module, "run_demo", fake_run_demo)
    monkeypatch.setattr(run_module, "format_report", lambda result: "")
    monkeypatch.chdir(tmp_path)
    assert main(["demo"]) == 0 and seen[-1] == Path("laplace-vlm-demo")
    assert main(["demo", "--out", "elsewhere"]) == 0 and seen[-1] == Path("elsewhere")
    assert main(["demo", "--no-plots"]) == 0 and seen[-1] is None
