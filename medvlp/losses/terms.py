"""Auxiliary terms: noise weights, alignment, uniformity, the local token-phrase loss, the sentence loss, the
report-twin loss and the phrase-box loss."""

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


def sentence_alignment_loss(
    image_features: Tensor,
    sentence_features: Tensor,
    logit_scale: Tensor | float,
    positives: Tensor,
    hard_features: Tensor | None = None,
    hard_mask: Tensor | None = None,
) -> Tensor:
    """Image-sentence InfoNCE with multi-positive targets and optional hard-negative texts.

    Each image has one sentence sampled from its own report; a sentence is a positive for every image whose report
    contains it (``positives``), so "No pneumothorax." drawn from one normal report is not pushed away from the other
    normal images. In the image direction, each row may also see one extra text that must lose: a rule-made twin of
    its own sentence (negated, or left and right swapped; :mod:`medvlp.data.perturb`). Twins enter only their own
    image's row, as negatives.

    Args:
        image_features: [B, D] L2-normalized.
        sentence_features: [B, D] L2-normalized, row i sampled from image i's report.
        logit_scale: scalar multiplier (already exponentiated).
        positives: [B, B] bool, image i's report contains sentence j (the diagonal is true).
        hard_features: [B, D] L2-normalized twin of sentence i (any row where ``hard_mask`` is false is ignored).
        hard_mask: [B] bool, row i has a twin that is false for image i.

    Returns:
        The mean of the image->sentence and sentence->image cross-entropies.
    """
    if positives.shape != (image_features.shape[0], sentence_features.shape[0]):
        raise ValueError(f"positives must be [B, B], got {tuple(positives.shape)}")
    pos = positives.to(image_features.dtype)
    logits = logit_scale * image_features @ sentence_features.T  # [B, B]
    rows = logits
    if hard_features is not None:
        if hard_mask is None:
            raise ValueError("hard_features needs hard_mask")
        twin = logit_scale * (image_features * hard_features).sum(-1)  # [B]
        twin = twin.masked_fill(~hard_mask.bool(), float("-inf"))
        rows = torch.cat([logits, twin[:, None]], dim=1)  # [B, B + 1]
        pos = torch.cat([pos, torch.zeros_like(pos[:, :1])], dim=1)
    image_ce = -(pos / pos.sum(1, keepdim=True) * rows.log_softmax(1).clamp_min(-1e4)).sum(1).mean()
    cols = positives.T.to(image_features.dtype)  # sentence j's positives are the images whose report has it
    text_ce = -(cols / cols.sum(1, keepdim=True) * logits.T.log_softmax(1)).sum(1).mean()
    return (image_ce + text_ce) / 2


def twin_loss(
    image_features: Tensor,
    text_features: Tensor,
    twin_features: Tensor,
    logit_scale: Tensor | float,
    twin_mask: Tensor | None = None,
) -> Tensor:
    """Each image against its own report and that report's rule-made twin: the report must win.

    The twin is the report with one sentence flipped (negated, sides swapped, or a denial made affirmative;
    :mod:`medvlp.data.perturb`), so the only thing that separates the two texts is the clinically decisive word. The
    term is the two-way cross-entropy ``softplus(scale * (cos(img, twin) - cos(img, report)))``, the description
    perturbation of text-side hard negatives, kept apart from the batch softmax so it is the same for CLIP and SigLIP
    and needs no gathering across ranks.

    Args:
        image_features: [b, D] L2-normalized.
        text_features: [b, D] L2-normalized, the images' own reports.
        twin_features: [b, D] L2-normalized, row i the twin of report i.
        logit_scale: scalar multiplier (already exponentiated).
        twin_mask: [b] bool, row i has a twin (rows without one do not count), or [b] float weights of the rows (0:
            not counted); None: all rows.

    Returns:
        The (weighted) mean over rows with a twin; 0 (still attached to the graph) when no row has one.
    """
    if text_features.shape != image_features.shape or twin_features.shape != image_features.shape:
        raise ValueError(
            f"image, report and twin features must have one shape, got {tuple(image_features.shape)}, "
            f"{tuple(text_features.shape)}, {tuple(twin_features.shape)}"
        )
    margin = logit_scale * ((image_features * twin_features).sum(-1) - (image_features * text_features).sum(-1))
    per = F.softplus(margin)  # [b]
    if twin_mask is None:
        return per.mean()
    keep = twin_mask.to(device=per.device, dtype=per.dtype)
    total = keep.sum()
    return (per * keep).sum() / torch.where(total > 0, total, torch.ones_like(total))


def box_cells(box_masks: Tensor, grid: tuple[int, ...]) -> Tensor:
    """``[K, N]`` bool: the tokens of a ``grid`` whose cell holds a voxel of each mask ``[K, *size]``.

    The image is split into ``grid`` cells as adaptive max pooling splits it, and the tokens are flattened in the
    order of :func:`medvlp.tasks.grounding.similarity_map` (C order over ``grid``).
    """
    pool = {2: F.adaptive_max_pool2d, 3: F.adaptive_max_pool3d}[len(grid)]
    return pool(box_masks[:, None].float(), tuple(grid))[:, 0].flatten(1) > 0


def box_grounding_loss(
    image_tokens: Tensor,
    phrase_features: Tensor,
    box_masks: Tensor,
    grid: tuple[int, ...],
    logit_scale: Tensor | float,
) -> Tensor:
    """An annotated phrase must point into its boxes: a softmax over its image's tokens, the mass inside the boxes.

    For phrase k and its image's tokens, ``-log sum_{n in box} softmax_n(scale * cos(token_n, phrase_k))``, the
    phrase-grounding supervision of box-annotated cohorts (MS-CXR style boxes): it says where on the image a phrase
    is, not whether it is there (the global loss says that).

    Args:
        image_tokens: [K, N, D] L2-normalized tokens of each phrase's image.
        phrase_features: [K, D] L2-normalized phrase embeddings.
        box_masks: [K, *size] bool, the union of the phrase's boxes on the image grid (after augmentation).
        grid: the token grid, ``prod(grid) == N``.
        logit_scale: scalar multiplier (already exponentiated).

    Returns:
        The mean over phrases whose boxes cover at least one token; 0 (still attached to the graph) when none does.
    """
    if image_tokens.shape[0] != phrase_features.shape[0] or image_tokens.shape[0] != box_masks.shape[0]:
        raise ValueError(
            f"tokens {tuple(image_tokens.shape)}, phrases {tuple(phrase_features.shape)} and masks "
            f"{tuple(box_masks.shape)} must have one row per phrase"
        )
    cells = box_cells(box_masks, grid).to(image_tokens.device)  # [K, N]
    logits = logit_scale * torch.einsum("knd,kd->kn", image_tokens, phrase_features)  # [K, N]
    inside = logits.masked_fill(~cells, float("-inf")).logsumexp(1)  # [K]
    keep = cells.any(1)
    per = torch.where(keep, logits.logsumexp(1) - inside, torch.zeros_like(inside))
    return per.sum() / keep.sum().clamp_min(1)
