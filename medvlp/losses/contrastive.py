"""CLIP and SigLIP losses, exact across ranks, and the duplicate-aware targets."""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from medvlp import distributed as mdist
from medvlp.losses.kernels import (
    _as_scalar,
    _check_chunk,
    _check_targets,
    _ChunkedLSE,
    _ChunkedSigLIP,
    _spans,
    _target_rows,
)


# ------------------------------------------------------------------------------------------------- CLIP
def clip_logits(image_features: Tensor, text_features: Tensor, logit_scale: Tensor | float) -> tuple[Tensor, Tensor]:
    """Local CLIP logits (no gathering).

    Args:
        image_features: [B, D].
        text_features: [B, D].
        logit_scale: scalar multiplier (already exponentiated).

    Returns:
        (logits_per_image [B, B], logits_per_text [B, B]).
    """
    logits_per_image = logit_scale * image_features @ text_features.T  # [B, B]
    logits_per_text = logit_scale * text_features @ image_features.T  # [B, B]
    return logits_per_image, logits_per_text


def _ce_from_logits(logits: Tensor, targets: Tensor | None, start: int, transpose: bool) -> Tensor:
    """Per-row cross-entropy [n] of `logits` [n, m] whose row i is global row `start + i`."""
    if targets is None:
        idx = torch.arange(logits.shape[0], device=logits.device) + start
        return F.cross_entropy(logits, idx, reduction="none")
    t = _target_rows(
        targets, start, start + logits.shape[0], device=logits.device, dtype=logits.dtype, transpose=transpose
    )  # [n, m]
    return F.cross_entropy(logits, t / t.sum(1, keepdim=True), reduction="none")


def _positive_mean(b: Tensor, targets: Tensor | None, start: int, n: int, chunk: int, transpose: bool) -> Tensor:
    """For global rows start..start+n: the target-weighted mean of the rows of `b` [m, D] -> [n, D]."""
    if targets is None:
        return b[start : start + n]
    out = []
    for s, e in _spans(n, chunk):
        t = _target_rows(targets, start + s, start + e, device=b.device, dtype=b.dtype, transpose=transpose)
        out.append((t / t.sum(1, keepdim=True)) @ b)  # [c, D]
    return torch.cat(out)


def _ce_rows(
    a: Tensor, b: Tensor, scale: Tensor, targets: Tensor | None, start: int, chunk: int | None, transpose: bool
) -> Tensor:
    """Per-row cross-entropy [n] of `scale * a @ b.T` ([n, m]); row i is global row `start + i`."""
    if chunk is None:
        return _ce_from_logits(scale * a @ b.T, targets, start, transpose)
    lse = _ChunkedLSE.apply(a, b, scale, chunk, False)[0]  # [n]
    return lse - scale * (a * _positive_mean(b, targets, start, a.shape[0], chunk, transpose)).sum(-1)


def clip_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor | float,
    *,
    targets: Tensor | None = None,
    gather: bool = True,
    local_loss: bool = False,
    chunk_size: int | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Symmetric InfoNCE (CLIP) loss, optionally with soft (false-negative-aware) targets.

    Single process it equals open_clip's `ClipLoss()(image_features, text_features, logit_scale)`. Across ranks
    (with `gather=True`) features are gathered with gradient (module docstring has the rule):
    `local_loss=False` -> every rank returns the full global loss (B x B on every rank); `local_loss=True` -> rank r
    returns the loss of its local image rows vs all texts and its local text rows vs all images, scaled by N / B so
    that the mean over ranks is the global loss (b x B per rank: prefer it at scale). Either way, averaging parameter
    gradients over ranks gives exactly the single-process gradient on the global batch.

    Args:
        image_features: local image embeddings [b, D].
        text_features: local text embeddings [b, D].
        logit_scale: scalar multiplier (already exponentiated).
        targets: global [B, B] matrix (image i, text j) of pairs that must not be pushed apart (the diagonal is always
            positive), or [B] group ids (see `duplicate_groups`). Each row's cross-entropy target is that row
            normalized to sum 1; the text direction uses the transpose. None = identity (plain CLIP).
        gather: gather features across ranks when distributed.
        local_loss: see above.
        chunk_size: compute the logsumexps in blocks of `chunk_size` rows x B (exact; never holds B x B).
        reduction: "mean" (scalar) or "none": per-pair losses `(ce_image_i + ce_text_i) / 2` of the rows this rank
            computes ([B] if `local_loss=False`, [b] if True); "mean" is their mean, resp. their sum * N / B.

    Returns:
        The loss (scalar) or the per-pair losses.
    """
    _check_chunk(chunk_size)
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    if image_features.shape[0] != text_features.shape[0]:
        raise ValueError(f"image/text batch sizes differ: {image_features.shape[0]} vs {text_features.shape[0]}")
    sh = mdist.shard_layout(image_features.shape[0], image_features.device, gather)
    _check_targets(targets, sh.total, "targets")
    scale = _as_scalar(logit_scale, image_features)
    if sh.world > 1 and local_loss:
        all_img = mdist.gather_features(image_features, True, sizes=sh.sizes)  # [B, D]
        all_txt = mdist.gather_features(text_features, True, sizes=sh.sizes)  # [B, D]
        ce_img = _ce_rows(image_features, all_txt, scale, targets, sh.offset, chunk_size, False)  # [b]
        ce_txt = _ce_rows(text_features, all_img, scale, targets, sh.offset, chunk_size, True)  # [b]
        per = (ce_img + ce_txt) / 2
        return per if reduction == "none" else per.sum() * (sh.world / sh.total)
    img, txt = image_features, text_features
    if sh.world > 1:
        img = mdist.gather_features(img, False, sizes=sh.sizes)  # [B, D]
        txt = mdist.gather_features(txt, False, sizes=sh.sizes)  # [B, D]
    if chunk_size is None:
        logits = scale * img @ txt.T  # [B, B]
        ce_img = _ce_from_logits(logits, targets, 0, False)  # [B]
        ce_txt = _ce_from_logits(logits.T, targets, 0, True)  # [B]
    else:
        row, col = _ChunkedLSE.apply(img, txt, scale, chunk_size, True)  # [B], [B]
        n = img.shape[0]
        ce_img = row - scale * (img * _positive_mean(txt, targets, 0, n, chunk_size, False)).sum(-1)
        ce_txt = col - scale * (txt * _positive_mean(img, targets, 0, n, chunk_size, True)).sum(-1)
    per = (ce_img + ce_txt) / 2  # [B]
    return per if reduction == "none" else per.mean()


# ----------------------------------------------------------------------------------------------- SigLIP
def siglip_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor | float,
    logit_bias: Tensor | float | None,
    *,
    positives: Tensor | None = None,
    gather: bool = True,
    chunk_size: int | None = None,
) -> Tensor:
    """Sigmoid pairwise loss (SigLIP): `-sum log sigmoid(label_ij * (scale * x_i . y_j + bias)) / (B / N)`.

    Single process it equals open_clip's `SigLipLoss()(img, txt, scale, bias)` (sum over the b x b pairs / b).
    Across ranks the texts are gathered with gradient and rank r sums its local image rows against all B texts,
    normalized by B / N (the local batch size for even shards, like open_clip), so the mean over ranks equals the
    single-process loss on the global batch and averaging parameter gradients over ranks gives its gradient.

    Args:
        image_features: local image embeddings [b, D].
        text_features: local text embeddings [b, D].
        logit_scale: scalar multiplier (already exponentiated).
        logit_bias: scalar bias (None = 0).
        positives: global [B, B] 0/1 matrix (or [B] group ids) of pairs labelled +1; the diagonal always is.
            None = identity.
        gather: gather texts across ranks when distributed.
        chunk_size: compute in blocks of `chunk_size` rows x B (exact; never holds b x B).

    Returns:
        Scalar loss.
    """
    _check_chunk(chunk_size)
    if image_features.shape[0] != text_features.shape[0]:
        raise ValueError(f"image/text batch sizes differ: {image_features.shape[0]} vs {text_features.shape[0]}")
    sh = mdist.shard_layout(image_features.shape[0], image_features.device, gather)
    _check_targets(positives, sh.total, "positives")
    scale = _as_scalar(logit_scale, image_features)
    bias = None if logit_bias is None else _as_scalar(logit_bias, image_features)
    txt = mdist.gather_features(text_features, True, sizes=sh.sizes) if sh.world > 1 else text_features  # [B, D]
    b = image_features.shape[0]
    if chunk_size is not None:
        total = _ChunkedSigLIP.apply(image_features, txt, scale, bias, positives, sh.offset, chunk_size)
    else:
        logits = scale * image_features @ txt.T  # [b, B]
        if bias is not None:
            logits = logits + bias
        if positives is None:
            labels = -torch.ones_like(logits)
            idx = torch.arange(b, device=logits.device)
            labels[idx, idx + sh.offset] = 1
        else:
            labels = 2 * _target_rows(positives, sh.offset, sh.offset + b, device=logits.device, dtype=logits.dtype) - 1
        total = -F.logsigmoid(labels * logits).sum()
    return total * (sh.world / sh.total)


# ---------------------------------------------------------------------------------------------- targets
def duplicate_groups(keys: Sequence[Hashable | None] | Tensor, *, gather: bool = False) -> Tensor:
    """Group ids [B] (long) from per-sample keys: equal keys share an id, a None key only matches itself.

    Group ids are the compact form of `targets` / `positives` (O(B) instead of O(B^2) memory).

    Args:
        keys: B hashable keys (e.g. hashes of normalized report text) or a tensor [B, ...] whose equal rows (e.g.
            label vectors) form groups.
        gather: when distributed, gather the keys of all ranks first (rank order) so ids cover the global batch.
    """
    if gather and mdist.world_size() > 1:
        keys = mdist.gather_features(keys) if isinstance(keys, Tensor) else mdist.gather_objects(keys)
    if isinstance(keys, Tensor):
        return torch.unique(keys.reshape(keys.shape[0], -1), dim=0, return_inverse=True)[1].long()
    ids: dict[Hashable, int] = {}
    out = []
    for k in keys:
        out.append(len(out) if k is None else ids.setdefault(k, len(out)))  # id = index of first occurrence
    return torch.tensor(out, dtype=torch.long)


def duplicate_targets(keys: Sequence[Hashable | None] | Tensor, *, gather: bool = False) -> Tensor:
    """[B, B] float 0/1 matrix of samples sharing a key (diagonal 1), for `targets` / `positives`.

    Args:
        keys: per-sample keys, see `duplicate_groups`.
        gather: when distributed, build the matrix of the global batch (keys of all ranks, rank order).
    """
    g = duplicate_groups(keys, gather=gather)
    return (g[:, None] == g[None, :]).float()  # [B, B]
