"""Chunked logit kernels and the helpers the losses share."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


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
