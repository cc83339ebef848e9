"""Tuning the prior precision of :class:`~laplace_vlm.DualEncoderLaplace`.

``optimize_prior_precision`` dispatches on ``method``: the evidence optimum
(:func:`laplace_vlm.posterior.marglik.maximize_marglik`) or laplace's gridsearch, scored
here by a validation loop over dict, fit-batch or tensor inputs.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch
import torchmetrics
import tqdm

from laplace_vlm.enums import PredType, TuningMethod, parse_option
from laplace_vlm.posterior.marglik import maximize_marglik
from laplace_vlm.validation import check_bool, check_int, check_optional_int

# gridsearch's arguments and their defaults: given with marglik, they are ignored with a warning
_GRIDSEARCH_DEFAULTS = {"loss": None, "log_prior_prec_min": -4, "log_prior_prec_max": 4,
                        "grid_size": 100, "link_approx": "probit", "n_samples": 100,
                        "log_prior_prec_base": 10.0}  # fmt: skip


class PriorTuningMixin:
    """``optimize_prior_precision`` of :class:`~laplace_vlm.DualEncoderLaplace`: marglik or grid."""

    def optimize_prior_precision(
        self,
        pred_type: Any = PredType.PROBCOSINE,
        method: Any = "marglik",
        n_steps: int | None = None,
        lr: float | None = None,
        init_prior_prec: float | torch.Tensor = 1.0,
        prior_structure: Any = "scalar",
        val_loader: Any = None,
        loss: Any = None,
        log_prior_prec_min: float = -4,
        log_prior_prec_max: float = 4,
        grid_size: int = 100,
        link_approx: Any = "probit",
        n_samples: int = 100,
        verbose: bool = False,
        progress_bar: bool = False,
        log_prior_prec_base: float = 10.0,
    ) -> None:
        """Tune the prior precision: the evidence optimum (marglik) or laplace's gridsearch.

        laplace's signature. ``method='marglik'`` maximises :meth:`log_marginal_likelihood`
        with :func:`laplace_vlm.posterior.marglik.maximize_marglik` (safeguarded Newton in
        ``log lambda``, about 10 evaluations) instead of laplace's 100 Adam steps of 0.1 from
        ``init_prior_prec``, which stop well short of optima far from it. ``n_steps`` is its
        budget, as laplace's: if it runs out first, the last iterate is kept with a warning.
        ``method='gridsearch'`` is laplace's grid and loss, scored on ``val_loader`` by
        :meth:`__call__` (dict, fit-batch or tensor inputs), with the loss metric reset at
        every grid point (laplace's loop accumulates a torchmetrics loss across the grid).

        The gridsearch arguments (``val_loader``, ``loss``, ``log_prior_prec_min``,
        ``log_prior_prec_max``, ``grid_size``, ``link_approx``, ``n_samples``,
        ``log_prior_prec_base``) are ignored with a warning under marglik, as laplace does for
        ``val_loader``; ``lr`` and ``n_steps`` likewise under gridsearch.

        Parameters
        ----------
        pred_type : {'probcosine', 'probcosine_diag', 'glm', 'nn', 'map'}, default='probcosine'
            the predictive that gridsearch scores (unused by marglik, as in laplace). laplace
            has no default (its predictive default is ``'glm'``); this one is the default of
            :meth:`__call__`, so the grid tunes the predictive ``la(x)`` gives.
        method : {'marglik', 'gridsearch'}, default='marglik'
            the evidence optimum, or laplace's gridsearch on ``val_loader``.
        n_steps : int, optional
            marglik: the budget of evidence evaluations (default 100; about 10 converge).
        lr : float, optional
            the step of laplace's Adam loop: the Newton iteration chooses its own steps, so
            a given ``lr`` is ignored with a warning.
        init_prior_prec : float or torch.Tensor, default=1.0
            the start: one value (broadcast to ``prior_structure``), one per head (2 values) or
            one per tensor (``n_layers``).
        prior_structure : {'scalar', 'head', 'layerwise'}, default='scalar'
            laplace's 'scalar' and 'layerwise' (one per weight and bias tensor), or one value
            per head; laplace's 'diag' cannot be held by a Kronecker posterior.
        val_loader : iterable, optional
            gridsearch: batches ``(x, labels)`` (``x`` as for :meth:`__call__`) or dicts with
            ``"image"``, ``"text"`` and the labels under ``dict_key_y``.
        loss : callable or torchmetrics.Metric, optional
            gridsearch: the validation loss of ``(probs, labels)``; laplace's running NLL if
            None.
        log_prior_prec_min : float, default=-4
            gridsearch: the exponent of the grid's lower bound.
        log_prior_prec_max : float, default=4
            gridsearch: the exponent of the grid's upper bound.
        grid_size : int, default=100
            gridsearch: the number of grid values.
        link_approx : {'probit', 'mc', 'bridge', 'bridge_norm'}, default='probit'
            gridsearch: the link approximation of the scored predictive.
        n_samples : int, default=100
            gridsearch: Monte Carlo samples for ``link_approx='mc'``.
        verbose : bool, default=False
            print the optimised prior precision.
        progress_bar : bool, default=False
            show a progress bar.
        log_prior_prec_base : float, default=10.0
            gridsearch: the base of the logarithmic grid.

        Raises
        ------
        TypeError
            for a non-integer ``n_steps``, ``grid_size`` or ``n_samples``.
        ValueError
            for another ``method``, gridsearch without ``val_loader``, or when the evidence
            has no maximum (:func:`laplace_vlm.posterior.marglik.maximize_marglik`).
        """
        method = parse_option(TuningMethod, method, "method")
        n_steps = check_optional_int("n_steps", n_steps)
        for name, value in (("verbose", verbose), ("progress_bar", progress_bar)):
            check_bool(name, value)
        if method is TuningMethod.GRIDSEARCH:
            self._gridsearch_prior(pred_type, locals())
            return
        if lr is not None:
            warnings.warn(
                f"lr={lr} is the step size of laplace's Adam loop; method='marglik' runs a "
                "Newton iteration in log prior precision, which chooses its own steps: ignored."
            )
        if val_loader is not None:
            warnings.warn(
                "`val_loader` will be ignored when `method` == 'marglik'. "
                "Do you mean to set `method = 'gridsearch'`?"
            )
        self._warn_ignored(locals(), _GRIDSEARCH_DEFAULTS, "gridsearch")
        maximize_marglik(self, prior_structure, init_prior_prec,
                         max_iter=100 if n_steps is None else n_steps, verbose=verbose,
                         progress_bar=progress_bar, budget=True)  # fmt: skip

    @staticmethod
    def _warn_ignored(given: dict[str, Any], defaults: dict[str, Any], method: str) -> None:
        ignored = [k for k, default in defaults.items() if _differs(given[k], default)]
        if ignored:
            warnings.warn(f"{', '.join(ignored)} only apply to method={method!r}: ignored.")

    def _gridsearch_prior(self, pred_type: Any, args: dict[str, Any]) -> None:
        """laplace's gridsearch: its grid and default loss, our validation loop."""
        if args["val_loader"] is None:
            raise ValueError("gridsearch requires a validation set DataLoader (val_loader).")
        self._warn_ignored(args, {"n_steps": None, "lr": None}, "marglik")
        grid_size = check_int("grid_size", args["grid_size"])
        interval = torch.logspace(args["log_prior_prec_min"], args["log_prior_prec_max"],
                                  grid_size, base=args["log_prior_prec_base"])  # fmt: skip
        loss = args["loss"]
        if loss is None:
            from laplace.utils.metrics import RunningNLLMetric

            loss = RunningNLLMetric().to(self._device)
        self.prior_precision = self._gridsearch(
            loss, interval, args["val_loader"], pred_type, args["link_approx"],
            args["n_samples"], args["progress_bar"],
        )  # fmt: skip
        if args["verbose"]:
            print(f"Optimized prior precision is {self.prior_precision}.")

    def _gridsearch(
        self,
        loss: Any,
        interval: torch.Tensor,
        val_loader: Any,
        pred_type: Any,
        link_approx: Any = "probit",
        n_samples: int = 100,
        progress_bar: bool = False,
    ) -> torch.Tensor:
        """laplace's hook: the grid value of least validation loss (the first on a tie)."""
        if not (callable(loss) or isinstance(loss, torchmetrics.Metric)):
            raise TypeError(f"loss must be callable or a torchmetrics.Metric, got {loss!r}.")
        results, original = [], self.prior_precision.clone()
        try:
            for prior_prec in tqdm.tqdm(interval, disable=not progress_bar, desc="[Grid search]"):
                self.prior_precision = prior_prec
                results.append(self._validation_loss(loss, val_loader, pred_type, link_approx,
                                                     n_samples))  # fmt: skip
        except BaseException:  # a bad batch or loss leaves the prior as it was
            self.prior_precision = original
            raise
        return interval[int(torch.tensor(results).argmin())]

    def _validation_loss(self, loss, val_loader, pred_type, link_approx, n_samples) -> float:
        """``loss`` of ``self(x)`` over ``val_loader`` (laplace's ``validate`` with dict inputs)."""
        metric = isinstance(loss, torchmetrics.Metric)
        if metric:
            loss.reset()
        probs, labels = [], []
        with torch.no_grad():
            for batch in val_loader:
                x, y = self._split_validation_batch(batch)
                p = self(x, pred_type=pred_type, link_approx=link_approx, n_samples=n_samples)
                y = y.to(p.device)
                if metric:
                    loss.update(p, y)
                else:
                    probs.append(p)
                    labels.append(y)
        if metric:
            return float(loss.compute())
        if not probs:
            raise ValueError("val_loader yielded no batches.")
        return float(loss(torch.cat(probs), torch.cat(labels)))

    def _split_validation_batch(self, batch: Any) -> tuple[Any, torch.Tensor]:
        if isinstance(batch, Mapping):
            if self.dict_key_y not in batch:
                raise ValueError(
                    f"a dict batch of val_loader needs its labels under dict_key_y="
                    f"{self.dict_key_y!r}, got keys {sorted(batch)}."
                )
            x = {k: v for k, v in batch.items() if k != self.dict_key_y}
            return x, batch[self.dict_key_y]
        if isinstance(batch, (tuple, list)) and len(batch) == 2:
            return batch[0], batch[1]
        raise ValueError(
            "a val_loader batch must be (x, labels) or a dict with 'image', 'text' and the "
            f"labels under {self.dict_key_y!r}."
        )


def _differs(value: Any, default: Any) -> bool:
    """Whether an argument was given: not its default (objects compare by identity only)."""
    if default is None or value is None:
        return value is not default
    return not (isinstance(value, (str, int, float)) and value == default)
