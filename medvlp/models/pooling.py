"""Global pooling heads of the image towers that keep *where* in the embedding.

A mean-pooled CNN embedding is nearly blind to position: a left and a right pleural effusion give almost the same
vector, and no text can tell them apart. Two heads put position back, each a residual on the tower's pool:

- :class:`PositionalAttentionPool`: CLIP's attention pool with learned absolute positions (timm's
  :class:`~timm.layers.AttentionPool2d`), the pool itself or a zero-initialised residual on the mean;
- :class:`LateralityMoment`: the feature map's first moment across the patient's left-right axis, through a
  zero-initialised linear map: the embedding says on which side each feature lies, linearly, from the first step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["GLOBAL_POOLS", "LateralityMoment", "PositionalAttentionPool", "global_pool"]


#: How a token map becomes the global embedding (timm's names): the mean, the maximum, or their average.
GLOBAL_POOLS = ("avg", "max", "avgmax")


def global_pool(tokens: Tensor, kind: str) -> Tensor:
    """Pool tokens ``[B, N, C]`` over ``N`` into ``[B, C]``: ``avg``, ``max`` or ``avgmax`` (their mean, as timm)."""
    if kind == "avg":
        return tokens.mean(dim=1)
    if kind == "max":
        return tokens.amax(dim=1)
    if kind == "avgmax":
        return 0.5 * (tokens.mean(dim=1) + tokens.amax(dim=1))
    raise ValueError(f"unknown global_pool {kind!r}; choose one of {', '.join(GLOBAL_POOLS)}")


class PositionalAttentionPool(nn.Module):
    """Attention pooling of a feature map with learned absolute positions, so the embedding says *where*.

    CLIP's ResNets end in an attention pool whose keys and values carry a position embedding (timm's
    :class:`~timm.layers.AttentionPool2d`, used here as is). Two ways to use it:

    - ``attn``: the pool *is* the embedding; its tokens for grounding are MaskCLIP's dense features (each position's
      value, feature plus position, through the same output projection), so they live in the embedding's space and
      the shared projection head fits both.
    - ``avgattn``: the mean of the feature map plus the pool as a residual whose output projection starts at zero, so
      the tower starts as the mean pool and learns what position adds; the tokens stay the feature map's own, in the
      mean's space, as grounding reads them without the pool.
    """

    MODES = ("attn", "avgattn")

    def __init__(self, channels: int, grid: Sequence[int], mode: str = "attn") -> None:
        super().__init__()
        from timm.layers import AttentionPool2d

        if mode not in self.MODES:
            raise ValueError(f"unknown attention pool mode {mode!r}; choose one of {', '.join(self.MODES)}")
        self.mode = mode
        heads = max(1, channels // 64) if channels % 64 == 0 else 1
        self.pool = AttentionPool2d(channels, tuple(grid), num_heads=heads, qkv_separate=True)
        if mode == "avgattn":
            nn.init.zeros_(self.pool.proj.weight)
            nn.init.zeros_(self.pool.proj.bias)

    def forward(self, feats: Tensor) -> tuple[Tensor, Tensor]:
        """``[B, C, H, W]`` -> (embedding ``[B, C]``, tokens ``[B, H * W, C]``)."""
        from timm.layers import resample_abs_pos_embed

        pool = self.pool
        raw = feats.flatten(2).transpose(1, 2)
        if self.mode == "avgattn":
            return raw.mean(dim=1) + pool(feats), raw
        pos = resample_abs_pos_embed(
            pool.pos_embed.unsqueeze(0), tuple(feats.shape[2:]), old_size=pool.feat_size, num_prefix_tokens=1
        )
        return pool(feats), pool.proj(pool.v(raw + pos[:, 1:]))


class LateralityMoment(nn.Module):
    """Where each feature lies across the patient's left-right axis, as a residual for the global embedding.

    The feature map is weighted by the position along ``axis`` (the spatial axis that runs across the patient: axis 0
    of a cached radiograph or of an RAS volume), from -1 at one edge to +1 at the other, averaged over the grid, and
    mapped by a linear layer that starts at zero. A post-activation CNN map is non-negative, so a feature on one side
    gives a moment of one sign and on the other side of the other sign: a text that names a side can read it along a
    straight line. Added to a mean pool it starts as that pool (the zero map) and any grid size works (the weights
    are made for the map at hand), so an export or a larger image needs nothing fixed.
    """

    def __init__(self, channels: int, axis: int = 0, spatial_dims: int = 2) -> None:
        super().__init__()
        if not 0 <= axis < spatial_dims:
            raise ValueError(f"laterality_axis must be a spatial axis of a {spatial_dims}D image, not {axis}")
        self.axis = int(axis)
        self.proj = nn.Linear(channels, channels)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def moment(self, feats: Tensor) -> Tensor:
        """``[B, C, *grid]`` -> the first moment ``[B, C]`` along ``axis``, positions scaled to [-1, 1]."""
        dim = 2 + self.axis
        n = feats.shape[dim]
        coord = torch.linspace(-1.0, 1.0, n, device=feats.device, dtype=feats.dtype) if n > 1 else feats.new_zeros(1)
        shape = [1] * feats.ndim
        shape[dim] = n
        return (feats * coord.view(shape)).flatten(2).mean(dim=2)

    def forward(self, feats: Tensor) -> Tensor:
        return self.proj(self.moment(feats))
