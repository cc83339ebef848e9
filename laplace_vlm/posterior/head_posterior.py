"""Gaussian posterior of one projection head in its Kronecker eigenbasis.

For a weight block with factor eigenpairs ``(Q1, l1)`` (output side, `D`) and ``(Q2, l2)``
(input side, `d`), laplace's ``KronDecomposed`` gives the posterior covariance
``(Q1 x Q2) diag(inv) (Q1 x Q2)^T`` with ``inv = 1 / (l1 l2^T + delta)`` (or the damped
form). The embedding ``z = W a + b (+ r)`` then has covariance

    Cov[z] = Q1 diag(c) Q1^T + Qb diag(1 / (lb + delta_b)) Qb^T,   c_i = sum_j (Q2^T a)_j^2 inv_ij

so every predictive quantity is a sum of terms ``Q diag(c_n) Q^T``: this module keeps them
as such and never forms a per-input `(D, D)` covariance unless asked to.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from laplace.utils.matrix import KronDecomposed

from laplace_vlm.docstrings import fill_doc

CovTerm = tuple[torch.Tensor, torch.Tensor]  # (basis Q (D, D), coefficients c (N, D))


_fill_doc = fill_doc.extend(
    activations_parameters="""
        Parameters
        ----------
        activations : torch.Tensor
            `(N, d)` inputs of the head (its design inputs, :meth:`DualHead.design`).
        """,
)


@dataclass
class HeadPosterior:
    """Posterior covariance of one head ``(W, [b])`` in the eigenbasis of its factors.

    Attributes
    ----------
    out_basis : torch.Tensor
        `(D, D)` eigenvectors of the output factor.
    in_basis : torch.Tensor
        `(d, d)` eigenvectors of the input factor.
    inv_eig : torch.Tensor
        `(D, d)` posterior variances of ``W`` in the eigenbasis.
    bias_basis, bias_inv_eig : torch.Tensor, optional
        `(D, D)` and `(D,)`, the same for the bias block.
    """

    out_basis: torch.Tensor
    in_basis: torch.Tensor
    inv_eig: torch.Tensor
    bias_basis: torch.Tensor | None = None
    bias_inv_eig: torch.Tensor | None = None

    @classmethod
    def from_kron(cls, P: KronDecomposed, weight_idx: int, has_bias: bool) -> HeadPosterior:
        """Read block ``weight_idx`` (and the next one, the bias) of a posterior precision.

        Parameters
        ----------
        P : laplace.utils.matrix.KronDecomposed
            the posterior precision; its ``damping`` flag selects the damped form
            ``(l1 + sqrt(delta)) (l2 + sqrt(delta))`` over ``l1 l2 + delta``.
        weight_idx : int
            the index of the head's weight block.
        has_bias : bool
            whether block ``weight_idx + 1`` is the head's bias.

        Returns
        -------
        HeadPosterior
            the block's posterior covariance, with the bias block where ``has_bias``.
        """
        (Q1, Q2), (l1, l2) = P.eigenvectors[weight_idx], P.eigenvalues[weight_idx]
        delta = P.deltas[weight_idx]
        if P.damping:
            prec = torch.outer(l1 + delta.sqrt(), l2 + delta.sqrt())
        else:
            prec = torch.outer(l1, l2) + delta
        post = cls(Q1, Q2, 1.0 / prec)
        if has_bias:
            (Qb,), (lb,) = P.eigenvectors[weight_idx + 1], P.eigenvalues[weight_idx + 1]
            post.bias_basis, post.bias_inv_eig = Qb, 1.0 / (lb + P.deltas[weight_idx + 1])
        return post

    @_fill_doc
    def terms(self, activations: torch.Tensor) -> list[CovTerm]:
        """Covariance terms of the embeddings: ``Cov[z_n] = sum Q diag(c_n) Q^T``.

        %(activations_parameters)s

        Returns
        -------
        terms : list of tuple of torch.Tensor
            ``[(Q (D, D), c (N, D)), ...]``: the weight term, then the bias term if any.
        """
        rotated = activations @ self.in_basis  # (N, d)
        terms = [(self.out_basis, rotated.square() @ self.inv_eig.T)]
        if self.bias_basis is not None:
            terms.append((self.bias_basis, self.bias_inv_eig.expand(len(activations), -1)))
        return terms

    @_fill_doc
    def variance(self, activations: torch.Tensor) -> torch.Tensor:
        """Diagonal of ``Cov[z]`` per input, exact.

        One GEMM ``(a Q2)^2 (Q1^2 inv)^T`` (plus the bias term): no `(N, D, D)` tensor is formed.

        %(activations_parameters)s

        Returns
        -------
        var : torch.Tensor
            `(N, D)` variances of the embeddings, ``>= 0``.
        """
        rotated = activations @ self.in_basis
        var = rotated.square() @ (self.inv_eig.T @ self.out_basis.square().T)
        if self.bias_basis is not None:
            var = var + self.bias_basis.square() @ self.bias_inv_eig
        return var

    @_fill_doc
    def covariance(self, activations: torch.Tensor) -> torch.Tensor:
        """Full ``Cov[z]`` per input (small problems only).

        %(activations_parameters)s

        Returns
        -------
        cov : torch.Tensor
            `(N, D, D)` covariances of the embeddings, symmetric positive semi-definite.
        """
        return sum(torch.einsum("di,ni,ei->nde", Q, c, Q) for Q, c in self.terms(activations))

    @_fill_doc
    def cross_terms(self, activations: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Cross-covariance terms ``Cov[z_k, z_l] = sum Q diag(c_kl) Q^T``, c: `(N, N, D)`.

        Inputs share the head's weights, so their embeddings are correlated; needed for the
        joint covariance over classes (text head) and for joint samples.

        %(activations_parameters)s

        Returns
        -------
        cross_terms : list of tuple of torch.Tensor
            ``[(Q (D, D), c (N, N, D)), ...]``: the weight term, then the bias term if any.
        """
        rotated = activations @ self.in_basis  # (N, d)
        c = torch.einsum("kj,lj,ij->kli", rotated, rotated, self.inv_eig)
        terms = [(self.out_basis, c)]
        if self.bias_basis is not None:
            n = len(activations)
            terms.append((self.bias_basis, self.bias_inv_eig.expand(n, n, -1)))
        return terms

    def sample_weights(
        self, n_samples: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Posterior samples of ``W - E[W]`` `(S, D, d)` and ``b - E[b]`` `(S, D)`.

        ``dW = Q1 (eps * sqrt(inv)) Q2^T`` samples the weight posterior exactly; sampling
        in weight space keeps the rank-deficient logit covariance out of any Cholesky.

        Parameters
        ----------
        n_samples : int
            S.
        generator : torch.Generator, optional
            randomness of the draws (torch's default generator if None).

        Returns
        -------
        dW : torch.Tensor
            `(S, D, d)`.
        db : torch.Tensor or None
            `(S, D)`; None without a bias block.
        """
        D, d = self.inv_eig.shape
        like = dict(device=self.inv_eig.device, dtype=self.inv_eig.dtype)
        eps = torch.randn(n_samples, D, d, generator=generator, **like)
        dW = self.out_basis @ (eps * self.inv_eig.sqrt()) @ self.in_basis.T
        db = None
        if self.bias_basis is not None:
            eps_b = torch.randn(n_samples, D, generator=generator, **like)
            db = (eps_b * self.bias_inv_eig.sqrt()) @ self.bias_basis.T
        return dW, db

    @staticmethod
    @_fill_doc
    def perturbations(
        activations: torch.Tensor, dW: torch.Tensor, db: torch.Tensor | None
    ) -> torch.Tensor:
        """``z - E[z]`` of the inputs under weight samples ``(dW, db)``.

        %(activations_parameters)s
        dW : torch.Tensor
            `(S, D, d)` weight samples (:meth:`sample_weights`).
        db : torch.Tensor or None
            `(S, D)` bias samples.

        Returns
        -------
        torch.Tensor
            `(S, N, D)`.
        """
        dz = activations @ dW.transpose(1, 2)
        return dz if db is None else dz + db[:, None]

    @_fill_doc
    def sample_perturbations(
        self,
        activations: torch.Tensor,
        n_samples: int,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Joint samples of ``z - E[z]`` for all inputs (one weight draw per sample).

        %(activations_parameters)s
        n_samples : int
            S.
        generator : torch.Generator, optional
            randomness of the draws.

        Returns
        -------
        torch.Tensor
            `(S, N, D)`.
        """
        return self.perturbations(activations, *self.sample_weights(n_samples, generator))
