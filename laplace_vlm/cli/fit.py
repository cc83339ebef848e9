"""``laplace-vlm fit``: a posterior for an open_clip model from image-caption pairs."""

from __future__ import annotations

import argparse
import csv
import tarfile  # only to tell a tar file from a typo before the model loads
from collections.abc import Iterable, Iterator, Sequence
from itertools import islice
from pathlib import Path

from laplace_vlm.cli.errors import CliError, check_output
from laplace_vlm.cli.models import DEFAULT_MODEL, DEFAULT_PRETRAINED, load_open_clip
from laplace_vlm.docstrings import fill_doc
from laplace_vlm.validation import positive_number

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
CAPTION_SUFFIXES = (".txt", ".caption")


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Add ``--model``, ``--pretrained``, ``--device`` and ``--no-progress`` to ``p``.

    Parameters
    ----------
    p : argparse.ArgumentParser
        a subcommand's parser (``fit`` and ``zeroshot``).
    """
    p.add_argument("--model", default=DEFAULT_MODEL, help="open_clip architecture name")
    p.add_argument(
        "--pretrained", default=DEFAULT_PRETRAINED, help="open_clip tag or checkpoint path"
    )
    p.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


@fill_doc
def add_parser(sub) -> None:
    """Add the ``fit`` subcommand to ``sub``.

    %(cli_add_parser)s
    """
    p = sub.add_parser("fit", help="fit the posterior of an open_clip model on image-caption pairs")
    add_model_args(p)
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
    p.add_argument(
        "--batch-size", type=positive_number(int), default=256, help="pairs per class batch"
    )
    p.add_argument(
        "--max-pairs", type=positive_number(int), default=None, help="use at most this many pairs"
    )
    p.add_argument(
        "--pseudo-count",
        type=positive_number(float),
        default=1.0,
        help="pseudo-data count n (temperature 1/n) the prior is optimised at",
    )
    p.add_argument("--output", type=Path, required=True, help="posterior file (.safetensors)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.set_defaults(func=run)


@fill_doc
def run(args: argparse.Namespace) -> int:
    """Fit a posterior on the pairs of ``--data`` and save it to ``--output``.

    The likelihood is ``--contrastive`` (default: ``siglip`` if the model has a logit bias,
    else ``clip``); the layerwise prior precision is optimised by the marginal likelihood at
    temperature ``1 / --pseudo-count``.

    %(cli_run)s
    """
    from laplace_vlm.dual_encoder_laplace import DualEncoderLaplace

    check_output(args.output, args.overwrite)
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

    Parameters
    ----------
    data : Sequence of str
        one folder of images (without ``.tar`` files), or tar shards and folders of them.
    captions : Path or None
        CSV with columns ``filename,caption`` for a folder; None: ``captions.csv`` in it.

    Returns
    -------
    Iterator of tuple
        the pairs, read lazily.
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
    """``(PIL image, caption)`` pairs of the files in ``folder`` that ``rows`` name, RGB.

    Parameters
    ----------
    folder : Path
        the images' folder.
    rows : Iterable of (str, str)
        ``(filename, caption)`` rows of the captions CSV; a missing file is a :class:`CliError`.

    Yields
    ------
    tuple
        ``(image, caption)``: an RGB PIL image and its caption, in the order of ``rows``.
    """
    from PIL import Image

    for filename, caption in rows:
        path = folder / filename
        if not path.is_file():
            raise CliError(f"--captions names {filename}, which is not in {folder}")
        with Image.open(path) as image:
            yield image.convert("RGB"), caption


def tar_pairs(shards: Iterable[Path]) -> Iterator[tuple]:
    """``(PIL image, caption)`` pairs of webdataset tar shards (LAION's format), in order.

    A sample is the files sharing a key; it needs one image and one ``.txt`` / ``.caption``
    file, and samples without both are skipped (webdataset's grouping and decoding).

    Parameters
    ----------
    shards : Iterable of Path
        the tar files.

    Yields
    ------
    tuple
        ``(image, caption)``: an RGB PIL image and its stripped caption.
    """
    try:
        import webdataset as wds
    except ImportError:
        raise CliError(
            "--data: reading tar shards needs webdataset: pip install 'laplace-vlm[webdataset]'"
        ) from None
    images = ";".join(s.lstrip(".") for s in IMAGE_SUFFIXES)
    captions = ";".join(s.lstrip(".") for s in CAPTION_SUFFIXES)
    dataset = (
        wds.WebDataset([str(s) for s in shards], shardshuffle=False, empty_check=False)
        .select(lambda sample: _has(sample, IMAGE_SUFFIXES) and _has(sample, CAPTION_SUFFIXES))
        .decode("pil")
        .to_tuple(images, captions)
    )
    for image, caption in dataset:
        yield image.convert("RGB"), caption.strip()


def _has(sample: dict, suffixes: tuple[str, ...]) -> bool:
    return any(s.lstrip(".") in sample for s in suffixes)


def pair_batches(pairs: Iterable[tuple], preprocess, tokenizer, batch_size: int) -> Iterator[tuple]:
    """``(images (B, 3, H, W), tokens (B, L))`` class batches of ``batch_size`` pairs.

    Parameters
    ----------
    pairs : Iterable of tuple
        ``(PIL image, caption)`` pairs.
    preprocess : callable
        open_clip's image transform, PIL image to `(3, H, W)` tensor.
    tokenizer : callable
        open_clip's tokenizer, list of captions to `(B, L)` tokens.
    batch_size : int
        pairs per batch; the last batch may be smaller.

    Yields
    ------
    tuple
        ``(images, tokens)``: `(B, 3, H, W)` preprocessed images and `(B, L)` caption tokens.
    """
    import torch

    pairs = iter(pairs)
    while chunk := list(islice(pairs, batch_size)):
        images = torch.stack([preprocess(image) for image, _ in chunk])
        yield images, tokenizer([caption for _, caption in chunk])
