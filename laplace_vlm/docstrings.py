"""Shared numpy-docstring entries: one description for a parameter that recurs across modules.

A docstring names a shared entry with a line ``%(key)s`` of its own; :func:`fill_doc` replaces
that line by the entry, indented as the placeholder is. An entry may itself hold placeholders
(a whole ``Parameters`` section shared by a family of functions is composed of the entries of
its parameters). This is the convention of scipy
(``scipy._lib.doccer``) and MNE (``mne.utils.docs.fill_doc``); both keep theirs private and
``docrep`` is unmaintained, so the few lines live here. An entry used by one module only is
kept in that module with :meth:`DocEntries.extend`.
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

_PLACEHOLDER = re.compile(r"^(?P<indent>[ \t]*)%\((?P<key>\w+)\)s[ \t]*$", re.MULTILINE)


class DocEntries:
    """Named docstring entries and the decorator that fills them in.

    Parameters
    ----------
    **entries : str
        ``key -> entry``; an entry is numpy-docstring text (``"name : type\\n    description"``),
        dedented here.
    """

    def __init__(self, **entries: str) -> None:
        self.entries = {key: textwrap.dedent(text).strip("\n") for key, text in entries.items()}

    def extend(self, **entries: str) -> DocEntries:
        """These entries and ``entries`` (which may not redefine a key).

        Parameters
        ----------
        **entries : str
            the new entries.

        Returns
        -------
        DocEntries
            a new set; this one is unchanged.
        """
        clash = sorted(set(entries) & set(self.entries))
        if clash:
            raise ValueError(f"docstring entries {clash} are already defined.")
        return DocEntries(**self.entries, **entries)

    def __call__(self, obj: T) -> T:
        """Fill the ``%(key)s`` lines of ``obj.__doc__`` (a function, method or class).

        Parameters
        ----------
        obj : callable or type
            the object whose docstring to fill; returned itself.

        Returns
        -------
        callable or type
            ``obj``, its docstring filled.

        Raises
        ------
        KeyError
            if a placeholder names no entry (at import, so a typo never reaches a user).
        ValueError
            if entries refer to each other in a cycle.
        """
        doc = obj.__doc__
        if doc is None:  # ``python -OO`` strips docstrings
            return obj
        for _ in range(len(self.entries) + 1):  # entries compose: fill until none is left
            if not _PLACEHOLDER.search(doc):
                obj.__doc__ = doc
                return obj
            doc = _PLACEHOLDER.sub(self._entry(obj), doc)
        raise ValueError(f"{getattr(obj, '__qualname__', obj)}: docstring entries form a cycle.")

    def _entry(self, obj: object) -> Callable[[re.Match], str]:
        def fill(match: re.Match) -> str:
            key = match["key"]
            if key not in self.entries:
                raise KeyError(f"{getattr(obj, '__qualname__', obj)}: no docstring entry {key!r}.")
            return textwrap.indent(self.entries[key], match["indent"])

        return fill


fill_doc = DocEntries(
    # evaluation: predictions and their scores
    classification_parameters="""
        Parameters
        ----------
        %(probs)s
        %(labels)s
        """,
    selective_parameters="""
        Parameters
        ----------
        %(confidence)s
        %(correct)s
        """,
    probs="""
        probs : torch.Tensor
            `(N, C)` predictive probabilities.
        """,
    labels="""
        labels : torch.Tensor
            `(N,)` class indices.
        """,
    confidence="""
        confidence : torch.Tensor
            `(N,)` confidence of each prediction (higher = more likely correct).
        """,
    correct="""
        correct : torch.Tensor
            `(N,)` bool (or 0/1) whether each prediction is correct.
        """,
    # files and models
    path="""
        path : str or os.PathLike
            the file.
        """,
    candidate_model="""
        model : object
            the candidate model.
        """,
    # the command line
    subparsers="""
        sub : argparse subparsers
            of ``laplace-vlm`` (the action ``add_subparsers`` returns).
        """,
    cli_add_parser="""
        Parameters
        ----------
        %(subparsers)s
        """,
    cli_run="""
        Parameters
        ----------
        args : argparse.Namespace
            the parsed arguments of the subcommand.

        Returns
        -------
        %(exit_status)s
        """,
    exit_status="""
        int
            the exit status: 0 on success.
        """,
    # predictive: Gaussian logits
    logit_sampling_parameters="""
        %(logit_moment_parameters)s
        n_samples : int, default=200
            Monte Carlo samples of the logits.
        generator : torch.Generator or int, optional
            randomness (an int is a seed; None means seed 0).
        """,
    logit_moment_parameters="""
        Parameters
        ----------
        mean, var : torch.Tensor
            `(N, C)` logit means and variances.
        """,
    probs_entropy="""
        entropy : torch.Tensor
            `(N,)` entropy of ``probs`` (total uncertainty), nats.
        """,
    # active learning and the demos
    zero_shot_posterior="""
        la_init : DualEncoderLaplace
            the zero-shot posterior (not modified).
        """,
    active_problem="""
        problem : ActiveLearningProblem
            the pool, the queries and the class texts.
        """,
    class_text="""
        class_text : torch.Tensor
            `(C, d_txt)` class text activations.
        """,
    budget_metrics="""
        dict of int to dict
            ``{budget: metrics}``: budget 0 is the zero-shot posterior, every other the number
            of pool labels adapted on; the metrics are :func:`laplace_vlm.active.loop.result_row`'s.
        """,
    protocol_run="""
        Parameters
        ----------
        %(zero_shot_posterior)s
        %(active_problem)s
        strategy : Strategy
            what to label.
        seed : int
            seed of every random choice of the run.
        config : ActiveLearningConfig
            budgets, fine-tuning and adaptation.

        Returns
        -------
        %(budget_metrics)s
        """,
    demo_dataset="""
        dataset : {'digits', 'fashion-mnist'}
            the data set.
        """,
)
