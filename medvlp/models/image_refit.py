"""The image embedding refitted onto the reports in closed form, after stage 2: the spot statistics at full weight.

Stage 2 learns the map from the image tower (and the spot statistics beside it) to the shared space in a few hundred
steps of a contrastive loss; on a few hundred pairs the statistics' map stays small beside the tower and what it
learns is noisy. After training the refit replaces the global image embedding by a linear map, fitted by ridge
regression on the training pairs, from the trained embedding and the image's fixed spot statistics
(:class:`medvlp.models.blobs.SpotStatistics`) to the embedding of the study's own report::

    e'(x) = [unit(e(x)), (stats(x) - mean) / scale, 1] @ W

No label is read: the targets are the training reports, the ridge strength is chosen on ``val`` by image -> report
R@10 (:func:`medvlp.tasks.image_refit.fit_image_refit`). The tokens are not changed (grounding and the side check read
them as before). The model folder stores ``mean``, ``scale`` and ``W`` as buffers and its config names the statistics'
kinds (``image_refit``), so evaluation, the notebooks, the server and the ONNX image graph all apply it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medvlp.models.blobs import SpotStatistics

__all__ = ["ImageRefit"]


class ImageRefit(nn.Module):
    """The refit's statistics and fitted map (an identity map on the embedding until a fit sets them)."""

    def __init__(self, embed_dim: int, spatial_dims: int, axis: int, kinds: Sequence[str]) -> None:
        super().__init__()
        self.spots = SpotStatistics(spatial_dims, axis, list(kinds))
        n = self.spots.num_statistics
        self.embed_dim = int(embed_dim)
        self.register_buffer("mean", torch.zeros(n))
        self.register_buffer("scale", torch.ones(n))
        weight = torch.zeros(embed_dim + n + 1, embed_dim)
        weight[:embed_dim] = torch.eye(embed_dim)
        self.register_buffer("weight", weight)

    @property
    def num_features(self) -> int:
        """Rows of the map: the embedding, the statistics and a constant."""
        return self.embed_dim + self.spots.num_statistics + 1

    def features(self, images: Tensor, embedding: Tensor) -> Tensor:
        """``[B, num_features]``: the unit embedding, the standardised statistics of ``images`` and a constant 1."""
        stats = (self.spots.statistics(images).to(embedding.dtype) - self.mean) / self.scale
        ones = torch.ones(embedding.shape[0], 1, dtype=embedding.dtype, device=embedding.device)
        return torch.cat([F.normalize(embedding, dim=-1), stats, ones], dim=1)

    def set(self, mean: Tensor, scale: Tensor, weight: Tensor) -> None:
        """Store a fit: the statistics' training mean and scale, and the map ``[num_features, embed_dim]``."""
        if tuple(weight.shape) != tuple(self.weight.shape):
            raise ValueError(f"the refit's map is {tuple(weight.shape)}, the model needs {tuple(self.weight.shape)}")
        self.mean.copy_(torch.as_tensor(mean, dtype=self.mean.dtype))
        self.scale.copy_(torch.as_tensor(scale, dtype=self.scale.dtype))
        self.weight.copy_(torch.as_tensor(weight, dtype=self.weight.dtype))

    def forward(self, images: Tensor, embedding: Tensor) -> Tensor:
        """The refitted global embedding ``[B, E]`` (not unit) of ``images`` whose trained one is ``embedding``."""
        return self.features(images, embedding) @ self.weight.to(embedding.dtype)
