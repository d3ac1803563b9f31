"""The image embedding refitted onto the reports in closed form, after stage 2: the spot statistics at full weight.

Stage 2 learns the map from the image tower (and the spot statistics beside it) to the shared space in a few hundred
steps of a contrastive loss; on a few hundred pairs the statistics' map stays small beside the tower and what it
learns is noisy. After training the refit replaces the global image embedding by a linear map, fitted by ridge
regression on the training pairs, from the trained embedding and the image's fixed spot statistics
(:class:`medvlp.models.blobs.SpotStatistics`) to the embedding of the study's own report::

    e'(x) = [unit(e(x)), (stats(x) - mean) / scale, 1] @ W

No label is read: the targets are the training reports, the ridge strength is chosen on ``val`` by image -> report
R@10 (:func:`medvlp.tasks.image_refit.fit_image_refit`). The model folder stores ``mean``, ``scale`` and ``W`` as
buffers and its config names the statistics' kinds (``image_refit``), so evaluation, the notebooks, the server and the
ONNX image graph all apply it.

With ``cell`` (opt-in, ``image_refit_cell``) the same map also replaces the tower's tokens: the image is cut into
cells of about ``cell`` voxels (:func:`medvlp.models.blobs.cell_index`), and each cell's token is the map of the
image's trained embedding and of the cell's own spot statistics, in the columns of its half, standardised by that
cell's training mean and scale (the anatomy that makes spots in the same place in every image: a renal pelvis, the
spine) and kept where they exceed it (a spot missing from its usual place is no finding there)::

    t'(cell) = [unit(e(x)), max(0, (stats(cell) - mean(cell)) / scale(cell)), 1] @ W

The cells of one image differ in their statistics alone: a phrase's map lights those that stand out of their place's
usual as the statistics that the phrase's reports go with (grounding, the peaks and the side check read them). The
map's first rows were fitted on global embeddings, not on the tower's tokens, which it leaves out. Without ``cell``
the tokens are the tower's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medvlp.models.blobs import SpotStatistics

__all__ = ["ImageRefit", "token_grid"]


class ImageRefit(nn.Module):
    """The refit's statistics and fitted map (an identity map on the embedding until a fit sets them)."""

    def __init__(
        self,
        embed_dim: int,
        spatial_dims: int,
        axis: int,
        kinds: Sequence[str],
        image_size: Sequence[int] | None = None,
        cell: int | None = None,
    ) -> None:
        super().__init__()
        self.spots = SpotStatistics(spatial_dims, axis, list(kinds))
        n = self.spots.num_statistics
        self.embed_dim = int(embed_dim)
        self.register_buffer("mean", torch.zeros(n))
        self.register_buffer("scale", torch.ones(n))
        weight = torch.zeros(embed_dim + n + 1, embed_dim)
        weight[:embed_dim] = torch.eye(embed_dim)
        self.register_buffer("weight", weight)
        self.grid: tuple[int, ...] | None = None
        if cell is not None:
            if image_size is None or len(image_size) != spatial_dims:
                raise ValueError(f"refitted tokens need the model's {spatial_dims}D image size, not {image_size}")
            self.grid = token_grid(image_size, cell)
            cells = math.prod(self.grid)
            self.register_buffer("cell_mean", torch.zeros(cells, n))
            self.register_buffer("cell_scale", torch.ones(cells, n))

    @property
    def num_features(self) -> int:
        """Rows of the map: the embedding, the statistics and a constant."""
        return self.embed_dim + self.spots.num_statistics + 1

    def features(self, images: Tensor, embedding: Tensor) -> Tensor:
        """``[B, num_features]``: the unit embedding, the standardised statistics of ``images`` and a constant 1."""
        return _features(embedding, (self.spots.statistics(images).to(embedding.dtype) - self.mean) / self.scale)

    def set(self, mean: Tensor, scale: Tensor, weight: Tensor) -> None:
        """Store a fit: the statistics' training mean and scale, and the map ``[num_features, embed_dim]``."""
        if tuple(weight.shape) != tuple(self.weight.shape):
            raise ValueError(f"the refit's map is {tuple(weight.shape)}, the model needs {tuple(self.weight.shape)}")
        self.mean.copy_(torch.as_tensor(mean, dtype=self.mean.dtype))
        self.scale.copy_(torch.as_tensor(scale, dtype=self.scale.dtype))
        self.weight.copy_(torch.as_tensor(weight, dtype=self.weight.dtype))

    def set_cells(self, mean: Tensor, scale: Tensor) -> None:
        """Store each cell's training mean and scale of its statistics, ``[cells, num_statistics]`` each."""
        if self.grid is None:
            raise ValueError("this refit has no cells: build it with a cell size")
        self.cell_mean.copy_(torch.as_tensor(mean, dtype=self.cell_mean.dtype))
        self.cell_scale.copy_(torch.as_tensor(scale, dtype=self.cell_scale.dtype))

    def forward(self, images: Tensor, embedding: Tensor) -> Tensor:
        """The refitted global embedding ``[B, E]`` (not unit) of ``images`` whose trained one is ``embedding``."""
        return self.features(images, embedding) @ self.weight.to(embedding.dtype)

    def refit(
        self, images: Tensor, embedding: Tensor, tokens: Tensor, grid: Sequence[int]
    ) -> tuple[Tensor, Tensor, tuple[int, ...]]:
        """The refitted embedding ``[B, E]`` and, with cells, the refitted tokens ``[B, cells, E]`` on the cells'
        grid (the tower's ``tokens`` are not read then), else ``tokens`` on ``grid``; the statistics' maps computed
        once; none of them unit."""
        maps = self.spots.maps(images)
        stats = (self.spots.statistics(images, maps=maps).to(embedding.dtype) - self.mean) / self.scale
        weight = self.weight.to(embedding.dtype)
        refitted = _features(embedding, stats) @ weight
        if self.grid is None:
            return refitted, tokens, tuple(grid)
        cells = self.spots.cell_statistics(images, self.grid, maps=maps).to(embedding.dtype)
        z = torch.nan_to_num((cells - self.cell_mean) / self.cell_scale, nan=0.0).clamp(min=0.0)
        context = embedding[:, None].expand(-1, z.shape[1], -1)  # the image's embedding in every cell
        return refitted, _features(context, z) @ weight, self.grid


def token_grid(image_size: Sequence[int], cell: int) -> tuple[int, ...]:
    """The grid of cells of about ``cell`` voxels across an image of ``image_size`` (at least one, at most a voxel)."""
    return tuple(max(1, min(int(n), round(int(n) / int(cell)))) for n in image_size)


def _features(embedding: Tensor, stats: Tensor) -> Tensor:
    """``[..., E + S + 1]``: the unit ``embedding``, the standardised ``stats`` and a constant 1."""
    ones = torch.ones(*embedding.shape[:-1], 1, dtype=embedding.dtype, device=embedding.device)
    return torch.cat([F.normalize(embedding, dim=-1), stats, ones], dim=-1)
