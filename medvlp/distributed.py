"""Process-group helpers for the contrastive losses: rank queries and an all-gather that carries gradients.

Everything here is the identity (or a trivial value) when `torch.distributed` is not initialized, so the same
code runs in one process and across ranks. Local batches may differ in size between ranks (e.g. the last batch
of an epoch); gathered tensors are the concatenation of the ranks' rows in rank order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "Shard",
    "gather_features",
    "gather_objects",
    "gather_sizes",
    "is_dist",
    "rank",
    "shard_layout",
    "world_size",
]


def is_dist() -> bool:
    """True when a default process group is initialized."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Number of ranks of the default group (1 when not distributed)."""
    return dist.get_world_size() if is_dist() else 1


def rank() -> int:
    """Rank of this process in the default group (0 when not distributed)."""
    return dist.get_rank() if is_dist() else 0


def gather_sizes(n: int, device: torch.device | str | None = None) -> list[int]:
    """Local batch sizes of all ranks, in rank order (one tiny all-gather; `[n]` when not distributed).

    Args:
        n: this rank's local batch size.
        device: device of the collective's tensor (must be CUDA for NCCL).
    """
    if world_size() == 1:
        return [n]
    t = torch.tensor([n], dtype=torch.long, device=device)
    out = [torch.empty_like(t) for _ in range(world_size())]
    dist.all_gather(out, t)
    return [int(o.item()) for o in out]


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 (uneven sizes allowed) whose backward returns this rank's rows of the gradient."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, sizes: tuple[int, ...], local_loss: bool) -> Tensor:
        ctx.sizes, ctx.local_loss, ctx.rank = sizes, local_loss, rank()
        x = x.contiguous()
        biggest = max(sizes)
        if x.shape[0] < biggest:  # all_gather needs equal shapes: pad, gather, trim
            x = torch.cat([x, x.new_zeros((biggest - x.shape[0], *x.shape[1:]))])
        parts = [torch.empty_like(x) for _ in sizes]
        dist.all_gather(parts, x)
        return torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)])  # [sum(sizes), ...]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        sizes, r = ctx.sizes, ctx.rank
        start = sum(sizes[:r])
        stop = start + sizes[r]
        if not ctx.local_loss:
            # Every rank computed the same function of the gathered tensor, so every rank holds the same
            # gradient: the sum over ranks is world_size x the local one, without communication.
            return grad[start:stop] * len(sizes), None, None
        grad = grad.contiguous().clone()
        if dist.get_backend() == "nccl" and len(set(sizes)) == 1:
            out = grad.new_empty((sizes[r], *grad.shape[1:]))
            dist.reduce_scatter_tensor(out, grad)
            return out, None, None
        dist.all_reduce(grad)  # gloo has no reduce_scatter; sum everything and keep our rows
        return grad[start:stop], None, None


def gather_features(x: Tensor, local_loss: bool = False, *, sizes: Sequence[int] | None = None) -> Tensor:
    """All-gather `x` [n, ...] from every rank into [N_total, ...], keeping the gradient path to `x`.

    The backward gives this rank the sum over ranks of the gradient of each rank's loss w.r.t. its rows, i.e.
    `d(sum_r loss_r)/dx`. How it gets there depends on `local_loss`:

    - `local_loss=False`: the caller promises that every rank computes the *same* function of the gathered
      tensor (the full global loss); the backward then returns `world_size * grad[own rows]` with no
      communication, which is what summing the identical per-rank gradients would give.
    - `local_loss=True`: ranks compute different losses (their own rows against all); the backward sums the
      gradient across ranks (reduce-scatter on NCCL with equal sizes, otherwise all-reduce) and returns the
      own rows.

    Every rank must call backward through the gathered tensor (collectives must match).

    Args:
        x: local tensor [n, ...].
        local_loss: see above.
        sizes: local sizes of all ranks if already known (saves one small collective).

    Returns:
        The concatenation of all ranks' `x` in rank order; `x` itself when not distributed.
    """
    if world_size() == 1:
        return x
    if sizes is None:
        sizes = gather_sizes(x.shape[0], x.device)
    return _GatherWithGrad.apply(x, tuple(int(s) for s in sizes), local_loss)


def gather_objects(items: Sequence[Any]) -> list[Any]:
    """Concatenate a picklable sequence over ranks, in rank order (a copy of `items` when not distributed)."""
    if world_size() == 1:
        return list(items)
    parts: list[Any] = [None] * world_size()
    dist.all_gather_object(parts, list(items))
    return [item for part in parts for item in part]


@dataclass(frozen=True)
class Shard:
    """Layout of the global batch: this rank's rows are `offset : offset + sizes[rank]` of `total`."""

    world: int
    rank: int
    sizes: tuple[int, ...]

    @property
    def total(self) -> int:
        return sum(self.sizes)

    @property
    def offset(self) -> int:
        return sum(self.sizes[: self.rank])


def shard_layout(n: int, device: torch.device | str | None = None, gather: bool = True) -> Shard:
    """The global batch layout for a local batch of `n` rows (a single shard unless gathering across ranks)."""
    if not gather or world_size() == 1:
        return Shard(1, 0, (n,))
    return Shard(world_size(), rank(), tuple(gather_sizes(n, device)))
