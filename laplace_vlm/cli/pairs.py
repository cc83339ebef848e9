"""The pairs of ``laplace-vlm fit``: a folder with a captions CSV, or webdataset tar shards."""

from __future__ import annotations

import csv
import io
import tarfile  # only to tell a tar file from a typo before the model loads
from collections.abc import Iterable, Iterator, Sequence
from itertools import islice
from pathlib import Path

from laplace_vlm.cli.errors import CliError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
CAPTION_SUFFIXES = (".txt", ".caption")


def at_most(batches: Iterable[tuple], max_pairs: int | None) -> Iterator[tuple]:
    """The class batches up to ``max_pairs`` pairs in all, the last one cut if needed.

    Parameters
    ----------
    batches : Iterable of tuple
        ``(images (B, ...), tokens (B, L))`` batches.
    max_pairs : int or None
        the most pairs to yield; None: all.

    Yields
    ------
    tuple
        ``(images, tokens)``, with at most ``max_pairs`` rows together.
    """
    left = max_pairs
    for images, tokens in batches:
        if left is not None:
            if left <= 0:
                return
            images, tokens, left = images[:left], tokens[:left], left - len(images[:left])
        yield images, tokens


def pair_source(
    data: Sequence[str], captions: Path | None
) -> list[Path] | tuple[Path, list[tuple[str, str]]]:
    """The tar shards of ``data``, or its folder and captions rows, checked.

    Paths are checked before anything is read, so a typo fails before the model loads.

    Parameters
    ----------
    data : Sequence of str
        one folder of images (without ``.tar`` files), or tar shards (also as a brace pattern,
        ``shards/{000000..000059}.tar``) and folders of them.
    captions : Path or None
        CSV with columns ``filename,caption`` for a folder; None: ``captions.csv`` in it.

    Returns
    -------
    list of Path or tuple
        the sorted shards; for a folder, ``(folder, [(filename, caption), ...])``.
    """
    paths = [Path(p) for d in data for p in _expand_braces(d)]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise CliError(f"--data: no such file or folder: {', '.join(missing)}")
    if len(paths) == 1 and paths[0].is_dir() and not list(paths[0].glob("*.tar")):
        csv_path = captions or paths[0] / "captions.csv"
        if not csv_path.is_file():
            raise CliError(f"--captions: no captions CSV at {csv_path} (columns filename,caption)")
        return paths[0], _read_captions(csv_path)
    shards = sorted(s for p in paths for s in (p.glob("*.tar") if p.is_dir() else [p]))
    if not shards:
        raise CliError(f"--data: no .tar shards in {', '.join(map(str, paths))}")
    not_tar = [str(s) for s in shards if not tarfile.is_tarfile(s)]
    if not_tar:
        raise CliError(f"--data: not a tar file: {', '.join(not_tar)}")
    return shards


def _expand_braces(pattern: str) -> list[str]:
    """``shards/{000000..000059}.tar`` as webdataset writes it, one path per shard."""
    if "{" not in pattern:
        return [pattern]
    try:
        from braceexpand import braceexpand  # webdataset's own dependency
    except ImportError:
        raise CliError(
            "--data: shard patterns need webdataset: pip install 'laplace-vlm[webdataset]'"
        ) from None
    return list(braceexpand(pattern))


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


def shard_batches(
    shards: Sequence[Path], preprocess, tokenizer, batch_size: int, num_workers: int = 0
) -> Iterable[tuple]:
    """Class batches of this rank's share of webdataset tar shards (LAION's format).

    The shards are split by rank (``split_by_node``) and then by loader process
    (``split_by_worker``); each process decodes, preprocesses and tokenises whole batches of
    consecutive pairs, in shard order. A sample is the files sharing a key; it needs one image
    and one ``.txt`` / ``.caption`` file, and samples without both are skipped. An unreadable
    shard or image raises a ValueError that names the shard.

    Parameters
    ----------
    shards : Sequence of Path
        the tar files, in order.
    preprocess : callable
        open_clip's image transform, PIL image to `(3, H, W)` tensor.
    tokenizer : callable
        open_clip's tokenizer, list of captions to `(B, L)` tokens.
    batch_size : int
        pairs per batch; each process's last batch may be smaller.
    num_workers : int, default=0
        loader processes (0: this process decodes).

    Returns
    -------
    Iterable of tuple
        ``(images (B, 3, H, W), tokens (B, L))`` batches (a webdataset ``WebLoader``).
    """
    try:
        import webdataset as wds
    except ImportError:
        raise CliError(
            "--data: reading tar shards needs webdataset: pip install 'laplace-vlm[webdataset]'"
        ) from None
    dataset = (
        wds.WebDataset(
            [str(s) for s in shards],
            shardshuffle=False,
            empty_check=False,
            nodesplitter=wds.split_by_node,
            workersplitter=wds.split_by_worker,
            handler=_raise_naming_shard,
        )
        .select(lambda sample: _has(sample, IMAGE_SUFFIXES) and _has(sample, CAPTION_SUFFIXES))
        .map(_Decode(preprocess))
        .batched(batch_size, collation_fn=_Collate(tokenizer), partial=True)
    )
    return wds.WebLoader(dataset, batch_size=None, num_workers=num_workers)


def _raise_naming_shard(error: Exception) -> bool:
    """webdataset's error handler: re-raise with the shard's name (webdataset appends it)."""
    url = next((a for a in reversed(error.args) if isinstance(a, str) and a.endswith(".tar")), None)
    reason = str(error.args[0]) if error.args else type(error).__name__
    raise ValueError(f"shard {url} is unreadable ({type(error).__name__}: {reason})") from error


class _Decode:
    """One sample's ``(preprocessed image (3, H, W), stripped caption)``."""

    def __init__(self, preprocess) -> None:
        self.preprocess = preprocess

    def __call__(self, sample: dict) -> tuple:
        from PIL import Image

        image = next(sample[s.lstrip(".")] for s in IMAGE_SUFFIXES if s.lstrip(".") in sample)
        caption = next(sample[s.lstrip(".")] for s in CAPTION_SUFFIXES if s.lstrip(".") in sample)
        try:
            with Image.open(io.BytesIO(image)) as pil:
                pixels = self.preprocess(pil.convert("RGB"))
            return pixels, caption.decode("utf-8").strip()
        except Exception as err:  # PIL and codecs raise many types: name the sample
            raise ValueError(
                f"shard {sample.get('__url__')}: sample {sample.get('__key__')!r} cannot be "
                f"read ({type(err).__name__}: {err})"
            ) from err


class _Collate:
    """A class batch ``(images (B, 3, H, W), tokens (B, L))`` of decoded samples."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def __call__(self, samples: list[tuple]) -> tuple:
        import torch

        images = torch.stack([image for image, _ in samples])
        return images, self.tokenizer([caption for _, caption in samples])


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
