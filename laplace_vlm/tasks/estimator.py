"""A scikit-learn classifier over :class:`~laplace_vlm.tasks.zeroshot.ZeroShotClassifier`.

Conformal toolboxes (MAPIE, crepes), calibration wrappers and scikit-learn's metrics and
model-selection tools take an estimator with ``fit``, ``predict_proba``, ``predict`` and
``classes_``. :class:`ZeroShotEstimator` is that estimator for a fitted zero-shot posterior:
``X`` holds the pre-projection image activations (encode once with
:func:`laplace_vlm.adapters.features.extract_features`), ``y`` the class indices of the
classifier's prompts. The posterior is fitted already, so :meth:`ZeroShotEstimator.fit` only
checks ``X`` and ``y`` and records ``classes_``: tools that refit (``clone`` + ``fit``) get the
same predictions, and MAPIE's ``prefit=True`` path is the natural one.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.validation import check_is_fitted, validate_data

from laplace_vlm.enums import LinkApprox, PredType, parse_option


class ZeroShotEstimator(ClassifierMixin, BaseEstimator):
    """Zero-shot probabilities of a Laplace posterior, as a scikit-learn classifier.

    Parameters
    ----------
    classifier : ZeroShotClassifier
        the fitted posterior and its class prompts.
    pred_type : {'probcosine', 'probcosine_diag', 'glm', 'nn', 'map'}, default='probcosine'
        the predictive, as in :meth:`ZeroShotClassifier.predict`.
    link_approx : {'probit', 'mc', 'bridge', 'bridge_norm'}, default='probit'
        the link, as in :meth:`ZeroShotClassifier.predict` (``'nn'`` needs ``'mc'``).
    n_samples : int, default=100
        Monte Carlo samples where the predictive draws any.
    with_residual : bool, default=False
        the columns of ``X`` are ``[activations (d_img) | residual (D)]``, for image towers
        whose embedding is ``W a + b + r`` (SigLIP); otherwise ``X`` is the activations only.

    Attributes
    ----------
    classes_ : numpy.ndarray
        `(C,)` the class indices ``0 .. C-1`` (the order of the classifier's prompts).
    n_features_in_ : int
        the columns of ``X``.

    Examples
    --------
    >>> est = ZeroShotEstimator(classifier).fit(X_calibration)  # doctest: +SKIP
    >>> from mapie.classification import SplitConformalClassifier  # doctest: +SKIP
    >>> mapie = SplitConformalClassifier(est, confidence_level=0.9, prefit=True)  # doctest: +SKIP
    >>> sets = mapie.conformalize(X_cal, y_cal).predict_set(X_test)[1]  # doctest: +SKIP
    """

    def __init__(
        self,
        classifier=None,
        pred_type: str | PredType = "probcosine",
        link_approx: str | LinkApprox = "probit",
        n_samples: int = 100,
        with_residual: bool = False,
    ) -> None:
        # scikit-learn's contract: __init__ stores the parameters unchanged; fit checks them
        self.classifier = classifier
        self.pred_type = pred_type
        self.link_approx = link_approx
        self.n_samples = n_samples
        self.with_residual = with_residual

    def fit(self, X, y=None) -> ZeroShotEstimator:
        """Check the inputs and record ``classes_``; the posterior is fitted already.

        Parameters
        ----------
        X : array-like
            `(N, d_img)` pre-projection image activations (`(N, d_img + D)` with
            ``with_residual``).
        y : array-like, optional
            `(N,)` class indices in ``[0, C)``; only checked.

        Returns
        -------
        ZeroShotEstimator
            ``self``.

        Raises
        ------
        TypeError
            if ``classifier`` is not a ``ZeroShotClassifier``.
        ValueError
            for an unknown ``pred_type`` / ``link_approx``, ``X`` of the wrong width, or
            labels outside ``[0, C)``.
        """
        self._check_params()
        C = len(self.classifier.class_activations)
        if y is None:
            X = validate_data(self, X, dtype=np.float64)
        else:
            X, y = validate_data(self, X, y, dtype=np.float64)
            y = np.asarray(y)
            if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= C:
                raise ValueError(f"y must hold class indices in [0, {C}), got {np.unique(y)}.")
        self._check_width(X.shape[1])
        self.classes_ = np.arange(C)
        return self

    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities under the posterior predictive.

        Parameters
        ----------
        X : array-like
            `(N, n_features_in_)` as in :meth:`fit`.

        Returns
        -------
        numpy.ndarray
            `(N, C)` float64 probabilities, columns in the order of ``classes_``; uniform for
            an input whose embedding is zero (as open_clip's normalisation gives).
        """
        check_is_fitted(self)
        X = validate_data(self, X, dtype=np.float64, reset=False)
        heads = self.classifier.la.heads
        weight = heads.image_projection.weight
        X = torch.as_tensor(X, dtype=weight.dtype, device=weight.device)
        d_img = heads.in_features("image")
        acts, residual = (X[:, :d_img], X[:, d_img:]) if self.with_residual else (X, None)
        with torch.no_grad():
            z = heads.embed_image(heads.design("image", acts), residual)
        # open_clip normalises with an epsilon: a zero embedding gets logits 0, uniform
        # probabilities (MAPIE probes a fitted estimator with np.zeros); the posterior's
        # predictive is undefined there, so those rows skip it
        zero = (z == 0).all(1)
        probs = torch.full((len(X), len(self.classes_)), 1.0 / len(self.classes_),
                           dtype=torch.float64)  # fmt: skip
        if not zero.all():
            prediction = self.classifier.predict(
                acts[~zero], None if residual is None else residual[~zero],
                pred_type=self.pred_type, link_approx=self.link_approx, n_samples=self.n_samples,
            )  # fmt: skip
            probs[~zero.cpu()] = prediction.probs.detach().cpu().double()
        return probs.numpy()

    def predict(self, X) -> np.ndarray:
        """The most probable class of every input.

        Parameters
        ----------
        X : array-like
            `(N, n_features_in_)` as in :meth:`fit`.

        Returns
        -------
        numpy.ndarray
            `(N,)` entries of ``classes_``.
        """
        return self.classes_[self.predict_proba(X).argmax(1)]

    def _check_params(self) -> None:
        from laplace_vlm.tasks.zeroshot import ZeroShotClassifier

        if not isinstance(self.classifier, ZeroShotClassifier):
            raise TypeError(
                f"classifier must be a ZeroShotClassifier, got {type(self.classifier).__name__}."
            )
        parse_option(PredType, self.pred_type, "pred_type")
        parse_option(LinkApprox, self.link_approx, "link_approx")

    def _check_width(self, width: int) -> None:
        heads = self.classifier.la.heads
        D, d_img = heads.image_projection.out_features, heads.in_features("image")
        expected = d_img + D if self.with_residual else d_img
        if width != expected:
            what = f"d_img + D = {d_img} + {D}" if self.with_residual else f"d_img = {d_img}"
            raise ValueError(f"X must have {expected} columns ({what}), got {width}.")

    def __sklearn_tags__(self):
        """scikit-learn's tags: a classifier whose ``fit`` needs no labels.

        Returns
        -------
        sklearn.utils.Tags
            the base tags with ``target_tags.required = False``.
        """
        tags = super().__sklearn_tags__()
        tags.target_tags.required = False
        return tags
