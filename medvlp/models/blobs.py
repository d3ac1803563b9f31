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

:class:`SpotMaps` (opt-in) gives the same margins to a tower's stem as maps, so that its layers can learn where a
spot is a finding.

``levels`` (opt-in, :func:`ceiling_free_levels`) add the spot's own mean where neither it nor its ring touches the
image's maximum (the window's top, where a windowed CT clips bone): soft tissue brighter than the organs.

``contrast`` (opt-in, :func:`spot_contrast`) adds the spot's contrast to noise against its ring: the ring's mean less
the spot's mean over the ring's standard deviation, dark and bright, where neither touches a clipped voxel. A faint
lesion in a homogeneous organ (a hypodense liver lesion a few tens of HU below the parenchyma, within the noise of a
single voxel) has no margin over *every* voxel of its ring, but stands out of the ring's mean by several of the
spot's own standard errors; an edge has a wide ring and a small ratio.

The sizes are in voxels of the cached grid (half-widths of the spot and widths of the ring, in-plane first; a 2D
image uses the in-plane two), not in millimetres: the cache's spacing (``cohort build``) sets what they span.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "BLOB_KINDS",
    "BLOB_SCALES",
    "CONTRAST_SCALES",
    "BlobStatistics",
    "SpotMaps",
    "SpotStatistics",
    "blob_kinds",
    "blob_scales",
    "ceiling_free_levels",
    "cell_index",
    "margin_maps",
    "ring_max",
    "spot_contrast",
    "spot_margins",
]

#: (half-width of the spot, width of the ring around it) per axis X, Y, Z: a single voxel against 2 voxels around
#: it, then 3 x 3 x 1, 3 x 3 x 3 and 5 x 5 x 3 blocks against rings of 2 to 3 voxels.
BLOB_SCALES: tuple[tuple[tuple[int, int, int], tuple[int, int, int]], ...] = (
    ((0, 0, 0), (2, 2, 1)),
    ((1, 1, 0), (2, 2, 1)),
    ((1, 1, 1), (3, 3, 2)),
    ((2, 2, 1), (3, 3, 2)),
)
#: what :class:`BlobStatistics` can compute: spot ``margins`` (bright and dark, 8 numbers per scale) and the
#: ``levels`` of spots away from the window's ceiling (4 numbers per scale) and their ``contrast`` to noise (8 numbers
#: per scale of :data:`CONTRAST_SCALES`)
BLOB_KINDS = ("margins", "levels", "contrast")
#: (half-width of the spot, width of the ring) of the contrast to noise: spots of 3 x 3 x 1 to 7 x 7 x 5 voxels (a
#: single voxel has no mean to speak of), set once before any run and not changed after
CONTRAST_SCALES: tuple[tuple[tuple[int, int, int], tuple[int, int, int]], ...] = (
    ((1, 1, 0), (2, 2, 1)),
    ((1, 1, 1), (2, 2, 1)),
    ((2, 2, 1), (2, 2, 1)),
    ((3, 3, 2), (3, 3, 1)),
)
RING_VAR_MIN = 1e-6  # a ring of constant voxels (a flat phantom) has no noise to divide by
CEILING_TOL = 1e-3  # within this fraction of the range below the image's maximum, a voxel is at the window's ceiling
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
    centre = _box_mean(x, inner)
    return centre - ring_max(x, inner, width), -centre - ring_max(-x, inner, width)


def _box_mean(x: Tensor, inner: Sequence[int]) -> Tensor:
    """The mean of the box of half-widths ``inner`` around each voxel, over the image's voxels only."""
    kernel = [2 * i + 1 for i in inner]
    count = _box_sum(_pad(torch.ones_like(x[:1, :1]), inner, 0.0), kernel)
    return _box_sum(_pad(x, inner, 0.0), kernel) / count


def _clipped_near(x: Tensor, outer: Sequence[int], floor: bool) -> Tensor:
    """1 where the box of half-widths ``outer`` around a voxel holds a voxel at the image's maximum (or, with
    ``floor``, at its minimum too), else 0; ``[B, C, *grid]``."""
    flat = x.flatten(1)
    shape = (-1,) + (1,) * (x.ndim - 1)
    top, bottom = flat.amax(dim=1).view(shape), flat.amin(dim=1).view(shape)
    tol = CEILING_TOL * (top - bottom)
    clipped = (x >= top - tol) | (x <= bottom + tol) if floor else x >= top - tol
    return _box_max(_pad(clipped.to(x.dtype), outer, 0.0), [2 * o + 1 for o in outer])


def spot_contrast(x: Tensor, inner: Sequence[int], width: Sequence[int]) -> tuple[Tensor, Tensor]:
    """The contrast to noise of the box of half-widths ``inner`` around each voxel against its ring (the box
    ``width`` past it, less the inner box): ``(spot mean - ring mean) / ring std`` for bright spots and its opposite
    for dark ones, each at least 0, and 0 where the spot or its ring holds a voxel at the image's minimum or maximum
    (air, gas, bone clipped by a CT window: their edges are not lesions); ``[B, C, *grid]`` each."""
    outer = [i + w for i, w in zip(inner, width, strict=True)]

    def box(v: Tensor, half: Sequence[int]) -> Tensor:
        return _box_sum(_pad(v, half, 0.0), [2 * h + 1 for h in half])

    ones = torch.ones_like(x[:1, :1])
    n_in, n_ring = box(ones, inner), (box(ones, outer) - box(ones, inner)).clamp(min=1.0)
    s_in, q_in = box(x, inner), box(x * x, inner)
    ring_mean = (box(x, outer) - s_in) / n_ring
    ring_var = ((box(x * x, outer) - q_in) / n_ring - ring_mean**2).clamp(min=RING_VAR_MIN)
    ratio = (s_in / n_in - ring_mean) / ring_var.sqrt()
    ratio = torch.where(_clipped_near(x, outer, floor=True) > 0, torch.zeros_like(ratio), ratio)
    return ratio.clamp(min=0.0), (-ratio).clamp(min=0.0)


def ceiling_free_levels(x: Tensor, inner: Sequence[int], width: Sequence[int]) -> Tensor:
    """The mean of the box of half-widths ``inner`` around each voxel where neither it nor its ring (``width`` past
    it) holds a voxel at the image's maximum, and the image's minimum elsewhere; ``[B, C, *grid]``.

    A CT cache is windowed: bone, the table and dense calcifications are clipped at the window's top. A soft-tissue
    spot brighter than every organ (an enhancing mass) has no margin over a ring that reaches a rib or the spine,
    but its level away from anything clipped still tells it from parenchyma.
    """
    bottom = x.flatten(1).amin(dim=1).view((-1,) + (1,) * (x.ndim - 1))
    near = _clipped_near(x, [i + w for i, w in zip(inner, width, strict=True)], floor=False)
    return torch.where(near > 0, bottom.expand_as(x), _box_mean(x, inner))


class SpotStatistics(nn.Module):
    """Spot statistics at :data:`BLOB_SCALES`, per half of the image along ``axis``: numbers, nothing learned.

    ``kinds`` picks from :data:`BLOB_KINDS` (``True``: the margins alone). ``statistics(x)`` gives per scale 8
    margins (bright and dark, two halves, maximum and top-k mean) and 4 levels (two halves, maximum and top-k mean),
    and per scale of :data:`CONTRAST_SCALES` 8 contrasts to noise (as the margins), without gradient. It holds no
    weights: :class:`BlobStatistics` maps them into a tower's embedding, :class:`medvlp.models.image_refit.ImageRefit`
    into the shared space after training.
    """

    def __init__(self, spatial_dims: int = 3, axis: int = 0, kinds: bool | str | Sequence[str] = True) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"blob statistics need a 2D or 3D image, not {spatial_dims}D")
        if not 0 <= axis < spatial_dims:
            raise ValueError(f"blob_axis must be a spatial axis of a {spatial_dims}D image, not {axis}")
        self.kinds = blob_kinds(kinds)
        self.spatial_dims, self.axis = int(spatial_dims), int(axis)
        self.scales = blob_scales(spatial_dims)
        self.contrast_scales = blob_scales(spatial_dims, CONTRAST_SCALES)
        per_scale = {"margins": 8 * len(self.scales), "levels": 4 * len(self.scales)}
        per_scale["contrast"] = 8 * len(self.contrast_scales)
        self.num_statistics = sum(per_scale[k] for k in self.kinds)

    def _summaries(self, maps: Sequence[Tensor]) -> list[Tensor]:
        """Per map and half along ``axis``: the maximum and the mean of the top-k values, ``[B]`` each."""
        half = maps[0].shape[2 + self.axis] // 2
        out = []
        for m in maps:
            n = m.shape[2 + self.axis]
            for part in (m.narrow(2 + self.axis, 0, half), m.narrow(2 + self.axis, half, n - half)):
                flat = part.flatten(1)
                out += [flat.amax(dim=1), flat.topk(min(TOP_K, flat.shape[1]), dim=1).values.mean(dim=1)]
        return out

    @torch.no_grad()
    def maps(self, x: Tensor, margins: Sequence[tuple[Tensor, Tensor]] | None = None) -> list[Tensor]:
        """``x`` ``[B, 1, *grid]`` -> the maps the statistics summarise, ``[B, 1, *grid]`` float32 each: the margins
        (bright, dark) of all scales, then the levels, then the contrasts (``margins``: :func:`margin_maps` of ``x``
        when already computed)."""
        if x.shape[2 + self.axis] < 2:
            raise ValueError(
                f"blob statistics read two halves along axis {self.axis}, and this image has "
                f"{x.shape[2 + self.axis]} voxel(s) there (shape {tuple(x.shape[2:])})"
            )
        x = x.float()
        out: list[Tensor] = []
        if "margins" in self.kinds:
            for pair in margins if margins is not None else margin_maps(x, self.scales):
                out += list(pair)
        if "levels" in self.kinds:
            out += [ceiling_free_levels(x, inner, width) for inner, width in self.scales]
        if "contrast" in self.kinds:
            for inner, width in self.contrast_scales:
                out += list(spot_contrast(x, inner, width))
        return out

    @torch.no_grad()
    def statistics(
        self, x: Tensor, margins: Sequence[tuple[Tensor, Tensor]] | None = None, maps: Sequence[Tensor] | None = None
    ) -> Tensor:
        """``x`` ``[B, 1, *grid]`` -> ``[B, num_statistics]`` in float32: the margins of all scales, then the levels,
        then the contrasts (``margins``: :func:`margin_maps` of ``x``, or ``maps``: :meth:`maps` of ``x``, when
        already computed)."""
        return torch.stack(self._summaries(self.maps(x, margins) if maps is None else maps), dim=1)

    @torch.no_grad()
    def cell_statistics(self, x: Tensor, grid: Sequence[int], maps: Sequence[Tensor] | None = None) -> Tensor:
        """The statistics of each cell of ``grid`` (a partition of the image, :func:`cell_index`), as if the cell were
        its half of the image: ``[B, prod(grid), num_statistics]``, row-major over ``grid``, the columns of
        :meth:`statistics` with NaN in those of the other half (a cell holds nothing of it)."""
        maps = self.maps(x) if maps is None else maps
        size, grid = tuple(int(n) for n in maps[0].shape[2:]), tuple(int(g) for g in grid)
        centres = (np.arange(grid[self.axis]) + 0.5) * size[self.axis] / grid[self.axis]
        in_first = centres < size[self.axis] // 2  # per cell along the axis: it lies in the first half
        first_np = in_first[np.arange(math.prod(grid)) // math.prod(grid[self.axis + 1 :]) % grid[self.axis]]
        first = torch.as_tensor(first_np, device=maps[0].device)
        out = []
        for m in maps:
            top, mean = _cell_top(m.flatten(1), size, grid)
            nan = torch.full_like(top, float("nan"))
            for half in (first, ~first):
                out += [torch.where(half, top, nan), torch.where(half, mean, nan)]
        return torch.stack(out, dim=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.statistics(x)


class BlobStatistics(SpotStatistics):
    """:class:`SpotStatistics` mapped into an embedding residual: ``forward`` returns ``proj(norm(statistics))``
    ``[B, channels]``, zero at the start."""

    def __init__(
        self, channels: int, spatial_dims: int = 3, axis: int = 0, kinds: bool | str | Sequence[str] = True
    ) -> None:
        super().__init__(spatial_dims, axis, kinds)
        self.norm = nn.BatchNorm1d(self.num_statistics)
        self.proj = nn.Linear(self.num_statistics, channels)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def head(self, stats: Tensor) -> Tensor:
        """The embedding residual of :meth:`statistics`' output: ``proj(norm(stats))``, ``[B, channels]``."""
        return self.proj(self.norm(stats))

    def forward(self, x: Tensor, margins: Sequence[tuple[Tensor, Tensor]] | None = None) -> Tensor:  # type: ignore[override]
        return self.head(self.statistics(x, margins))


class SpotMaps(nn.Module):
    """The input's spot margins as two maps into a tower's stem: where the spots are, not only how strong.

    Per voxel the largest bright margin over :data:`BLOB_SCALES` and the largest dark one, each at least 0 (``[B, 2,
    *grid]``, no gradient, nothing fitted), pass a batch norm and a 3-voxel convolution at the stem's stride, whose
    output is added to the stem's (a spot is found already: a small kernel places it, at about a sixth of a 7-voxel
    stem's cost in 3D). The tower's layers can then learn which place makes a spot a finding (a dark spot inside the
    liver, a bright one in a kidney), which the statistics' per-half maxima cannot tell from the spots anatomy makes
    everywhere (fat between organs, gas, vessels). The convolution starts at zero, so a tower built with the maps
    starts as the one without, and a plain backbone checkpoint loads.
    """

    def __init__(self, stem: nn.Module, spatial_dims: int = 3) -> None:
        super().__init__()
        if not isinstance(stem, nn.Conv2d | nn.Conv3d) or stem.weight.ndim != spatial_dims + 2:
            raise ValueError(f"spot maps feed a {spatial_dims}D convolutional stem, not {type(stem).__name__}")
        kernel, padding = tuple(stem.kernel_size), tuple(stem.padding)  # type: ignore[arg-type]
        if any(k % 2 == 0 or p != k // 2 for k, p in zip(kernel, padding, strict=True)):
            raise ValueError(
                f"spot maps need a stem with an odd kernel padded by half of it (its output grid is the maps' at the "
                f"stem's stride), not kernel {kernel} with padding {padding}: set conv1_t_size to an odd number"
            )
        self.scales = blob_scales(spatial_dims)
        self.norm = (nn.BatchNorm3d if spatial_dims == 3 else nn.BatchNorm2d)(2)
        conv = nn.Conv3d if spatial_dims == 3 else nn.Conv2d
        self.conv = conv(2, stem.out_channels, 3, stride=stem.stride, padding=1, bias=False)  # type: ignore[arg-type]
        nn.init.zeros_(self.conv.weight)

    @torch.no_grad()
    def maps(self, x: Tensor, margins: Sequence[tuple[Tensor, Tensor]] | None = None) -> Tensor:
        """``x`` ``[B, 1, *grid]`` -> the largest bright and dark margins per voxel, ``[B, 2, *grid]``, at least 0."""
        pairs = margins if margins is not None else margin_maps(x.float(), self.scales)
        bright = torch.stack([b for b, _ in pairs]).amax(dim=0)
        dark = torch.stack([d for _, d in pairs]).amax(dim=0)
        return torch.cat([bright, dark], dim=1).clamp_min(0.0)

    def forward(self, x: Tensor, margins: Sequence[tuple[Tensor, Tensor]] | None = None) -> Tensor:
        return self.conv(self.norm(self.maps(x, margins)))


def cell_index(size: Sequence[int], grid: Sequence[int]) -> np.ndarray:
    """The cell of ``grid`` that holds each voxel of an image of ``size``, row-major over both, ``[prod(size)]``:
    along each axis voxel ``i`` of ``n`` lies in cell ``floor(i * g / n)`` (cells of equal size, or within a voxel of
    it, whose centres are where an interpolation of the grid onto the image puts them)."""
    if len(size) != len(grid) or any(not 1 <= g <= n for g, n in zip(grid, size, strict=True)):
        raise ValueError(f"a grid {tuple(grid)} of cells does not partition an image of {tuple(size)}")
    index = np.zeros((), dtype=np.int64)
    for n, g in zip(size, grid, strict=True):
        index = index[..., None] * g + np.arange(n) * g // n
    return index.reshape(-1)


@functools.lru_cache(maxsize=8)
def _cell_layout(size: tuple[int, ...], grid: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """``[cells, width]`` the voxels of each cell (padded with ``prod(size)``, one past the last) and ``[cells]`` their
    number: constants, so that an exported graph gathers instead of sorting."""
    cells = cell_index(size, grid)
    sizes = np.bincount(cells, minlength=math.prod(grid))
    order = np.argsort(cells, kind="stable")
    position = np.arange(len(cells)) - (np.cumsum(sizes) - sizes)[cells[order]]
    layout = np.full((len(sizes), int(sizes.max())), len(cells), dtype=np.int64)
    layout[cells[order], position] = order
    return layout, sizes


def _cell_top(values: Tensor, size: tuple[int, ...], grid: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """Per row of ``values`` ``[B, prod(size)]`` and cell of ``grid``, the maximum and the mean of the :data:`TOP_K`
    largest values (fewer in a smaller cell), ``[B, cells]`` each."""
    layout, sizes = _cell_layout(size, grid)
    pad = torch.full_like(values[:, :1], float("-inf"))
    cells = torch.cat([values, pad], dim=1)[:, torch.as_tensor(layout, device=values.device)]  # [B, cells, width]
    top = cells.topk(min(TOP_K, layout.shape[1]), dim=2).values
    count = torch.as_tensor(np.minimum(sizes, TOP_K), dtype=values.dtype, device=values.device)
    return top[..., 0], torch.where(torch.isfinite(top), top, torch.zeros_like(top)).sum(dim=2) / count


def blob_scales(
    spatial_dims: int, scales: Sequence[tuple[Sequence[int], Sequence[int]]] = BLOB_SCALES
) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """``scales`` (:data:`BLOB_SCALES`) for a ``spatial_dims`` image: all of them in 3D, their in-plane sizes (each
    once) in 2D."""
    return list(dict.fromkeys((tuple(i[:spatial_dims]), tuple(w[:spatial_dims])) for i, w in scales))


def margin_maps(x: Tensor, scales: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[tuple[Tensor, Tensor]]:
    """:func:`spot_margins` (bright, dark) of ``x`` at each of ``scales``, without gradient."""
    with torch.no_grad():
        return [spot_margins(x, inner, width) for inner, width in scales]


def blob_kinds(kinds: bool | str | Sequence[str]) -> tuple[str, ...]:
    """``True`` -> the margins; a kind or a list of kinds from :data:`BLOB_KINDS`, each once, in that order."""
    if isinstance(kinds, bool):
        chosen = ["margins"] if kinds else []
    else:
        chosen = [kinds] if isinstance(kinds, str) else list(kinds)
    if not chosen or any(k not in BLOB_KINDS for k in chosen):
        raise ValueError(f"blobs must be true or a list of {', '.join(BLOB_KINDS)}, not {kinds!r}")
    return tuple(k for k in BLOB_KINDS if k in chosen)
