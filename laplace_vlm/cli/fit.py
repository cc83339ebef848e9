"""``laplace-vlm fit``: a posterior for an open_clip model from image-caption pairs."""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from laplace_vlm.cli.errors import CliError, check_output
from laplace_vlm.cli.launch import World, launched
from laplace_vlm.cli.models import DEFAULT_MODEL, DEFAULT_PRETRAINED, load_open_clip
from laplace_vlm.cli.pairs import (
    IMAGE_SUFFIXES,
    at_most,
    folder_pairs,
    pair_batches,
    pair_source,
    shard_batches,
)
from laplace_vlm.curvature.distributed import (
    RankFailure,
    failures_shared_across_ranks,
    one_line,
)
from laplace_vlm.docstrings import fill_doc
from laplace_vlm.validation import positive_number

__all__ = ["IMAGE_SUFFIXES", "add_model_args", "add_parser", "run"]


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
        help="a folder of images with a captions CSV, or webdataset .tar shards: paths, folders "
        "or a brace pattern such as 'shards/{000000..000059}.tar'",
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
    p.add_argument(
        "--num-workers",
        type=int,
        default=0,
        help="loader processes per rank that decode the shards (0: the main process)",
    )
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="encoders in fp32, fp64 (exact reference fits), or under bf16 / fp16 autocast "
        "(mixed precision, for CUDA); the curvature and posterior stay in fp32 / fp64",
    )
    p.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="resumable partial sums (one file per rank under torchrun); a rerun resumes",
    )
    p.add_argument(
        "--checkpoint-every",
        type=positive_number(int),
        default=100,
        help="class batches between checkpoint writes",
    )
    p.set_defaults(func=run)


@fill_doc
def run(args: argparse.Namespace) -> int:
    """Fit a posterior on the pairs of ``--data`` and save it to ``--output``.

    The likelihood is ``--contrastive`` (default: ``siglip`` if the model has a logit bias,
    else ``clip``); the layerwise prior precision is optimised by the marginal likelihood at
    temperature ``1 / --pseudo-count``. Under ``torchrun`` every rank reads its share of the
    shards (webdataset's ``split_by_node``, then ``split_by_worker`` over ``--num-workers``),
    the factor sums are all-reduced, rank 0 alone writes ``--output``, and an error on one
    rank (a bad shard) ends every rank with that error.

    %(cli_run)s
    """
    with launched(args.device) as world:
        with _shared_cli_errors():  # a typo or a missing checkpoint fails before any pair is read
            if world.is_main:
                check_output(args.output, args.overwrite)
            batches = _pair_batches_of(args, world)
            model, preprocess, tokenizer = load_open_clip(args.model, args.pretrained, world.device)
        la = _fit(args, world, model, batches(preprocess, tokenizer))
        with _shared_cli_errors():
            if world.is_main:
                la.save(args.output, overwrite=args.overwrite)
        if world.is_main:
            prior = ", ".join(f"{p:.4g}" for p in la.prior_precision.flatten().tolist())
            ranks = f" on {world.size} ranks" if world.size > 1 else ""
            print(f"fitted on {la.n_data} pairs{ranks}; prior precision [{prior}]; "
                  f"saved {args.output}")  # fmt: skip
    return 0


def _fit(args: argparse.Namespace, world: World, model, batches: Iterable[tuple]):
    """The fitted, prior-optimised posterior of ``model`` (all ranks end with the same one)."""
    from laplace_vlm.dual_encoder_laplace import DualEncoderLaplace

    has_bias = getattr(model, "logit_bias", None) is not None
    contrastive = args.contrastive or ("siglip" if has_bias else "clip")
    model = _model_in(model, args.precision)
    la = _autocast_towers(DualEncoderLaplace(model, contrastive=contrastive), args.precision)
    checkpoint = None if args.checkpoint is None else world.per_rank(args.checkpoint)
    try:
        la.fit(at_most(batches, args.max_pairs), progress_bar=world.is_main and not args.no_progress,
               checkpoint=checkpoint, checkpoint_every=args.checkpoint_every)  # fmt: skip
    except (ValueError, RankFailure) as err:  # a bad shard, a CSV without a complete pair
        raise CliError(f"--data: {one_line(err)}") from None
    la.temperature = 1.0 / args.pseudo_count
    la.optimize_prior_precision(method="marglik", prior_structure="layerwise")
    return la


def _pair_batches_of(args: argparse.Namespace, world: World):
    """A function ``(preprocess, tokenizer) -> class batches`` of this rank's pairs."""
    if args.num_workers < 0:
        raise CliError(f"--num-workers must be 0 or more, got {args.num_workers}")
    source = pair_source(args.data, args.captions)
    if isinstance(source, list):  # shards
        return lambda preprocess, tokenizer: shard_batches(
            source, preprocess, tokenizer, args.batch_size, args.num_workers
        )
    folder, rows = source  # a CSV: every rank takes every size-th row
    rows = rows[world.rank :: world.size]
    return lambda preprocess, tokenizer: pair_batches(
        folder_pairs(folder, rows), preprocess, tokenizer, args.batch_size
    )


@contextmanager
def _shared_cli_errors() -> Iterator[None]:
    """Every rank fails with one line when any rank's block fails."""
    try:
        with failures_shared_across_ranks():
            yield
    except RankFailure as err:
        raise CliError(str(err)) from None


PRECISIONS = ("fp32", "fp64", "bf16", "fp16")
_AUTOCAST = {"bf16": "bfloat16", "fp16": "float16"}


def _model_in(model, precision: str):
    """``--precision fp64`` casts the model (and so the heads' copies); others keep it."""
    return model.double() if precision == "fp64" else model


def _autocast_towers(la, precision: str):
    """``--precision bf16`` / ``fp16``: the towers run under ``torch.autocast``; the curvature,
    posterior and predictive stay in the heads' float32 copies."""
    import torch

    if precision in _AUTOCAST:
        la.adapter.autocast = getattr(torch, _AUTOCAST[precision])
    return la
