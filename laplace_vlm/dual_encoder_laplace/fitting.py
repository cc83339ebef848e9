"""Fitting the KFAC curvature of both heads: class batches, checkpoints, distributed sums."""

from __future__ import annotations

from typing import Any

import torch
import tqdm
from torch.nn import functional as F

from laplace_vlm.curvature import get_curvature_backend
from laplace_vlm.curvature.distributed import all_reduce_sums, failures_shared_across_ranks
from laplace_vlm.curvature.factor_sums import FactorSums
from laplace_vlm.curvature.likelihoods import pair_loss
from laplace_vlm.io.fit_checkpoint import FitCheckpoint, checkpoint_key
from laplace_vlm.io.posterior_file import heads_fingerprint
from laplace_vlm.validation import check_bool, check_finite, check_int, check_nonzero_norm


class FitMixin:
    """``fit`` of :class:`~laplace_vlm.DualEncoderLaplace`: sums per class batch, one pass."""

    def fit(
        self,
        train_loader: Any,
        override: bool = True,
        progress_bar: bool = False,
        checkpoint: str | None = None,
        checkpoint_every: int = 100,
    ) -> None:
        """Estimate the KFAC curvature of both heads from matched image-text pairs.

        Parameters
        ----------
        train_loader : iterable
            batches of matched pairs, ``(image, text)`` or ``{"image": ..., "text": ...}``
            (optionally ``"image_residual"``/``"text_residual"``). Each batch is a class
            batch: its texts are the classes of its images and vice versa. Feature mode:
            activations `(M, d)`; model mode: images and tokens. The number of pairs ``N``
            is counted, so loaders without a length (webdataset) work.
        override : bool, default=True
            ``False`` adds the new pairs to the current factors, as if fitted on the union.
        progress_bar : bool, default=False
            show a tqdm bar over the batches.
        checkpoint : str, optional
            file for partial sums, written atomically every ``checkpoint_every`` batches; a
            later call with the same file and a deterministic loader resumes where it stopped.
            The file is deleted once the fit completes.
        checkpoint_every : int, default=100
            batches between checkpoint writes.

        Raises
        ------
        TypeError
            for a non-bool switch or a non-integer ``checkpoint_every``.
        ValueError
            if the loader yields no pairs or non-finite curvature, ``checkpoint_every < 1``,
            or a checkpoint belongs to another fit or loader.

        Notes
        -----
        Inside an initialised ``torch.distributed`` process group every rank fits its own
        shard and the sums are all-reduced once: all ranks end with the factors of the union.
        """
        check_bool("override", override)
        check_bool("progress_bar", progress_bar)
        check_int("checkpoint_every", checkpoint_every)
        previous = None
        if not override and self.H_facs is not None:
            previous = self.factor_sums()
        sums = FactorSums.zeros(self._dims, self.heads.image_projection.weight)
        ckpt, done = None, 0
        if checkpoint is not None:
            key = checkpoint_key(heads_fingerprint(self.heads), self.contrastive, self.curvature)
            ckpt = FitCheckpoint(checkpoint, checkpoint_every, key)
            saved, done = ckpt.resume(sums.tensors())
            sums = FactorSums(**saved)
        self.model.eval()
        pbar = tqdm.tqdm(train_loader, disable=not progress_bar, desc="[KFAC]")
        seen = 0
        with failures_shared_across_ranks():
            for seen, batch in enumerate(pbar, start=1):
                if seen <= done:  # counted before the interruption
                    continue
                sums += self._batch_sums(batch)
                if ckpt is not None:
                    ckpt.maybe_save(sums.tensors(), seen)
            if seen < done:
                raise ValueError(
                    f"checkpoint {checkpoint} counted {done} batches but train_loader yielded "
                    f"{seen}: it belongs to another loader (delete it to start afresh)."
                )
        all_reduce_sums(sums)
        if previous is not None:
            previous += sums
            sums = previous
        self.set_factor_sums(sums)
        if ckpt is not None:  # the sums are in the posterior now: a stale file must not be reused
            ckpt.finish()

    def _batch_sums(self, batch: Any) -> FactorSums:
        heads, fn = self.heads, get_curvature_backend(self.curvature)
        with torch.no_grad():  # the backends build whatever graph they need themselves
            a_i, r_i, a_t, r_t = self.inputs.pair(batch)
            z = check_nonzero_norm("image embeddings", heads.embed_image(a_i, r_i))
            t = check_nonzero_norm("text embeddings", heads.embed_text(a_t, r_t))
            n = torch.tensor(len(a_i), dtype=torch.int64, device=a_i.device)
            if hasattr(fn, "pair_factors"):  # both heads and the loss from the same logits
                return FactorSums(*fn.pair_factors(z, a_i, t, a_t, heads.scale, heads.logit_bias,
                                                   self.contrastive, self.chunk_size), n)  # fmt: skip
            u, v = F.normalize(z, dim=-1), F.normalize(t, dim=-1)
        labels = torch.arange(len(a_i), device=a_i.device)

        def factors(head, acts, residual, targets):  # one head, the other tower at its MAP
            bias = None if head.bias is None else head.bias.detach()
            return fn(head.weight.detach(), bias, acts, residual, targets, heads.scale.detach(),
                      heads.logit_bias, self.contrastive, labels=labels,
                      chunk_size=self.chunk_size)  # fmt: skip

        B_i, A_i = factors(heads.image_projection, a_i, r_i, v)
        B_t, A_t = factors(heads.text_projection, a_t, r_t, u)
        loss = pair_loss(u, v, labels, heads.logits, self.contrastive, self.chunk_size)
        return FactorSums(B_i, A_i, B_t, A_t, loss, n)

    def factor_sums(self) -> FactorSums:
        """The fitted sums behind ``H_facs`` (additive: add pairs, then :meth:`set_factor_sums`).

        Returns
        -------
        FactorSums
            ``sum B``, ``sum a a^T`` per head, the summed loss and the pair count.
        """
        if self.H_facs is None:
            raise ValueError("the posterior is not fitted: call fit() first.")
        return FactorSums.from_kron(self.H_facs, self.n_data, self.loss)

    def set_factor_sums(self, sums: FactorSums) -> None:
        """Make ``sums`` the curvature of the posterior (laplace's ``Kron`` scaling).

        Parameters
        ----------
        sums : FactorSums
            e.g. :meth:`factor_sums` with labelled examples added (active learning), or
            the released BayesVLM factors; checked for a positive count and finite values.
        """
        if int(sums.n) == 0:
            raise ValueError("train_loader yielded no pairs: cannot fit the curvature.")
        for name, value in sums.tensors().items():
            check_finite(f"curvature factor {name}", value)
        self.H_facs = sums.to_kron(*self._has_bias)
        self.loss = sums.loss.detach()
        self.n_data = int(sums.n)
        self.refresh_mean()
        self.H = self.H_facs.decompose(damping=self.damping)
