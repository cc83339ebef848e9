"""Temperature scaling (Guo et al., 2017): the post-hoc calibration baseline.

A single temperature ``T`` divides the logits; it is fitted on a labelled validation split by
minimising the negative log-likelihood over ``log T`` with L-BFGS (``log T`` keeps ``T > 0``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from laplace_vlm.docstrings import fill_doc
from laplace_vlm.validation import check_int, check_labels, check_matrix


class TemperatureScaling:
    """Post-hoc temperature scaling of classification logits.

    Parameters
    ----------
    max_iter : int, default=100
        L-BFGS iterations (the problem is one-dimensional and convex in ``1/T``).

    Attributes
    ----------
    temperature : float
        1.0 until :meth:`fit` is called.
    """

    def __init__(self, max_iter: int = 100) -> None:
        self.max_iter = check_int("max_iter", max_iter)
        self.temperature = 1.0

    @fill_doc
    def fit(self, logits: torch.Tensor, labels: torch.Tensor) -> TemperatureScaling:
        """Fit ``T`` by minimising the mean NLL of ``softmax(logits / T)``.

        Parameters
        ----------
        logits : torch.Tensor
            `(N, C)` validation logits.
        %(labels)s

        Returns
        -------
        TemperatureScaling
            ``self``, with ``temperature`` fitted.

        Raises
        ------
        TypeError
            for non-float ``logits`` or non-integer ``labels``.
        ValueError
            for empty or non-finite ``logits``, or labels of another shape or out of range.
        """
        check_matrix("logits", logits)
        check_labels("labels", labels, len(logits), logits.shape[1])
        logits, labels = logits.detach().double(), labels.detach().long().to(logits.device)
        log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.LBFGS(
            [log_t], lr=1.0, max_iter=self.max_iter, line_search_fn="strong_wolfe"
        )

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = F.cross_entropy(logits / log_t.exp(), labels)
            loss.backward()
            return loss

        optimizer.step(closure)
        temperature = log_t.detach().exp()
        self.temperature = temperature.item()
        return self

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """Calibrated probabilities ``softmax(logits / T)``.

        Parameters
        ----------
        logits : torch.Tensor
            `(N, C)` logits (of any inputs, not only the validation split).

        Returns
        -------
        torch.Tensor
            `(N, C)` calibrated probabilities, each row summing to 1.

        Raises
        ------
        TypeError, ValueError
            for ``logits`` that are not a finite, non-empty float `(N, C)` tensor.
        """
        check_matrix("logits", logits)
        return torch.softmax(logits / self.temperature, dim=-1)
