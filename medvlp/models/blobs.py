"""Isolated bright and dark spots, as fixed image statistics beside a tower's learned embedding.

A CT tower trained from scratch on a few hundred series memorises them before it finds a lesion of one or two voxels
(README "Are the lesions in the voxels?"), while a fixed statistic finds a dense dot at once: a voxel, or a small
block, brighter than *every* voxel of a ring around it. The ring's maximum, not its mean, is what tells a spot from an
edge or a bone: an elongated structure (a rib, the table, the spine's cortex) reaches into the ring and gives no
margin. :class:`BlobStatistics` computes that margin at a few sizes, for bright and for dark spots, in each half of
the image across the patient's left-right axis (so a side can be read), and summarises each map by its maximum and
the mean of its largest few values. Nothing in it is fitted and nothing reads a label; a batch norm and a linear map
that starts at zero carry the statistics into the embedding as a residual, so an encoder built with them starts as
the one without.

The sizes are in voxels of the cached grid (half-widths of the spot and widths of the ring, in-plane first; a 2D
image uses the in-plane two), not in millimetres: the cache's spacing (``cohort build``) sets what they span.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["BLOB_SCALES", "BlobStatistics", "ring_max", "spot_margins"]

#: (half-width of the spot, width of the ring around it) per axis X, Y, Z: a single voxel against 2 voxels around
#: it, then 3 x 3 x 1, 3 x 3 x 3 and 5 x 5 x 3 blocks against rings of 2 to 3 voxels.
BLOB_SCALES: tuple[tuple[tuple[int, int, int], tuple[int, int, int]], ...] = (
    ((0, 0, 0), (2, 2, 1)),
    ((1, 1, 0), (2, 2, 1)),
    ((1, 1, 1), (3, 3, 2)),
    ((2, 2, 1), (3, 3, 2)),
)
TOP_K = 8  # the largest margins averaged beside the maximum: a spot of a few voxels, not one noisy voxel


def _box_sum(x: Tensor, kernel: Sequence[int]) -> Tensor:
    """The sum over a box (stride 1, no padding), one axis at a time over shifted views (a sum is separable)."""
    for a, k in enumerate(kernel):
        dim, n = 2 + a, x.shape[2 + a] - k + 1
        out = x.narrow(dim, 0, n)
        for i in range(1, k):
            out = out + x.narrow(dim, i, n)
        x = out
    return x


def _box_max(x: Tensor, kernel: Sequence[int]) -> Tensor:
    """The maximum over a box (stride 1, no padding), one axis at a time, each by doubling windows of shifted views
    (a maximum of two overlapping windows is the maximum of their union): log2(k) + 1 elementwise maxima per axis,
    which on a CPU run an order of magnitude faster than a max pool's kernel."""
    for a, k in enumerate(kernel):
        dim, n = 2 + a, x.shape[2 + a] - k + 1
        w = 1
        while 2 * w <= k:
            m = x.shape[dim] - w
            x, w = torch.maximum(x.narrow(dim, 0, m), x.narrow(dim, w, m)), 2 * w
        x = torch.maximum(x.narrow(dim, 0, n), x.narrow(dim, k - w, n)) if w < k else x.narrow(dim, 0, n)
    return x


def _pad(x: Tensor, half: Sequence[int], value: float) -> Tensor:
    pad: list[int] = []
    for h in reversed(half):  # F.pad lists the last axis first
        pad += [h, h]
    return F.pad(x, pad, value=value)


def ring_max(x: Tensor, inner: Sequence[int], width: Sequence[int]) -> Tensor:
    """Per voxel of ``x`` ``[B, C, *grid]``, the maximum over the box of half-widths ``inner + width`` around it
    that lies outside the box of half-widths ``inner``; beyond the image counts as ``-inf``.

    The ring is the union, over each axis and side, of a slab ``width`` voxels thick past the inner box along that
    axis and as wide as the outer box along the others, on a ``-inf``-padded copy.
    """
    dims = x.ndim - 2
    outer = [i + w for i, w in zip(inner, width, strict=True)]
    xp = _pad(x, outer, float("-inf"))
    size = x.shape[2:]
    out: Tensor | None = None
    for a in range(dims):
        kernel = [2 * o + 1 for o in outer]
        kernel[a] = width[a]
        slab = _box_max(xp, kernel)
        for start in (0, outer[a] + inner[a] + 1):  # the slab before the inner box, then the one after it
            index = [slice(None), slice(None), *(slice(0, n) for n in size)]
            index[2 + a] = slice(start, start + size[a])
            part = slab[tuple(index)]
            out = part if out is None else torch.maximum(out, part)
    assert out is not None
    return out


def spot_margins(x: Tensor, inner: Sequence[int], width: Sequence[int]) -> tuple[Tensor, Tensor]:
    """The margin by which the mean of the box of half-widths ``inner`` around each voxel exceeds every voxel of its
    ring (bright spots), and falls below every one of them (dark spots); ``[B, C, *grid]`` each."""
    kernel = [2 * i + 1 for i in inner]
    count = _box_sum(_pad(torch.ones_like(x[:1, :1]), inner, 0.0), kernel)
    centre = _box_sum(_pad(x, inner, 0.0), kernel) / count  # the box mean, the image's voxels only
    return centre - ring_max(x, inner, width), -centre - ring_max(-x, inner, width)


class BlobStatistics(nn.Module):
    """Spot margins at :data:`BLOB_SCALES`, per half of the image along ``axis``, mapped into an embedding residual.

    ``statistics(x)`` gives ``[B, S * 2 * 2 * 2]`` numbers (scales, bright and dark, two halves, maximum and top-k
    mean), without gradient; ``forward`` returns ``proj(norm(statistics))`` ``[B, channels]``, zero at the start.
    """

    def __init__(self, channels: int, spatial_dims: int = 3, axis: int = 0) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"blob statistics need a 2D or 3D image, not {spatial_dims}D")
        if not 0 <= axis < spatial_dims:
            raise ValueError(f"blob_axis must be a spatial axis of a {spatial_dims}D image, not {axis}")
        self.spatial_dims, self.axis = int(spatial_dims), int(axis)
        self.scales = [(inner[:spatial_dims], width[:spatial_dims]) for inner, width in BLOB_SCALES]
        if spatial_dims == 2:  # the 3D list's in-plane sizes, each kept once
            self.scales = list(dict.fromkeys(self.scales))
        self.num_statistics = len(self.scales) * 8
        self.norm = nn.BatchNorm1d(self.num_statistics)
        self.proj = nn.Linear(self.num_statistics, channels)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    @torch.no_grad()
    def statistics(self, x: Tensor) -> Tensor:
        """``x`` ``[B, 1, *grid]`` -> ``[B, num_statistics]`` in float32."""
        x = x.float()
        half = x.shape[2 + self.axis] // 2
        out = []
        for inner, width in self.scales:
            for margin in spot_margins(x, inner, width):
                for part in (
                    margin.narrow(2 + self.axis, 0, half),
                    margin.narrow(2 + self.axis, half, margin.shape[2 + self.axis] - half),
                ):
                    flat = part.flatten(1)
                    out += [flat.amax(dim=1), flat.topk(min(TOP_K, flat.shape[1]), dim=1).values.mean(dim=1)]
        return torch.stack(out, dim=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.norm(self.statistics(x)))
