"""Contrastive image-text losses (CLIP InfoNCE, SigLIP): exact across ranks, optionally chunked.

Single process, `clip_loss` equals open_clip's `ClipLoss()(img, txt, scale)` and `siglip_loss` equals
`SigLipLoss()(img, txt, scale, bias)`, values and gradients. Features are L2-normalized by the caller and
`logit_scale` is the multiplier (already exponentiated).

Distributed rule (global batch B = the ranks' local batches concatenated in rank order; L = the loss one process
computes on the global batch; N = world size):

- Every rank returns a term `L_r` with `mean_r L_r == L`. With `clip_loss(local_loss=False)` every term equals L
  (each rank evaluates the full B x B loss); with `clip_loss(local_loss=True)` and `siglip_loss` a rank owns the
  rows of its local samples against all gathered columns, normalized by `B / N` (= the local batch size for even
  shards, as in open_clip), so the mean over ranks is exact even for uneven shards.
- Gathers carry gradients, so `L_r.backward()` leaves `N * dL/dx_r` on the local feature rows `x_r` and
  `dL_r/dtheta` on replicated tensors (`logit_scale`, `logit_bias`). Averaging parameter gradients over ranks
  (what DDP does, or all_reduce(SUM) / N) therefore gives exactly the single-process gradient of L.

Chunking (`chunk_size`) computes the logits in row blocks of `chunk_size x B` inside custom autograd Functions
that recompute each block in backward, so neither forward nor backward holds the B x B matrix.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
import torch.nn.functional as F
from monai.utils import look_up_option
from torch import Tensor, nn

from medvlp import distributed as mdist

__all__ = [
    "LOSSES",
    "ContrastiveLoss",
    "ContrastiveLossConfig",
    "alignment_loss",
    "clip_logits",
    "clip_loss",
    "duplicate_groups",
    "duplicate_targets",
    "local_alignment_loss",
    "local_similarity",
    "noise_weights",
    "siglip_loss",
    "uniformity_loss",
]


# ----------------------------------------------------------------------------------------------- helpers
def _spans(n: int, chunk: int) -> Iterator[tuple[int, int]]:
    for s in range(0, n, chunk):
        yield s, min(s + chunk, n)


def _as_scalar(v: Tensor | float, like: Tensor) -> Tensor:
    return v if isinstance(v, Tensor) else torch.tensor(float(v), dtype=like.dtype, device=like.device)


def _check_chunk(chunk_size: int | None) -> None:
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size}")


def _target_rows(
    targets: Tensor, start: int, stop: int, *, device: torch.device, dtype: torch.dtype, transpose: bool = False
) -> Tensor:
    """Rows `start:stop` of the global [B, B] pair matrix (rows of its transpose if `transpose`), diagonal forced
    to 1. `targets` is either the [B, B] matrix or [B] group ids (equal ids pair up, negative ids only match
    themselves)."""
    if targets.dim() == 1:
        g = targets.to(device)
        rows = (g[start:stop, None] == g[None, :]) & (g[start:stop, None] >= 0)  # [c, B]
        rows = rows.to(dtype)
    else:
        src = targets.T if transpose else targets
        rows = src[start:stop].to(device=device, dtype=dtype, copy=True)  # [c, B]
    idx = torch.arange(stop - start, device=device)
    rows[idx, idx + start] = 1
    return rows


def _check_targets(targets: Tensor | None, total: int, name: str) -> None:
    if targets is None:
        return
    ok = (targets.dim() == 1 and targets.shape[0] == total) or tuple(targets.shape) == (total, total)
    if not ok:
        raise ValueError(
            f"{name} must be [B, B] or [B] group ids for the global batch B={total}, got {tuple(targets.shape)}"
        )


class _Amp:
    """Autocast state captured in forward and re-entered for the backward recomputation."""

    def __init__(self, t: Tensor) -> None:
        self.device = t.device.type
        self.enabled = torch.is_autocast_enabled(self.device)
        self.dtype = torch.get_autocast_dtype(self.device)

    def __call__(self) -> torch.autocast:
        return torch.autocast(self.device, dtype=self.dtype, enabled=self.enabled)


def _block(a: Tensor, b: Tensor, scale: Tensor) -> Tensor:
    """`scale * a @ b.T` [c, m] in at least float32 (a fresh tensor, scaled in place)."""
    raw = a @ b.T
    return raw.to(torch.promote_types(raw.dtype, torch.float32)).mul_(scale)


# ------------------------------------------------------------------------------------- chunked kernels
class _ChunkedLSE(torch.autograd.Function):
    """Row logsumexp [n] (and column logsumexp [m] if `with_cols`) of `scale * a @ b.T`, by row blocks."""

    @staticmethod
    def forward(ctx: Any, a: Tensor, b: Tensor, scale: Tensor, chunk: int, with_cols: bool) -> tuple[Tensor, Tensor]:
        ctx.amp, ctx.chunk, ctx.with_cols = _Amp(a), chunk, with_cols
        rows, col = [], None
        for s, e in _spans(a.shape[0], chunk):
            logits = _block(a[s:e], b, scale)  # [c, m]
            rows.append(torch.logsumexp(logits, dim=1))
            if with_cols:
                part = torch.logsumexp(logits, dim=0)  # [m]
                col = part if col is None else torch.logaddexp(col, part)
        row = torch.cat(rows)  # [n]
        col = row.new_empty(0) if col is None else col
        ctx.save_for_backward(a, b, scale, row, col)
        return row, col

    @staticmethod
    def backward(ctx: Any, g_row: Tensor, g_col: Tensor) -> tuple[Tensor | None, ...]:
        a, b, scale, row, col = ctx.saved_tensors
        need_a, need_b, need_s = ctx.needs_input_grad[:3]
        ga = torch.empty_like(a) if need_a else None
        gb = torch.zeros(b.shape, dtype=row.dtype, device=b.device) if need_b else None
        gs = torch.zeros((), dtype=row.dtype, device=a.device)
        with ctx.amp():
            for s, e in _spans(a.shape[0], ctx.chunk):
                logits = _block(a[s:e], b, scale)  # [c, m]
                grad = (logits - row[s:e, None]).exp_().mul_(g_row[s:e, None])  # d/dlogits, [c, m]
                if ctx.with_cols:
                    grad.add_((logits - col[None]).exp_().mul_(g_col[None]))
                del logits
                gb_rows = grad @ b  # [c, D]
                if need_a:
                    ga[s:e] = gb_rows * scale
                if need_s:
                    gs += (a[s:e] * gb_rows).sum()
                if need_b:
                    gb += (grad.T @ a[s:e]) * scale
        return (
            ga,
            gb.to(b.dtype) if need_b else None,
            gs.to(scale.dtype).reshape(scale.shape) if need_s else None,
            None,
            None,
        )


class _ChunkedSigLIP(torch.autograd.Function):
    """Sum over [n, m] pairs of `-logsigmoid(label * (scale * x @ y.T + bias))`, by row blocks.

    Uses `-logsigmoid(+l) = softplus(l) - l` for positives and `-logsigmoid(-l) = softplus(l)` for negatives, whose
    gradient is `sigmoid(l) - [positive]`.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        y: Tensor,
        scale: Tensor,
        bias: Tensor | None,
        positives: Tensor | None,
        offset: int,
        chunk: int,
    ) -> Tensor:
        ctx.amp, ctx.chunk, ctx.offset, ctx.positives = _Amp(x), chunk, offset, positives
        total = None
        for s, e in _spans(x.shape[0], chunk):
            logits, pos = _ChunkedSigLIP._block(ctx, x, y, scale, bias, s, e)  # [c, m], index or mask
            part = F.softplus(logits).sum() - logits[pos].sum()
            total = part if total is None else total + part
        ctx.save_for_backward(x, y, scale, bias)
        return total

    @staticmethod
    def _block(
        ctx: Any, x: Tensor, y: Tensor, scale: Tensor, bias: Tensor | None, s: int, e: int
    ) -> tuple[Tensor, Any]:
        logits = _block(x[s:e], y, scale)  # [c, m]
        if bias is not None:
            logits.add_(bias)
        if ctx.positives is None:  # the diagonal of the global batch: (row, offset + row)
            idx = torch.arange(e - s, device=logits.device)
            return logits, (idx, idx + ctx.offset + s)
        lo, hi = ctx.offset + s, ctx.offset + e
        return logits, _target_rows(ctx.positives, lo, hi, device=logits.device, dtype=torch.bool)  # [c, m]

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        x, y, scale, bias = ctx.saved_tensors
        need_x, need_y, need_s, need_b = ctx.needs_input_grad[:4]
        acc = torch.promote_types(x.dtype, torch.float32)
        gx = torch.empty_like(x) if need_x else None
        gy = torch.zeros(y.shape, dtype=acc, device=y.device) if need_y else None
        gs = torch.zeros((), dtype=acc, device=x.device)
        gbias = torch.zeros((), dtype=acc, device=x.device)
        with ctx.amp():
            for s, e in _spans(x.shape[0], ctx.chunk):
                logits, pos = _ChunkedSigLIP._block(ctx, x, y, scale, bias, s, e)
                grad = logits.sigmoid_()  # [c, m]
                grad[pos] -= 1
                grad.mul_(g)  # d/dlogits
                gy_rows = grad @ y  # [c, D]
                if need_x:
                    gx[s:e] = gy_rows * scale
                if need_s:
                    gs += (x[s:e] * gy_rows).sum()
                if need_b:
                    gbias += grad.sum()
                if need_y:
                    gy += (grad.T @ x[s:e]) * scale
        return (
            gx,
            gy.to(y.dtype) if need_y else None,
            gs.to(scale.dtype).reshape(scale.shape) if need_s else None,
            gbias.to(bias.dtype).reshape(bias.shape) if need_b else None,
            None,
            None,
            None,
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


# ------------------------------------------------------------------------------------ registry + module
def _look_up(name: str, known: Sequence[str], what: str, exc: type[Exception] = ValueError) -> str:
    """``name`` if it is known; else ``exc`` listing the known names, with MONAI's "did you mean ...?" guess."""
    try:
        return look_up_option(name, known, print_all_options=False)
    except ValueError as err:
        raise exc(
            f"unknown {what} {name!r} (known: {', '.join(sorted(known))}): {' '.join(str(err).split())}"
        ) from None


def _clip_term(
    img: Tensor,
    txt: Tensor,
    scale: Tensor | float,
    bias: Tensor | float | None,
    targets: Tensor | None,
    cfg: ContrastiveLossConfig,
) -> Tensor:
    kw: dict[str, Any] = {
        "targets": targets,
        "gather": cfg.gather,
        "local_loss": cfg.local_loss,
        "chunk_size": cfg.chunk_size,
    }
    if not cfg.noise_weighting:
        return clip_loss(img, txt, scale, **kw)
    per = clip_loss(img, txt, scale, reduction="none", **kw)  # [B], or [b] with local_loss across ranks
    sh = mdist.shard_layout(img.shape[0], img.device, cfg.gather)
    if sh.world == 1 or not cfg.local_loss:
        return (noise_weights(per, cfg.noise_tau) * per).mean()
    w = noise_weights(mdist.gather_features(per.detach(), sizes=sh.sizes), cfg.noise_tau)  # [B]
    return (w[sh.offset : sh.offset + per.shape[0]] * per).sum() * (sh.world / sh.total)


def _siglip_term(
    img: Tensor,
    txt: Tensor,
    scale: Tensor | float,
    bias: Tensor | float | None,
    targets: Tensor | None,
    cfg: ContrastiveLossConfig,
) -> Tensor:
    loss = siglip_loss(img, txt, scale, bias, positives=targets, gather=cfg.gather, chunk_size=cfg.chunk_size)
    if not cfg.noise_weighting:
        return loss
    # weight each image-text pair's own (positive) term; negatives keep weight 1
    pos = -F.logsigmoid(scale * (img * txt).sum(-1) + (0.0 if bias is None else bias))  # [b]
    sh = mdist.shard_layout(img.shape[0], img.device, cfg.gather)
    all_pos = mdist.gather_features(pos.detach(), sizes=sh.sizes) if sh.world > 1 else pos  # [B]
    w = noise_weights(all_pos, cfg.noise_tau)[sh.offset : sh.offset + pos.shape[0]]
    return loss + ((w - 1) * pos).sum() * (sh.world / sh.total)


#: Contrastive kinds: `fn(image_features, text_features, logit_scale, logit_bias, targets, config) -> scalar`.
LOSSES: dict[str, Callable[..., Tensor]] = {"clip": _clip_term, "siglip": _siglip_term}


@dataclass
class ContrastiveLossConfig:
    """Options of `ContrastiveLoss`; every term beyond the contrastive one is off by default.

    Attributes:
        kind: a key of `LOSSES` ("clip" or "siglip").
        gather, local_loss, chunk_size: as in `clip_loss` / `siglip_loss` (`local_loss` is CLIP only).
        noise_weighting: NEVLP-style noise-adaptive pair weights (`noise_weights` of the detached per-pair loss:
            CLIP's per-pair cross-entropy, SigLIP's positive-pair term), computed over the global batch.
        noise_tau: loss scale of the weighting.
        alignment_weight: weight of `alignment_loss` (Wang & Isola), as in the "contrastive gap" paper.
        uniformity_weight: weight of `uniformity_loss` over the concatenated image + text embeddings.
        uniformity_t: its temperature.
        local_weight: weight of the GLoRIA/MGCA-style `local_alignment_loss` (needs image/text tokens).
        local_attention_scale, local_word_scale, local_logit_scale: its inverse temperatures.

    The alignment, uniformity and local terms use this rank's local batch only.
    """

    kind: str = "clip"
    gather: bool = True
    local_loss: bool = False
    chunk_size: int | None = None
    noise_weighting: bool = False
    noise_tau: float = 0.5
    alignment_weight: float = 0.0
    uniformity_weight: float = 0.0
    uniformity_t: float = 2.0
    local_weight: float = 0.0
    local_attention_scale: float = 4.0
    local_word_scale: float = 5.0
    local_logit_scale: float = 10.0

    def __post_init__(self) -> None:
        self.kind = _look_up(self.kind, list(LOSSES), "loss kind")
        _check_chunk(self.chunk_size)
        if self.local_loss and self.kind != "clip":
            raise ValueError(f"local_loss applies to kind='clip' only (kind={self.kind!r})")
        for name in ("noise_tau", "uniformity_t"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("alignment_weight", "uniformity_weight", "local_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


class ContrastiveLoss(nn.Module):
    """Contrastive loss plus optional literature terms; returns `{"loss": total, "contrastive": ..., <terms>}`.

    Example:
        `ContrastiveLoss("siglip", chunk_size=4096, noise_weighting=True)(img, txt, scale, bias)["loss"]`
    """

    def __init__(self, kind: str | None = None, *, config: ContrastiveLossConfig | None = None, **options: Any) -> None:
        super().__init__()
        names = [f.name for f in fields(ContrastiveLossConfig)]
        for key in options:
            _look_up(key, names, "ContrastiveLoss option", TypeError)
        if kind is not None:
            options["kind"] = kind
        self.config = replace(config or ContrastiveLossConfig(), **options)

    def forward(
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: Tensor | float,
        logit_bias: Tensor | float | None = None,
        *,
        targets: Tensor | None = None,
        keys: Sequence[Hashable | None] | Tensor | None = None,
        image_tokens: Tensor | None = None,
        text_tokens: Tensor | None = None,
        text_mask: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Compute the loss terms.

        Args:
            image_features: local image embeddings [b, D], L2-normalized.
            text_features: local text embeddings [b, D], L2-normalized.
            logit_scale: scalar multiplier (already exponentiated).
            logit_bias: SigLIP bias (ignored by CLIP).
            targets: global [B, B] pair matrix or [B] group ids (CLIP soft targets / SigLIP positives).
            keys: per-sample keys instead of `targets` (gathered across ranks when `gather`).
            image_tokens: [b, P, D] patch embeddings (local term).
            text_tokens: [b, T, D] word embeddings (local term).
            text_mask: [b, T] real-word mask (local term).

        Returns:
            Dict of scalar tensors: "loss" (weighted total), "contrastive", and each enabled term.
        """
        cfg = self.config
        if keys is not None:
            if targets is not None:
                raise ValueError("pass either targets or keys, not both")
            targets = duplicate_groups(keys, gather=cfg.gather).to(image_features.device)
        terms = {"contrastive": LOSSES[cfg.kind](image_features, text_features, logit_scale, logit_bias, targets, cfg)}
        weights = {
            "contrastive": 1.0,
            "alignment": cfg.alignment_weight,
            "uniformity": cfg.uniformity_weight,
            "local": cfg.local_weight,
        }
        if cfg.alignment_weight:
            terms["alignment"] = alignment_loss(image_features, text_features)
        if cfg.uniformity_weight:
            terms["uniformity"] = uniformity_loss(torch.cat([image_features, text_features]), cfg.uniformity_t)
        if cfg.local_weight:
            if image_tokens is None or text_tokens is None:
                raise ValueError("local_weight > 0 needs image_tokens and text_tokens")
            terms["local"] = local_alignment_loss(
                image_tokens,
                text_tokens,
                text_mask,
                attention_scale=cfg.local_attention_scale,
                word_scale=cfg.local_word_scale,
                logit_scale=cfg.local_logit_scale,
            )
        total = sum(weights[k] * v for k, v in terms.items())
        return {"loss": total, **terms}
