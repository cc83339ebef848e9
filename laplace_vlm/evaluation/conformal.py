"""Split conformal prediction sets for classification: LAC, APS and RAPS.

Written here rather than imported: the PyPI toolboxes pull heavy dependencies (torchcp needs
torch_geometric and the compiled torchsort).

Every method defines a non-conformity score ``s(x, y)`` (lower = more conforming), calibrates
the threshold ``q_hat`` on held-out data, and predicts the set ``{y : s(x, y) <= q_hat}``:

* ``"lac"`` (Sadinle et al. 2019): ``s = 1 - p_y``; the set is ``{y : p_y >= 1 - q_hat}``.
* ``"aps"`` (Romano et al. 2020): classes sorted by decreasing probability (ties broken by the
  lower class index), ``s = sum of the probabilities ranked above y + u p_y`` with one
  ``u ~ U(0, 1)`` per input when randomised and ``u = 1`` otherwise.
* ``"raps"`` (Angelopoulos et al. 2021): the APS score plus ``lam * max(0, rank(y) - k_reg)``
  with ``rank`` 1 for the most probable class.

``q_hat`` is the ``k = ceil((n + 1)(1 - alpha))``-th smallest of the ``n`` calibration scores,
i.e. the empirical ``k / n`` quantile with the inverse-CDF ("higher") rule. With exchangeable
data, ``P(y in set) >= 1 - alpha``, and ``<= 1 - alpha + 1 / (n + 1)`` when the scores have no
ties (LAC, randomised APS/RAPS on continuous probabilities). When ``k > n`` (fewer than
``1/alpha - 1`` calibration points) no finite threshold is valid: ``q_hat = inf`` and every set
holds all classes. Sets may be empty when even the top class scores above ``q_hat``.
"""

from __future__ import annotations

import math

import torch

from laplace_vlm.docstrings import fill_doc
from laplace_vlm.validation import check_matrix

# the one argument of the set statistics
_fill_doc = fill_doc.extend(
    sets_parameters="""
        Parameters
        ----------
        sets : torch.Tensor
            `(N, C)` bool prediction-set mask, ``N >= 1``.
        """
)

_METHODS = ("lac", "aps", "raps")
# Softmax outputs in float32 sum to 1 only up to rounding; this tolerance still rejects logits.
_SUM_TOL = 1e-3


def _check_probs(probs: torch.Tensor, name: str) -> torch.Tensor:
    # TypeError unless a float tensor; ValueError unless finite, non-empty and (N, C)
    probs = check_matrix(name, probs).detach().double()
    if (probs < 0).any() or ((probs.sum(1) - 1).abs() > _SUM_TOL).any():
        raise ValueError(
            f"{name} must hold class probabilities (non-negative rows summing to 1); "
            f"got values in [{probs.min():.3g}, {probs.max():.3g}] and row sums in "
            f"[{probs.sum(1).min():.4g}, {probs.sum(1).max():.4g}]. Pass softmax(logits)."
        )
    return probs


def _check_labels(labels: torch.Tensor, n: int, num_classes: int, name: str) -> torch.Tensor:
    if not isinstance(labels, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(labels).__name__}.")
    if labels.ndim != 1 or len(labels) != n:
        raise ValueError(f"{name} must be 1-D of length {n}, got shape {tuple(labels.shape)}.")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer class indices, got dtype {labels.dtype}.")
    if n and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"{name} must lie in [0, {num_classes}), got values in "
            f"[{int(labels.min())}, {int(labels.max())}]."
        )
    return labels.detach().long()


def _conformal_rank(n: int, alpha: float) -> int:
    # The 1e-9 absorbs binary rounding: (9 + 1) * (1 - 0.7) is 3.0000000000000004, and k must be 3.
    return math.ceil((n + 1) * (1 - alpha) - 1e-9)


def _check_alpha(alpha: float) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < 1:
        raise ValueError(f"alpha must be a number in (0, 1), got {alpha!r}.")
    return float(alpha)


def conformal_quantile(scores: torch.Tensor, alpha: float) -> float:
    """The split-conformal threshold of ``n`` calibration scores.

    Parameters
    ----------
    scores : torch.Tensor
        `(n,)` non-conformity scores of the calibration inputs at their true labels, ``n >= 1``.
    alpha : float
        Miscoverage level in ``(0, 1)``.

    Returns
    -------
    float
        The ``ceil((n + 1)(1 - alpha))``-th smallest score, or ``inf`` when that exceeds ``n``.
    """
    alpha = _check_alpha(alpha)
    if not isinstance(scores, torch.Tensor) or scores.ndim != 1 or scores.numel() == 0:
        raise ValueError("scores must be a non-empty 1-D torch.Tensor.")
    if not scores.is_floating_point() or not torch.isfinite(scores).all():
        raise ValueError("scores must be finite floating-point values.")
    k = _conformal_rank(len(scores), alpha)
    if k > len(scores):
        return math.inf
    return float(torch.sort(scores.detach().double()).values[k - 1])


class SplitConformal:
    """Split conformal classifier sets from predictive probabilities.

    Parameters
    ----------
    method : str
        ``"lac"``, ``"aps"`` or ``"raps"`` (see the module docstring for the scores).
    alpha : float
        Miscoverage level in ``(0, 1)``; the sets cover the label with probability
        ``>= 1 - alpha``.
    randomized : bool or None
        APS/RAPS only: add ``u p_y`` with ``u ~ U(0, 1)`` instead of ``p_y`` (tight coverage).
        None means True for APS/RAPS; LAC accepts only None or False.
    k_reg : int or None
        RAPS only: number of top-ranked classes free of penalty, ``>= 0``; None means 1.
    lam : float or None
        RAPS only: penalty per rank beyond ``k_reg``, ``>= 0``; None means 0.01. The RAPS paper
        tunes ``k_reg`` and ``lam`` on held-out data.
    generator : torch.Generator or None
        Randomised APS/RAPS only: source of ``u``, drawn as
        ``torch.rand(N, generator=generator, dtype=torch.float64)``; None uses the global RNG.

    Attributes
    ----------
    q_hat : float
        Calibrated threshold (``inf`` when the calibration set is too small for ``alpha``);
        set by :meth:`fit`.
    n_calibration : int
        Number of calibration inputs.
    num_classes : int
        Number of classes seen in :meth:`fit`.
    """

    def __init__(
        self,
        method: str = "lac",
        alpha: float = 0.1,
        randomized: bool | None = None,
        k_reg: int | None = None,
        lam: float | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        if method not in _METHODS:
            raise ValueError(f"method must be one of {_METHODS}, got {method!r}.")
        self.method = method
        self.alpha = _check_alpha(alpha)
        self.randomized = self._check_randomized(randomized)
        self.k_reg, self.lam = self._check_raps(k_reg, lam)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(
                f"generator must be a torch.Generator, got {type(generator).__name__}."
            )
        if generator is not None and not self.randomized:
            raise ValueError("generator is used only by randomized 'aps'/'raps'.")
        self.generator = generator
        self.q_hat: float | None = None
        self.n_calibration: int | None = None
        self.num_classes: int | None = None

    def _check_randomized(self, randomized: bool | None) -> bool:
        if randomized is not None and not isinstance(randomized, bool):
            raise ValueError(f"randomized must be a bool or None, got {randomized!r}.")
        if self.method == "lac":
            if randomized:
                raise ValueError(
                    "randomized=True applies only to 'aps'/'raps'; LAC is deterministic."
                )
            return False
        return True if randomized is None else randomized

    def _check_raps(self, k_reg: int | None, lam: float | None) -> tuple[int, float]:
        if self.method != "raps":
            if k_reg is not None or lam is not None:
                raise ValueError(f"k_reg and lam apply only to method='raps', not {self.method!r}.")
            return 0, 0.0
        k_reg = 1 if k_reg is None else k_reg
        lam = 0.01 if lam is None else lam
        if isinstance(k_reg, bool) or not isinstance(k_reg, int) or k_reg < 0:
            raise ValueError(f"k_reg must be an integer >= 0, got {k_reg!r}.")
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not 0 <= lam < math.inf:
            raise ValueError(f"lam must be a finite number >= 0, got {lam!r}.")
        return k_reg, float(lam)

    def _uniforms(self, n: int, device: torch.device) -> torch.Tensor:
        gen_device = self.generator.device if self.generator is not None else device
        u = torch.rand(n, generator=self.generator, dtype=torch.float64, device=gen_device)
        return u.to(device)

    @fill_doc
    def scores(self, probs: torch.Tensor, u: torch.Tensor | None = None) -> torch.Tensor:
        """Non-conformity score of every class for every input.

        Parameters
        ----------
        %(probs)s
        u : torch.Tensor or None
            `(N,)` uniforms in ``[0, 1]`` for randomised APS/RAPS; None draws them from
            ``generator``. Must be None for LAC and non-randomised APS/RAPS.

        Returns
        -------
        torch.Tensor
            `(N, C)` float64 scores ``s(x_i, c)``; lower = more conforming.
        """
        probs = _check_probs(probs, "probs")
        if u is not None and not self.randomized:
            raise ValueError(f"u is used only by randomized 'aps'/'raps', not {self}.")
        if self.method == "lac":
            return 1 - probs
        if self.randomized and u is None:
            u = self._uniforms(len(probs), probs.device)
        elif self.randomized:
            if not isinstance(u, torch.Tensor) or u.shape != (len(probs),):
                raise ValueError(f"u must be a ({len(probs)},) tensor of uniforms in [0, 1].")
            if not ((u >= 0) & (u <= 1)).all():
                raise ValueError("u must lie in [0, 1].")
            u = u.detach().to(probs.device, torch.float64)
        return self._sorted_scores(probs, u)

    def _sorted_scores(self, probs: torch.Tensor, u: torch.Tensor | None) -> torch.Tensor:
        # Stable sort: tied probabilities are ranked by class index, the same at fit and predict.
        order = torch.argsort(probs, dim=1, descending=True, stable=True)
        p_sorted = probs.gather(1, order)
        cum = p_sorted.cumsum(1)
        if u is None:  # non-randomised: the running total including the class itself
            sorted_scores = cum
        else:
            above = torch.cat([cum.new_zeros(len(cum), 1), cum[:, :-1]], dim=1)
            sorted_scores = above + u[:, None] * p_sorted
        if self.method == "raps":
            rank = torch.arange(1, probs.shape[1] + 1, dtype=torch.float64, device=probs.device)
            sorted_scores = sorted_scores + self.lam * (rank - self.k_reg).clamp_min(0)
        return torch.empty_like(sorted_scores).scatter_(1, order, sorted_scores)

    def fit(self, cal_probs: torch.Tensor, cal_labels: torch.Tensor) -> SplitConformal:
        """Calibrate ``q_hat`` on held-out data.

        Parameters
        ----------
        cal_probs : torch.Tensor
            `(n, C)` predictive probabilities of the calibration inputs, ``n >= 1``.
        cal_labels : torch.Tensor
            `(n,)` integer true labels in ``[0, C)``.

        Returns
        -------
        SplitConformal
            ``self``, with ``q_hat``, ``n_calibration`` and ``num_classes`` set.
        """
        cal_probs = _check_probs(cal_probs, "cal_probs")
        labels = _check_labels(cal_labels, len(cal_probs), cal_probs.shape[1], "cal_labels")
        true_scores = self.scores(cal_probs).gather(1, labels.to(cal_probs.device)[:, None])
        self.q_hat = conformal_quantile(true_scores.squeeze(1), self.alpha)
        self.n_calibration, self.num_classes = len(cal_probs), cal_probs.shape[1]
        return self

    def predict(self, probs: torch.Tensor) -> torch.Tensor:
        """Prediction sets ``{c : s(x, c) <= q_hat}``.

        Parameters
        ----------
        probs : torch.Tensor
            `(N, C)` predictive probabilities, with the ``C`` classes of the calibration.

        Returns
        -------
        torch.Tensor
            `(N, C)` bool mask; ``[i, c]`` is True when class ``c`` is in the set of input ``i``.
        """
        if self.q_hat is None:
            raise ValueError("SplitConformal is not fitted: call fit(cal_probs, cal_labels) first.")
        if (
            isinstance(probs, torch.Tensor)
            and probs.ndim == 2
            and probs.shape[1] != self.num_classes
        ):
            raise ValueError(
                f"probs must have the {self.num_classes} classes of the calibration, "
                f"got {probs.shape[1]}."
            )
        return self.scores(probs) <= self.q_hat

    def __repr__(self) -> str:
        extra = f", randomized={self.randomized}" if self.method != "lac" else ""
        if self.method == "raps":
            extra += f", k_reg={self.k_reg}, lam={self.lam}"
        return f"SplitConformal(method={self.method!r}, alpha={self.alpha}{extra})"


def _check_sets(sets: torch.Tensor) -> torch.Tensor:
    if not isinstance(sets, torch.Tensor) or sets.dtype != torch.bool or sets.ndim != 2:
        raise ValueError("sets must be a 2-D (N, C) bool tensor, as returned by predict.")
    if len(sets) == 0:
        raise ValueError("sets must hold at least one prediction set, got 0 rows.")
    return sets


def coverage(sets: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of inputs whose true label is in their prediction set.

    Parameters
    ----------
    sets : torch.Tensor
        `(N, C)` bool prediction-set mask, ``N >= 1``.
    labels : torch.Tensor
        `(N,)` integer true labels in ``[0, C)``.

    Returns
    -------
    float
        Empirical coverage in ``[0, 1]``.
    """
    sets = _check_sets(sets)
    labels = _check_labels(labels, len(sets), sets.shape[1], "labels").to(sets.device)
    return float(sets.gather(1, labels[:, None]).double().mean())


@_fill_doc
def mean_set_size(sets: torch.Tensor) -> float:
    """Average number of classes per prediction set.

    %(sets_parameters)s

    Returns
    -------
    float
        Mean set size in ``[0, C]``.
    """
    return float(_check_sets(sets).sum(1).double().mean())


@_fill_doc
def empty_rate(sets: torch.Tensor) -> float:
    """Fraction of inputs whose prediction set is empty.

    LAC returns an empty set wherever no class reaches the calibrated threshold: with an
    accurate model the threshold is high, and the sets of uncertain inputs are often empty.

    %(sets_parameters)s

    Returns
    -------
    float
        in ``[0, 1]``.
    """
    return float((~_check_sets(sets).any(1)).double().mean())
