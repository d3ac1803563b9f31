"""Auxiliary terms: noise weights, alignment, uniformity and the local token-phrase loss."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from medvlp.losses.kernels import _spans


# ------------------------------------------------------------------------------------ auxiliary terms
def noise_weights(per_sample_loss: Tensor, tau: float = 0.5) -> Tensor:
    """Noise-adaptive pair weights (NEVLP-style), stop-gradient, mean 1.

    `w_i = sigmoid((median(l) - l_i) / tau)` normalized to mean 1: pairs whose loss is far above the batch median
    (likely mismatched) get weights near 0, a batch of equally easy pairs gets weights ~1.

    Args:
        per_sample_loss: [B] per-pair losses.
        tau: loss scale of the transition (in loss units).
    """
    loss = per_sample_loss.detach()
    w = torch.sigmoid((loss.median() - loss) / tau)
    return w / w.mean().clamp_min(torch.finfo(w.dtype).tiny)


def alignment_loss(image_features: Tensor, text_features: Tensor) -> Tensor:
    """Wang & Isola alignment: mean over pairs of ||x_i - y_i||^2 (features [B, D])."""
    return (image_features - text_features).pow(2).sum(-1).mean()


def uniformity_loss(features: Tensor, t: float = 2.0) -> Tensor:
    """Wang & Isola uniformity: log of the mean over pairs i < j of exp(-t ||z_i - z_j||^2), features [M, D]."""
    if features.shape[0] < 2:
        raise ValueError("uniformity needs at least 2 embeddings")
    sq = features.pow(2).sum(-1)  # [M]
    d2 = (sq[:, None] + sq[None, :] - 2 * features @ features.T).clamp_min(0)  # [M, M]
    iu = torch.triu_indices(features.shape[0], features.shape[0], offset=1, device=features.device)
    return torch.logsumexp(-t * d2[iu[0], iu[1]], dim=0) - math.log(iu.shape[1])


def local_similarity(
    image_tokens: Tensor,
    text_tokens: Tensor,
    text_mask: Tensor | None = None,
    *,
    attention_scale: float = 4.0,
    word_scale: float = 5.0,
    chunk_size: int = 16,
) -> Tensor:
    """GLoRIA-style word-to-patch similarity of every (image, report) pair.

    Each word attends over the image's patches (`softmax(attention_scale * cos(word, patch))`), giving a
    word-specific image context; the pair score is `logsumexp_t(word_scale * cos(word_t, context_t))` over the
    report's unmasked words.

    Args:
        image_tokens: [Bi, P, D] patch embeddings.
        text_tokens: [Bt, T, D] word embeddings.
        text_mask: [Bt, T], nonzero for real words (each report needs at least one); None = all real.
        attention_scale: inverse temperature of the word-to-patch attention.
        word_scale: inverse temperature of the log-sum-exp over words.
        chunk_size: images per block (memory Bt x chunk_size x T x P).

    Returns:
        [Bi, Bt] local similarities.
    """
    v = F.normalize(image_tokens, dim=-1)  # [Bi, P, D]
    w = F.normalize(text_tokens, dim=-1)  # [Bt, T, D]
    mask = torch.ones(w.shape[:2], dtype=torch.bool, device=w.device) if text_mask is None else text_mask.bool()
    cols = []
    for s, e in _spans(v.shape[0], chunk_size):
        att = (attention_scale * torch.einsum("btd,cpd->bctp", w, v[s:e])).softmax(-1)  # [Bt, c, T, P]
        ctx = torch.einsum("bctp,cpd->bctd", att, v[s:e])  # [Bt, c, T, D]
        r = F.cosine_similarity(ctx, w[:, None], dim=-1) * word_scale  # [Bt, c, T]
        cols.append(torch.logsumexp(r.masked_fill(~mask[:, None], float("-inf")), dim=-1))  # [Bt, c]
    return torch.cat(cols, dim=1).T  # [Bi, Bt]


def local_alignment_loss(
    image_tokens: Tensor,
    text_tokens: Tensor,
    text_mask: Tensor | None = None,
    *,
    attention_scale: float = 4.0,
    word_scale: float = 5.0,
    logit_scale: float = 10.0,
) -> Tensor:
    """Symmetric CLIP-style cross-entropy over the [B, B] `local_similarity` matrix times `logit_scale`."""
    logits = logit_scale * local_similarity(
        image_tokens, text_tokens, text_mask, attention_scale=attention_scale, word_scale=word_scale
    )  # [B, B]
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
