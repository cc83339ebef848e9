"""``laplace-vlm zeroshot``: predictions with uncertainty for a folder of images, as CSV."""

from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from laplace_vlm.cli.errors import CliError, check_output
from laplace_vlm.cli.fit import IMAGE_SUFFIXES, add_model_args
from laplace_vlm.cli.models import load_open_clip
from laplace_vlm.docstrings import fill_doc
from laplace_vlm.validation import positive_number

DEFAULT_TEMPLATES = ("a photo of a {}.",)


@fill_doc
def add_parser(sub) -> None:
    """Add the ``zeroshot`` subcommand to ``sub``.

    %(cli_add_parser)s
    """
    p = sub.add_parser("zeroshot", help="zero-shot predictions with uncertainty for image files")
    add_model_args(p)
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
    p.add_argument("--batch-size", type=positive_number(int), default=64)
    p.add_argument("--output", type=Path, help="CSV file (default: standard output)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.set_defaults(func=run)


@fill_doc
def run(args: argparse.Namespace) -> int:
    """Write zero-shot predictions for the images of ``--images`` as CSV.

    Columns: filename, prediction, probability, entropy, mutual_information; to ``--output``
    or standard output.

    %(cli_run)s
    """
    from laplace_vlm.adapters.features import extract_features
    from laplace_vlm.dual_encoder_laplace import DualEncoderLaplace
    from laplace_vlm.tasks.zeroshot import ZeroShotClassifier, format_prompts

    if args.output is not None:
        check_output(args.output, args.overwrite)
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
    """The class names of ``--classnames-file`` or ``--classnames``, stripped, blanks dropped.

    Parameters
    ----------
    inline : str or None
        comma-separated names; read only if ``path`` is None.
    path : Path or None
        file of one name per line.

    Returns
    -------
    list of str
        the names; none at all is a :class:`CliError`.
    """
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
    """The image files of ``folder`` (by suffix, :data:`IMAGE_SUFFIXES`), sorted.

    Parameters
    ----------
    folder : Path
        the ``--images`` folder; not a folder, or no images, is a :class:`CliError`.

    Returns
    -------
    list of Path
        the files.
    """
    if not folder.is_dir():
        raise CliError(f"--images: not a folder: {folder}")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise CliError(f"--images: no {'/'.join(IMAGE_SUFFIXES)} files in {folder}")
    return files


def image_batches(files: Sequence[Path], preprocess, batch_size: int) -> Iterator:
    """Batches `(B, 3, H, W)` of the preprocessed RGB images of ``files``, in order.

    Parameters
    ----------
    files : Sequence of Path
        image files.
    preprocess : callable
        open_clip's image transform, PIL image to `(3, H, W)` tensor.
    batch_size : int
        images per batch; the last batch may be smaller.

    Yields
    ------
    torch.Tensor
        `(B, 3, H, W)` preprocessed images, ``B <= batch_size``.
    """
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
