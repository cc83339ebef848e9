"""``laplace-vlm``: the offline demo, and fitting / zero-shot prediction with real open_clip models.

Subcommands:

- ``demo``: the digits experiment of :mod:`laplace_vlm.demo.run` (offline, a few minutes).
- ``fit``: a posterior for an open_clip model from image-caption pairs, saved as safetensors.
- ``zeroshot``: predictions with uncertainty for a folder of images, as CSV.
- ``active``: active learning on the digits demo (:mod:`laplace_vlm.demo.active`, imported only when used).

Expected failures (a missing checkpoint offline, a file that would be overwritten, bad paths)
end in one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import logging
import sys
import tarfile
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from itertools import islice
from pathlib import Path

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
CAPTION_SUFFIXES = (".txt", ".caption")
DEFAULT_MODEL, DEFAULT_PRETRAINED = "ViT-B-32", "laion2b_s34b_b79k"
DEFAULT_TEMPLATES = ("a photo of a {}.",)


class CliError(Exception):
    """An expected failure: its message is printed as one line and the exit code is 2."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CliError as err:
        print(f"laplace-vlm {args.command}: error: {err}", file=sys.stderr)
        return 2


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The argument parser; ``argv`` decides whether the active-learning module is imported."""
    parser = argparse.ArgumentParser(
        prog="laplace-vlm", description="Post-hoc Laplace uncertainty for CLIP/SigLIP."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_demo(sub)
    _add_fit(sub)
    _add_zeroshot(sub)
    _add_active(sub, wanted=bool(argv) and argv[0] == "active")
    return parser


# ------------------------------------------------------------------------------------ demo
def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="offline zero-shot calibration demo on handwritten digits")
    p.add_argument("--json", type=Path, help="write the metrics as JSON here")
    p.add_argument("--out", type=Path, help="folder for the PNG plots (none if omitted)")
    p.add_argument("--cache-dir", type=Path, help="cache of the trained digits CLIP")
    p.add_argument("--seed", type=int, default=0, help="data split / caption / shift seed")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=run_demo_command)


def run_demo_command(args: argparse.Namespace) -> int:
    from laplace_vlm.demo.run import format_table, run_demo

    start = time.perf_counter()
    result = run_demo(args.seed, args.cache_dir, args.out, args.json, not args.no_progress)
    print(format_table(result.results))
    chosen = ", ".join(f"{m} n={n:g}" for m, n in result.pseudo_counts.items())
    print(f"\npseudo-counts chosen on validation NLPD: {chosen}")
    print(f"temperature scaling: T = {result.temperature:.3f}")
    if args.out is not None:
        print(f"plots: {args.out}")
    if args.json is not None:
        print(f"metrics: {args.json}")
    print(f"done in {time.perf_counter() - start:.0f} s")
    return 0


# ------------------------------------------------------------------------------------ fit
def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help="open_clip architecture name")
    p.add_argument(
        "--pretrained", default=DEFAULT_PRETRAINED, help="open_clip tag or checkpoint path"
    )
    p.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _add_fit(sub) -> None:
    p = sub.add_parser("fit", help="fit the posterior of an open_clip model on image-caption pairs")
    _add_model_args(p)
    p.add_argument(
        "--data",
        nargs="+",
        required=True,
        help="a folder of images with a captions CSV, or webdataset .tar shards (or a folder of them)",
    )
    p.add_argument(
        "--captions",
        type=Path,
        help="CSV with columns filename,caption (default: captions.csv in the --data folder)",
    )
    p.add_argument(
        "--contrastive",
        choices=("clip", "siglip"),
        help="likelihood (default: siglip for models with a logit bias, else clip)",
    )
    p.add_argument("--batch-size", type=int, default=256, help="pairs per class batch")
    p.add_argument("--max-pairs", type=int, default=None, help="use at most this many pairs")
    p.add_argument(
        "--pseudo-count",
        type=float,
        default=1.0,
        help="pseudo-data count n (temperature 1/n) the prior is optimised at",
    )
    p.add_argument("--output", type=Path, required=True, help="posterior file (.safetensors)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.set_defaults(func=run_fit_command)


def run_fit_command(args: argparse.Namespace) -> int:
    from laplace_vlm.dual_encoder_laplace import DualEncoderLaplace

    _check_output(args.output, args.overwrite)
    _check_positive("--batch-size", args.batch_size)
    _check_positive("--max-pairs", args.max_pairs)
    _check_positive("--pseudo-count", args.pseudo_count)
    pairs = image_caption_pairs(args.data, args.captions)
    model, preprocess, tokenizer = load_open_clip(args.model, args.pretrained, args.device)
    has_bias = getattr(model, "logit_bias", None) is not None
    contrastive = args.contrastive or ("siglip" if has_bias else "clip")
    la = DualEncoderLaplace(model, contrastive=contrastive)
    batches = pair_batches(islice(pairs, args.max_pairs), preprocess, tokenizer, args.batch_size)
    try:
        la.fit(batches, progress_bar=not args.no_progress)
    except ValueError as err:  # e.g. a CSV or shards without a single complete pair
        raise CliError(f"--data: {err}") from None
    la.temperature = 1.0 / args.pseudo_count
    la.optimize_prior_precision(method="marglik", prior_structure="layerwise")
    la.save(args.output, overwrite=args.overwrite)
    prior = ", ".join(f"{p:.4g}" for p in la.prior_precision.flatten().tolist())
    print(f"fitted on {la.n_data} pairs; prior precision [{prior}]; saved {args.output}")
    return 0


def image_caption_pairs(data: Sequence[str], captions: Path | None) -> Iterator[tuple]:
    """``(PIL image, caption)`` pairs from a folder + CSV or from webdataset tar shards.

    Paths are checked before anything is read, so a typo fails before the model loads.
    """
    paths = [Path(d) for d in data]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise CliError(f"--data: no such file or folder: {', '.join(missing)}")
    if len(paths) == 1 and paths[0].is_dir() and not list(paths[0].glob("*.tar")):
        csv_path = captions or paths[0] / "captions.csv"
        if not csv_path.is_file():
            raise CliError(f"--captions: no captions CSV at {csv_path} (columns filename,caption)")
        return folder_pairs(paths[0], _read_captions(csv_path))
    shards = sorted(s for p in paths for s in (p.glob("*.tar") if p.is_dir() else [p]))
    if not shards:
        raise CliError(f"--data: no .tar shards in {', '.join(map(str, paths))}")
    not_tar = [str(s) for s in shards if not tarfile.is_tarfile(s)]
    if not_tar:
        raise CliError(f"--data: not a tar file: {', '.join(not_tar)}")
    return tar_pairs(shards)


def _read_captions(path: Path) -> list[tuple[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not {"filename", "caption"} <= set(reader.fieldnames or ()):
            raise CliError(f"--captions: {path} needs the columns filename,caption")
        return [(row["filename"], row["caption"]) for row in reader]


def folder_pairs(folder: Path, rows: Iterable[tuple[str, str]]) -> Iterator[tuple]:
    from PIL import Image

    for filename, caption in rows:
        path = folder / filename
        if not path.is_file():
            raise CliError(f"--captions names {filename}, which is not in {folder}")
        with Image.open(path) as image:
            yield image.convert("RGB"), caption


def tar_pairs(shards: Iterable[Path]) -> Iterator[tuple]:
    """Pairs of webdataset shards, read with ``tarfile`` + PIL (no extra dependency).

    A sample is the files sharing a key (the path up to the first dot of the file name, as
    webdataset groups them); it needs one image and one ``.txt`` / ``.caption`` file.
    """
    for shard in shards:
        with tarfile.open(shard) as tar:
            key, sample = None, {}
            for member in tar:
                if not member.isfile():
                    continue
                name = Path(member.name)
                member_key = str(name.parent / name.name.split(".", 1)[0])
                if member_key != key:
                    yield from _complete(sample)
                    key, sample = member_key, {}
                sample["." + name.name.split(".", 1)[-1].lower()] = tar.extractfile(member).read()
            yield from _complete(sample)


def _complete(sample: dict[str, bytes]) -> Iterator[tuple]:
    import io

    from PIL import Image

    image = next((sample[s] for s in IMAGE_SUFFIXES if s in sample), None)
    caption = next((sample[s] for s in CAPTION_SUFFIXES if s in sample), None)
    if image is not None and caption is not None:
        with Image.open(io.BytesIO(image)) as img:
            yield img.convert("RGB"), caption.decode("utf-8").strip()


def pair_batches(pairs: Iterable[tuple], preprocess, tokenizer, batch_size: int) -> Iterator[tuple]:
    """``(images (B, 3, H, W), tokens (B, L))`` class batches of ``batch_size`` pairs."""
    import torch

    pairs = iter(pairs)
    while chunk := list(islice(pairs, batch_size)):
        images = torch.stack([preprocess(image) for image, _ in chunk])
        yield images, tokenizer([caption for _, caption in chunk])


# ------------------------------------------------------------------------------- zeroshot
def _add_zeroshot(sub) -> None:
    p = sub.add_parser("zeroshot", help="zero-shot predictions with uncertainty for image files")
    _add_model_args(p)
    p.add_argument("--posterior", type=Path, required=True, help="file written by `fit`")
    p.add_argument("--images", type=Path, required=True, help="folder of images")
    names = p.add_mutually_exclusive_group(required=True)
    names.add_argument("--classnames", help="comma-separated class names")
    names.add_argument("--classnames-file", type=Path, help="one class name per line")
    p.add_argument(
        "--templates",
        nargs="+",
        default=list(DEFAULT_TEMPLATES),
        help="prompt templates with '{}' for the class name (ensembled)",
    )
    p.add_argument(
        "--pred-type", choices=("probcosine", "probcosine_diag", "glm", "map"), default="probcosine"
    )
    p.add_argument("--link-approx", choices=("probit", "mc"), default="probit")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--output", type=Path, help="CSV file (default: standard output)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.set_defaults(func=run_zeroshot_command)


def run_zeroshot_command(args: argparse.Namespace) -> int:
    from laplace_vlm.dual_encoder_laplace import DualEncoderLaplace
    from laplace_vlm.adapters.features import extract_features
    from laplace_vlm.tasks.zeroshot import ZeroShotClassifier, format_prompts

    if args.output is not None:
        _check_output(args.output, args.overwrite)
    _check_positive("--batch-size", args.batch_size)
    classnames = read_classnames(args.classnames, args.classnames_file)
    try:
        format_prompts(classnames, args.templates)
    except ValueError as err:
        raise CliError(f"--templates: {err}") from None
    files = list_images(args.images)
    if not args.posterior.is_file():
        raise CliError(
            f"--posterior: no such file {args.posterior} (make one with `laplace-vlm fit`)"
        )
    model, preprocess, tokenizer = load_open_clip(args.model, args.pretrained, args.device)
    try:
        la = DualEncoderLaplace.load(args.posterior, model=model)
    except ValueError as err:
        raise CliError(f"--posterior: {err}") from None
    clf = ZeroShotClassifier.from_prompts(la, la.adapter, tokenizer, classnames, args.templates)
    batches = ({"image": images} for images in image_batches(files, preprocess, args.batch_size))
    image = extract_features(model, batches, progress_bar=not args.no_progress).image
    pred = clf.predict(image.activations, image.residual, args.pred_type, args.link_approx)
    _write_predictions(args.output, files, classnames, pred)
    return 0


def read_classnames(inline: str | None, path: Path | None) -> list[str]:
    if path is not None:
        if not path.is_file():
            raise CliError(f"--classnames-file: no such file {path}")
        names = path.read_text(encoding="utf-8").splitlines()
    else:
        names = inline.split(",")
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise CliError("no class names given")
    return names


def list_images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise CliError(f"--images: not a folder: {folder}")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise CliError(f"--images: no {'/'.join(IMAGE_SUFFIXES)} files in {folder}")
    return files


def image_batches(files: Sequence[Path], preprocess, batch_size: int) -> Iterator:
    import torch
    from PIL import Image

    for start in range(0, len(files), batch_size):
        images = []
        for path in files[start : start + batch_size]:
            with Image.open(path) as image:
                images.append(preprocess(image.convert("RGB")))
        yield torch.stack(images)


def _write_predictions(output: Path | None, files, classnames, pred) -> None:
    columns = ["filename", "prediction", "probability", "entropy", "mutual_information"]
    f = sys.stdout if output is None else open(output, "w", newline="", encoding="utf-8")
    try:
        writer = csv.writer(f)
        writer.writerow(columns)
        probability = pred.probs.max(-1).values
        for i, path in enumerate(files):
            writer.writerow(
                [
                    path.name,
                    classnames[int(pred.predictions[i])],
                    f"{probability[i]:.6f}",
                    f"{pred.entropy[i]:.6f}",
                    f"{pred.mutual_information[i]:.6f}",
                ]
            )
    finally:
        if output is not None:
            f.close()


# --------------------------------------------------------------------------------- active
def _add_active(sub, wanted: bool) -> None:
    p = sub.add_parser("active", help="active learning with the posterior (see `active --help`)")
    if wanted:  # importing the experiment costs time: only when the subcommand runs
        module = importlib.import_module("laplace_vlm.demo.active")
        module.configure_parser(p)
        p.set_defaults(func=module.main)


# ---------------------------------------------------------------------------------- shared
def load_open_clip(name: str, pretrained: str, device: str | None):
    """``(model, preprocess, tokenizer)``; a checkpoint that cannot be had is a :class:`CliError`."""
    import open_clip
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        with _quiet_root_logger():  # open_clip logs the same failure, with all tags, first
            model, _, preprocess = open_clip.create_model_and_transforms(
                name, pretrained=pretrained, device=device
            )
            tokenizer = open_clip.get_tokenizer(name)
    except ImportError as err:
        raise CliError(f"{name} needs the package {err.name!r}: pip install {err.name}") from None
    except (RuntimeError, OSError, ValueError) as err:
        raise CliError(_checkpoint_message(name, pretrained, err)) from None
    return model.eval(), preprocess, tokenizer


def _checkpoint_message(name: str, pretrained: str, err: Exception) -> str:
    reason = " ".join(str(err).split())
    reason = reason.split(". Last error")[0][:160]
    fetch = (
        f'python -c "import open_clip; open_clip.create_model_and_transforms({name!r}, '
        f'pretrained={pretrained!r})"'
    )
    return (
        f"cannot load open_clip model {name!r} with pretrained={pretrained!r} ({reason}). "
        f"Download it once with network access: {fetch}, or pass --pretrained /path/to/checkpoint."
    )


@contextmanager
def _quiet_root_logger() -> Iterator[None]:
    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        yield
    finally:
        logging.disable(previous)


def _check_output(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise CliError(f"--output: {path} exists; pass --overwrite to replace it")
    if not path.parent.is_dir():
        raise CliError(f"--output: folder {path.parent} does not exist")


def _check_positive(flag: str, value: float | None) -> None:
    if value is not None and not value > 0:
        raise CliError(f"{flag} must be positive, got {value}")


if __name__ == "__main__":
    raise SystemExit(main())
