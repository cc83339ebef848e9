"""The command line, offline: a tiny open_clip checkpoint stands in for the real weights."""

from __future__ import annotations

import csv
import io
import json
import tarfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_TEXT, TINY_VISION
from PIL import Image

from laplace_vlm.cli.main import main

TEMPLATES = ["a photo of a {}.", "a drawing of a {}."]
CLASSNAMES = ["cat", "dog", "car"]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A registered tiny open_clip config ``tiny-cli-clip`` and a checkpoint file for it."""
    import open_clip

    root = tmp_path_factory.mktemp("tiny_open_clip")
    config = {"embed_dim": 32, "vision_cfg": TINY_VISION, "text_cfg": TINY_TEXT}
    (root / "tiny-cli-clip.json").write_text(json.dumps(config))
    open_clip.add_model_config(root)
    torch.manual_seed(0)
    model = open_clip.create_model("tiny-cli-clip")
    path = root / "tiny.pt"
    torch.save(model.state_dict(), path)
    return path


def _image(seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def caption_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pairs")
    rows = []
    for i in range(12):
        _image(i).save(folder / f"img{i}.png")
        rows.append((f"img{i}.png", f"a photo of a {CLASSNAMES[i % 3]}."))
    with open(folder / "captions.csv", "w", newline="") as f:
        csv.writer(f).writerows([("filename", "caption"), *rows])
    return folder


def _model_args(checkpoint) -> list[str]:
    return [
        "--model",
        "tiny-cli-clip",
        "--pretrained",
        str(checkpoint),
        "--device",
        "cpu",
        "--no-progress",
    ]


def test_missing_checkpoint_is_one_line_and_exit_2(tmp_path, caption_folder, capsys):
    # HF_HUB_OFFLINE=1 (conftest): the laion weights are not cached here
    code = main(["fit", "--data", str(caption_folder), "--output", str(tmp_path / "p.safetensors")])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert "laion2b_s34b_b79k" in err and "Download it once" in err and "Traceback" not in err
    assert not (tmp_path / "p.safetensors").exists()


def test_unknown_tag_is_one_line_and_exit_2(tmp_path, caption_folder, capsys):
    out = tmp_path / "p.safetensors"
    code = main(
        ["fit", "--pretrained", "no_such_tag", "--data", str(caption_folder), "--output", str(out)]
    )
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "no_such_tag" in err


def test_fit_refuses_to_overwrite(tmp_path, caption_folder, capsys):
    out = tmp_path / "posterior.safetensors"
    out.write_bytes(b"keep me")
    code = main(["fit", "--data", str(caption_folder), "--output", str(out)])
    assert code == 2
    assert "--overwrite" in capsys.readouterr().err
    assert out.read_bytes() == b"keep me"


def test_fit_then_zeroshot_matches_direct_computation(
    tmp_path, tiny_checkpoint, caption_folder, capsys
):
    from laplace_vlm import DualEncoderLaplace

    posterior = tmp_path / "posterior.safetensors"
    args = [
        "fit",
        *_model_args(tiny_checkpoint),
        "--data",
        str(caption_folder),
        "--batch-size",
        "5",
        "--output",
        str(posterior),
    ]
    assert main(args) == 0
    assert DualEncoderLaplace.load(posterior).n_data == 12
    assert main(args) == 2  # now it exists
    assert main([*args, "--overwrite"]) == 0

    images = tmp_path / "images"
    images.mkdir()
    for i in range(4):
        _image(100 + i).save(images / f"q{i}.png")
    table = tmp_path / "pred.csv"
    capsys.readouterr()
    zeroshot = [
        "zeroshot",
        *_model_args(tiny_checkpoint),
        *("--posterior", str(posterior), "--images", str(images)),
        *("--classnames", ",".join(CLASSNAMES)),
    ]
    assert (
        main([*zeroshot, "--templates", *TEMPLATES, "--pred-type", "map", "--output", str(table)])
        == 0
    )
    rows = list(csv.DictReader(open(table)))
    assert [r["filename"] for r in rows] == [f"q{i}.png" for i in range(4)]

    # independent: open_clip's own encoders, template ensemble = mean un-normalised text embedding
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(
        "tiny-cli-clip", pretrained=str(tiny_checkpoint)
    )
    tokenizer = open_clip.get_tokenizer("tiny-cli-clip")
    with torch.no_grad():
        x = torch.stack(
            [preprocess(Image.open(images / f"q{i}.png").convert("RGB")) for i in range(4)]
        )
        u = model.encode_image(x, normalize=True)
        prompts = [t.format(c) for c in CLASSNAMES for t in TEMPLATES]
        t = model.encode_text(tokenizer(prompts)).reshape(3, len(TEMPLATES), -1).mean(1)
        probs = torch.softmax(model.logit_scale.exp() * u @ F.normalize(t, dim=-1).T, -1)
    for row, p in zip(rows, probs):
        assert row["prediction"] == CLASSNAMES[int(p.argmax())]
        assert float(row["probability"]) == pytest.approx(p.max().item(), abs=1e-5)
        entropy = -(p * p.log()).sum().item()
        assert float(row["entropy"]) == pytest.approx(entropy, abs=1e-5)
        assert float(row["mutual_information"]) == 0.0  # no posterior spread in the MAP model

    # the Bayesian prediction: same columns, a positive mutual information
    assert main(zeroshot) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(rows) == 4 and all(float(r["mutual_information"]) > 0 for r in rows)


def test_fit_reads_webdataset_shards(tmp_path, tiny_checkpoint):
    from laplace_vlm import DualEncoderLaplace

    shard = tmp_path / "shard-000.tar"
    with tarfile.open(shard, "w") as tar:
        for i in range(7):
            files = {f"{i:05d}.jpg": _jpeg(i), f"{i:05d}.txt": f"caption {i}".encode()}
            if i == 3:
                del files[f"{i:05d}.txt"]  # incomplete sample: skipped
            for name, payload in files.items():
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    out = tmp_path / "p.safetensors"
    assert (
        main(
            [
                "fit",
                *_model_args(tiny_checkpoint),
                "--data",
                str(shard),
                "--batch-size",
                "4",
                "--max-pairs",
                "5",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    assert DualEncoderLaplace.load(out).n_data == 5
    assert (
        main(
            [
                "fit",
                *_model_args(tiny_checkpoint),
                "--data",
                str(tmp_path),
                "--output",
                str(out),
                "--overwrite",
            ]
        )
        == 0
    )
    assert DualEncoderLaplace.load(out).n_data == 6


def _jpeg(seed: int) -> bytes:
    buffer = io.BytesIO()
    _image(seed).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    "argv, match",
    [
        (["fit", "--data", "/no/such/folder", "--output", "x.safetensors"], "--data"),
        (
            [
                "zeroshot",
                "--posterior",
                "/no/such.safetensors",
                "--images",
                ".",
                "--classnames",
                "a",
            ],
            "--images",
        ),
        (
            [
                "zeroshot",
                "--posterior",
                "p",
                "--images",
                "/",
                "--classnames",
                "a",
                "--templates",
                "x",
            ],
            "--templates",
        ),
    ],
)
def test_bad_paths_fail_before_loading_a_model(argv, match, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert match in err and len(err.strip().splitlines()) == 1


def test_active_subcommand_is_wired(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["active", "--help"])
    assert exit_info.value.code == 0
    assert "usage: laplace-vlm active" in capsys.readouterr().out


def test_data_without_pairs_is_a_one_line_error(tmp_path, tiny_checkpoint, capsys):
    (tmp_path / "captions.csv").write_text("filename,caption\n")
    code = main(
        [
            "fit",
            *_model_args(tiny_checkpoint),
            "--data",
            str(tmp_path),
            "--output",
            str(tmp_path / "p.safetensors"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "--data" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("flag, value", [("--batch-size", "0"), ("--pseudo-count", "-1"),
                                         ("--checkpoint-every", "0"),
                                         ("--max-pairs", "many")])  # fmt: skip
def test_numeric_options_are_validated_by_argparse(tmp_path, capsys, flag, value):
    args = ["fit", "--data", str(tmp_path), "--output", str(tmp_path / "p.safetensors")]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, flag, value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and ("must be positive" in err or "expected an integer" in err), err


def test_active_sweep_needs_a_json_path(capsys):
    assert main(["active", "--sweep"]) == 2
    err = capsys.readouterr().err
    assert "--sweep needs --json" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv", [["active", "--rounds", "0"], ["active", "--beta", "-0.5"],
                                  ["benchmark", "--alpha", "none"]])  # fmt: skip
def test_every_command_line_refuses_non_positive_numbers_alike(capsys, argv):
    """The generated active-learning options and the hand-declared ones share one parser."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and argv[1] in err
    assert ("must be positive, got" in err) or ("expected a number, got 'none'" in err), err
