"""Stage 1, images: self-supervised pretraining of the image tower, 2D and 3D, CNN or transformer.

Two methods:
- ``simmim`` (masked image modelling, as SimMIM): random blocks of the input are blanked and a linear
  head predicts their voxels from the token (patch) features; L1 on the blanked voxels only. It needs
  nothing but the encoder's token grid, so it serves ViTs, Swin and CNNs alike, in 2D and 3D, and it
  trains the very tokens that phrase grounding uses later.
- ``simclr``: two strongly augmented views (MONAI transforms) of each image, InfoNCE between views.
``benchmarks/bench_ssl.py`` compares both with no pretraining by a linear probe on frozen embeddings.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import Dataset

from medvlp.config import ImageStageConfig, Interpolation
from medvlp.data.cache import CachedCohort
from medvlp.losses import clip_loss
from medvlp.train.data import CachedImages, collate, mask_generators
from medvlp.train.runtime import mean_over_ranks


def block_mask(
    shape: tuple[int, ...], block: int, ratio: float, generator: torch.Generator | Sequence[torch.Generator]
) -> torch.Tensor:
    """``[B, 1, *spatial]`` float mask, 1 where blanked: a ``ratio`` share of ``block``-sized cells.

    ``generator``: one for the whole batch, or one per sample (then each sample's mask depends on its own
    generator alone, whatever else is in the batch).
    """
    b, spatial = shape[0], shape[2:]
    cells = [math.ceil(s / block) for s in spatial]
    n = math.prod(cells)
    keep = max(1, round(ratio * n))
    if isinstance(generator, torch.Generator):
        scores = torch.rand(b, n, generator=generator)
    else:
        if len(generator) != b:
            raise ValueError(f"{len(generator)} generators for a batch of {b}")
        scores = torch.stack([torch.rand(n, generator=g) for g in generator])  # [B, n]
    idx = scores.argsort(dim=1)[:, :keep]
    m = torch.zeros(b, n)
    m.scatter_(1, idx, 1.0)
    m = m.view(b, 1, *cells)
    for axis, _ in enumerate(spatial):
        m = m.repeat_interleave(block, dim=2 + axis)
    return m[(slice(None), slice(None), *[slice(0, s) for s in spatial])]


class SimMIM(nn.Module):
    """Encoder + a linear head from each token to the voxels of its cell."""

    def __init__(self, encoder: nn.Module, image_size: tuple[int, ...]) -> None:
        super().__init__()
        self.encoder = encoder
        self.image_size = tuple(image_size)
        with torch.no_grad():
            was = encoder.training
            encoder.eval()
            grid = encoder(torch.zeros(1, 1, *self.image_size)).grid
            encoder.train(was)
        self.grid = tuple(grid)
        self.cell = tuple(math.ceil(s / g) for s, g in zip(self.image_size, self.grid, strict=True))
        self.head = nn.Linear(encoder.token_dim, math.prod(self.cell))
        self.mask_value = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, mask: torch.Tensor, denominator: torch.Tensor | None = None) -> torch.Tensor:
        """Mean L1 error over the blanked voxels; ``denominator`` replaces their count (see ``mean_over_ranks``)."""
        x_in = x * (1 - mask) + self.mask_value * mask
        tokens = self.encoder(x_in).tokens  # [B, N, C], N = prod(grid), in (X, Y[, Z]) order
        pred = self.head(tokens)  # [B, N, prod(cell)]
        d = len(self.grid)
        b = x.shape[0]
        pred = pred.view(b, *self.grid, *self.cell)
        # interleave grid and cell axes: [B, g1, c1, g2, c2, ...] -> image
        perm = [0] + [a for i in range(d) for a in (1 + i, 1 + d + i)]
        img = pred.permute(*perm).reshape(b, 1, *[g * c for g, c in zip(self.grid, self.cell, strict=True)])
        img = img[(slice(None), slice(None), *[slice(0, s) for s in self.image_size])]
        err = (img - x).abs() * mask
        return err.sum() / (mask.sum() if denominator is None else denominator).clamp_min(1.0)


class SimCLR(nn.Module):
    """Encoder + a projection MLP; InfoNCE between two views of each image."""

    def __init__(self, encoder: nn.Module, temperature: float, dim: int = 128) -> None:
        super().__init__()
        self.encoder = encoder
        self.temperature = temperature
        e = encoder.embed_dim
        self.proj = nn.Sequential(nn.Linear(e, e), nn.GELU(), nn.Linear(e, dim))

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        za = F.normalize(self.proj(self.encoder(a).embedding), dim=-1)
        zb = F.normalize(self.proj(self.encoder(b).embedding), dim=-1)
        return clip_loss(za, zb, torch.tensor(1.0 / self.temperature, device=za.device))


class ImageStage:
    """Self-supervised pretraining of the image encoder on every training image, image-only studies included."""

    name = "stage1-image"

    def __init__(
        self,
        cfg: ImageStageConfig,
        cache: CachedCohort,
        encoder: nn.Module,
        seed: int,
        interpolation: Interpolation = "bilinear",
    ) -> None:
        self.config, self.cache, self.encoder, self.seed = cfg, cache, encoder, seed
        self.interpolation = interpolation
        size = tuple(cache.summary["preprocess"]["size"])
        if cfg.method == "simmim":
            self.net: nn.Module = SimMIM(encoder, size)
        else:
            self.net = SimCLR(encoder, cfg.temperature)

    def module(self) -> nn.Module:
        return self.net

    def dataset(self) -> Dataset:
        views = 2 if self.config.method == "simclr" else 1
        strong = self.config.method == "simclr"  # every training image: the pairs' and the image-only studies'
        return CachedImages(
            self.cache,
            "train",
            views=views,
            strong=strong,
            seed=self.seed,
            need=("image",),
            interpolation=self.interpolation,
        )

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        return collate(items)

    def training_forward(self, module: nn.Module, batch: dict[str, Any], step: int) -> dict[str, torch.Tensor]:
        if self.config.method == "simclr":
            a, b = batch["views"]
            return {"loss": module(a, b)}
        x = batch["image"]
        gens = mask_generators(self.seed, step, batch["index"].tolist())
        mask = block_mask(tuple(x.shape), self.config.mask_patch, self.config.mask_ratio, gens).to(x.device)
        return {"loss": module(x, mask, mean_over_ranks(mask.sum()))}

    def save_final(self, out_dir: Path) -> None:
        """The encoder's weights alone, loadable by ``create_image_encoder(..., checkpoint=...)``."""
        state = {k: v.detach().contiguous().cpu() for k, v in self.encoder.state_dict().items()}
        save_file(state, str(out_dir / "image_encoder.safetensors"))
