"""Running sums of a KFAC fit, and their conversion to laplace's ``Kron`` scaling.

A fit is a sum over class batches, so partial sums can be added across batches, processes
(all-reduce) and interrupted runs (checkpoints) with the same result as one pass.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from laplace.utils.matrix import Kron


@dataclass
class FactorSums:
    """``sum B`` `(D, D)` and ``sum a a^T`` `(d, d)` per head, summed loss and pair count.

    ``+=`` adds another instance in place.

    Attributes
    ----------
    B_image, A_image : torch.Tensor
        `(D_img, D_img)` summed output-side GGN and `(d_img, d_img)` summed input outer
        products of the image head.
    B_text, A_text : torch.Tensor
        the same for the text head, `(D_txt, D_txt)` and `(d_txt, d_txt)`.
    loss : torch.Tensor
        scalar, the summed negative log-likelihood.
    n : torch.Tensor
        int64 scalar, the number of pairs (a tensor so that it all-reduces with the rest).
    """

    B_image: torch.Tensor
    A_image: torch.Tensor
    B_text: torch.Tensor
    A_text: torch.Tensor
    loss: torch.Tensor
    n: torch.Tensor  # int64 scalar: a tensor so that it all-reduces with the rest

    @classmethod
    def zeros(cls, dims: tuple[int, int, int, int], like: torch.Tensor) -> FactorSums:
        """Empty sums for heads of shape ``(D_img, d_img, D_txt, d_txt)``.

        Parameters
        ----------
        dims : tuple of int
            ``(D_img, d_img, D_txt, d_txt)``.
        like : torch.Tensor
            gives the dtype and device (``n`` is int64 on that device).

        Returns
        -------
        FactorSums
            all zeros.
        """
        D_i, d_i, D_t, d_t = dims
        z = lambda *s: torch.zeros(*s, dtype=like.dtype, device=like.device)  # noqa: E731
        n = torch.zeros((), dtype=torch.int64, device=like.device)
        return cls(z(D_i, D_i), z(d_i, d_i), z(D_t, D_t), z(d_t, d_t), z(()), n)

    def __iadd__(self, other: FactorSums) -> FactorSums:
        for f in fields(self):
            getattr(self, f.name).add_(getattr(other, f.name))
        return self

    def tensors(self) -> dict[str, torch.Tensor]:
        """The sums by name (for checkpoints and all-reduce).

        Returns
        -------
        dict of str to torch.Tensor
            the fields, not copies: changing a value changes these sums.
        """
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def to_kron(self, image_bias: bool, text_bias: bool) -> Kron:
        """laplace's scaling: ``[sum B, sum a a^T / N]`` per weight, ``[sum B]`` per bias.

        Parameters
        ----------
        image_bias, text_bias : bool
            whether the image / text head has a separate bias block.

        Returns
        -------
        laplace.utils.matrix.Kron
            the blocks in the order image weight, [image bias], text weight, [text bias].
        """
        n = int(self.n)
        kfacs = [[self.B_image.clone(), self.A_image / n]]
        if image_bias:
            kfacs.append([self.B_image.clone()])
        kfacs.append([self.B_text.clone(), self.A_text / n])
        if text_bias:
            kfacs.append([self.B_text.clone()])
        return Kron(kfacs)

    @classmethod
    def from_kron(cls, kron: Kron, n: int, loss: float | torch.Tensor) -> FactorSums:
        """Invert :meth:`to_kron` (bias blocks repeat ``B`` and are skipped).

        Parameters
        ----------
        kron : laplace.utils.matrix.Kron
            factors in the layout of :meth:`to_kron`.
        n : int
            the pair count ``N`` they were scaled with.
        loss : float or torch.Tensor
            the summed loss.

        Returns
        -------
        FactorSums
            in the dtype and on the device of the factors.
        """
        weights = [F for F in kron.kfacs if len(F) == 2]
        (B_i, A_i), (B_t, A_t) = weights
        like = B_i
        return cls(
            B_i.clone(),
            A_i * n,
            B_t.clone(),
            A_t * n,
            torch.as_tensor(loss, dtype=like.dtype, device=like.device).clone(),
            torch.tensor(n, dtype=torch.int64, device=like.device),
        )

    @classmethod
    def from_bayesvlm(
        cls, factors: dict[str, torch.Tensor], n: int, like: torch.Tensor
    ) -> FactorSums:
        """The sums behind the reference's released factors ``A = sum a a^T / sqrt(N)``,
        ``B = sum H / sqrt(N)``; no loss.

        Parameters
        ----------
        factors : dict of str to torch.Tensor
            the released factors under the keys ``A_img``, ``B_img``, ``A_txt``, ``B_txt``
            (:func:`laplace_vlm.io.bayesvlm.read_bayesvlm_factors`).
        n : int
            the pair count ``N`` behind them.
        like : torch.Tensor
            gives the dtype and device.

        Returns
        -------
        FactorSums
            the factors times ``sqrt(N)``, a zero loss and ``n``.
        """
        root = float(n) ** 0.5
        unscaled = {k: (v * root).to(like) for k, v in factors.items()}
        return cls(
            unscaled["B_img"],
            unscaled["A_img"],
            unscaled["B_txt"],
            unscaled["A_txt"],
            torch.zeros((), dtype=like.dtype, device=like.device),
            torch.tensor(n, dtype=torch.int64, device=like.device),
        )
