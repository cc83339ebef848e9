"""The predictive over chunks of images: peak memory independent of the number of images.

Every iterator takes the validated head inputs ``(a_img, r_img, a_txt, r_txt)`` of
``DualEncoderLaplace.inputs.predict``, computes what depends only on the classes once, and
yields one result per chunk of ``step`` images.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from laplace_vlm.predictive.moments import chunk_moments, class_operands, glm_covariance
from laplace_vlm.validation import check_nonzero_norm


def moment_chunks(la, inputs, method: str, step: int, out=None):
    """Logit mean and variance `(n, C)` per chunk of images, class terms computed once.

    ``inputs`` come from ``la.inputs.predict``; with ``out`` (two `(N, C)` tensors)
    each chunk is written into its slice.
    """
    a_i, r_i, a_t, r_t = inputs
    post_i, post_t = la.head_posteriors()
    heads, s = la.heads, la.heads.scale
    with torch.no_grad():
        t = check_nonzero_norm("text embeddings", heads.embed_text(a_t, r_t))
        ops = class_operands(method, post_i, post_t, a_t, t, s)
        for start in range(0, len(a_i), step):
            rows = slice(start, start + step)
            r = None if r_i is None else r_i[rows]
            z = check_nonzero_norm("image embeddings", heads.embed_image(a_i[rows], r))
            if out is None:
                mean, var = t.new_empty(len(z), len(t)), t.new_empty(len(z), len(t))
            else:
                mean, var = out[0][rows], out[1][rows]
            chunk_moments(method, z, a_i[rows], post_i, ops, mean, var, s)
            if heads.logit_bias is not None:
                mean += heads.logit_bias
            yield mean, var


@torch.no_grad()
def glm_covariance_chunks(la, inputs, step: int):
    """Linearised logit mean `(N, C)` and covariance over classes `(N, C, C)`."""
    a_i, r_i, a_t, r_t = inputs
    post_i, post_t = la.head_posteriors()
    heads, s = la.heads, la.heads.scale
    t = check_nonzero_norm("text embeddings", heads.embed_text(a_t, r_t))
    cross_t = post_t.cross_terms(a_t)  # the classes share the text head
    means, covs = [], []
    for start in range(0, len(a_i), step):
        a = a_i[start : start + step]
        z = heads.embed_image(a, None if r_i is None else r_i[start : start + step])
        z = check_nonzero_norm("image embeddings", z)
        means.append(heads.logits(z, t))
        covs.append(s.square() * glm_covariance(z, post_i.terms(a), t, cross_t))
    return torch.cat(means), torch.cat(covs)


def logit_sample_chunks(la, inputs, pred_type: str, n_samples: int, generator, step: int):
    """Logit samples `(S, n, C)` per chunk of images; one weight draw serves all chunks."""
    a_i, r_i, a_t, r_t = inputs
    post_i, post_t = la.head_posteriors()
    heads, s = la.heads, la.heads.scale
    with torch.no_grad():
        t = heads.embed_text(a_t, r_t)
        dt = post_t.sample_perturbations(a_t, n_samples, generator)  # (S, C, D)
        dW, db = post_i.sample_weights(n_samples, generator)
        v, nt = F.normalize(t, dim=-1), t.norm(dim=-1)
        d_txt_v = (dt * v).sum(-1)[:, None]  # (S, 1, C)
        for start in range(0, len(a_i), step):
            a = a_i[start : start + step]
            z = heads.embed_image(a, None if r_i is None else r_i[start : start + step])
            dz = post_i.perturbations(a, dW, db)  # (S, n, D)
            if pred_type == "nn":
                yield torch.stack([heads.logits(z + dz_s, t + dt_s) for dz_s, dt_s in zip(dz, dt)])
                continue
            u, nz = F.normalize(z, dim=-1), z.norm(dim=-1)[:, None]
            cos = u @ v.T
            d_img = (dz @ v.T - cos * (dz * u).sum(-1, keepdim=True)) / nz
            d_txt = (u @ dt.transpose(1, 2) - cos * d_txt_v) / nt
            yield heads.logits(z, t) + s * (d_img + d_txt)
