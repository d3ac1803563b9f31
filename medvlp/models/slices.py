"""The 2.5D image tower: a timm 2D backbone over the axial slices (or slabs) of a volume, with shared weights.

A volume ``[B, 1, X, Y, Z]`` becomes ``B * Z'`` slabs of ``slab`` neighbouring axial slices, stacked as channels
(``Z' = ceil(Z / slice_stride)``; the volume is edge-padded along ``Z`` so every slab is centred on its slice). The
2D backbone encodes every slab; the per-slab embeddings are pooled across slices (learned attention or max) into the
volume's embedding, and the per-slab feature maps keep their slice index, so the tokens form an ``(X', Y', Z')``
grid in the input's axis order and grounding works as with a 3D tower.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from monai.utils import look_up_option
from torch import Tensor, nn

from medvlp.models.image import ImageEncoder, ImageEncoderOutput, TimmImageEncoder

logger = logging.getLogger(__name__)

__all__ = ["SliceImageEncoder"]

POOLINGS = ("attention", "max")


class SliceImageEncoder(ImageEncoder):
    """2.5D tower: a timm 2D backbone over axial slabs with shared weights, pooled across slices (3D only).

    Args:
        spatial_dims: must be 3.
        image_size: ``(X, Y, Z)``.
        model_name: a timm architecture (any of ``timm.list_models()``).
        slab: neighbouring axial slices given to the backbone as channels (odd, >= 1).
        slice_stride: encode every ``slice_stride``-th slice (``Z' = ceil(Z / slice_stride)``).
        pooling: ``"attention"`` (a learned score per slice, softmax over slices) or ``"max"``.
        **timm_kwargs: passed to ``timm.create_model`` (e.g. ``output_stride=16`` for finer in-plane tokens).
    """

    def __init__(
        self,
        spatial_dims: int,
        image_size: Sequence[int],
        model_name: str,
        slab: int = 1,
        slice_stride: int = 1,
        pooling: str = "attention",
        **timm_kwargs: Any,
    ) -> None:
        if spatial_dims != 3:
            raise ValueError(f"the 2.5D slice tower takes 3D volumes only, not spatial_dims={spatial_dims}")
        super().__init__(3, image_size)
        if int(slab) < 1 or int(slab) % 2 == 0:
            raise ValueError(f"slab must be an odd number of slices (1, 3, 5...), got {slab}")
        if int(slice_stride) < 1:
            raise ValueError(f"slice_stride must be at least 1, got {slice_stride}")
        self.slab, self.slice_stride = int(slab), int(slice_stride)
        self.pooling = look_up_option(pooling, POOLINGS)
        if "in_chans" in timm_kwargs:
            raise ValueError("the slice tower sets the backbone's in_chans from slab; do not pass in_chans")
        # the 2D tower builds the backbone (name checks, no downloads) and knows how to read its features
        self.slices = TimmImageEncoder(model_name, self.image_size[:2], in_chans=self.slab, **timm_kwargs)
        self.fixed_size = self.slices.fixed_size
        self.embed_dim, self.token_dim = self.slices.embed_dim, self.slices.token_dim
        # attention pooling: one score per slice from its embedding (no bias: softmax ignores a constant)
        self.slice_score = nn.Linear(self.embed_dim, 1, bias=False) if self.pooling == "attention" else None
        self.head_norm = nn.LayerNorm(self.embed_dim)

    @property
    def static_grid(self) -> tuple[int, ...] | None:
        return self.slices.static_grid  # the in-plane grid of the shared 2D backbone (position embeddings)

    def _slabs(self, x: Tensor) -> Tensor:
        """``[B, 1, X, Y, Z]`` -> ``[B * Z', slab, X, Y]`` (edge-padded along Z, one slab per kept slice)."""
        r = self.slab // 2
        v = x[:, 0]  # [B, X, Y, Z]
        if r:
            v = torch.cat([v[..., :1].expand(*v.shape[:-1], r), v, v[..., -1:].expand(*v.shape[:-1], r)], dim=-1)
        v = v.unfold(-1, self.slab, 1)[..., :: self.slice_stride, :]  # [B, X, Y, Z', slab]
        b, nx, ny, nz, k = v.shape
        return v.permute(0, 3, 4, 1, 2).reshape(b * nz, k, nx, ny)

    def _forward(self, x: Tensor) -> ImageEncoderOutput:
        batch = x.shape[0]
        slabs = self._slabs(x)  # [B * Z', slab, X, Y]
        nz = slabs.shape[0] // batch
        out = self.slices._forward(slabs)  # shared weights over every slab
        if len(out.grid) != 2:
            raise ValueError(
                f"timm model {self.slices.model_name} gives no 2D token grid ({out.grid}); the slice tower needs one"
            )
        gx, gy = out.grid
        tokens = out.tokens.reshape(batch, nz, gx, gy, -1).permute(0, 2, 3, 1, 4)  # [B, X', Y', Z', C]
        tokens = tokens.reshape(batch, gx * gy * nz, -1)  # row-major over (X', Y', Z')
        per_slice = out.embedding.reshape(batch, nz, -1)  # [B, Z', D]
        if self.slice_score is not None:
            weights = F.softmax(self.slice_score(per_slice), dim=1)  # [B, Z', 1]
            pooled = (weights * per_slice).sum(dim=1)
        else:
            pooled = per_slice.amax(dim=1)
        return ImageEncoderOutput(embedding=self.head_norm(pooled), tokens=tokens, grid=(gx, gy, nz))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        super().set_grad_checkpointing(enable)
        self.slices.set_grad_checkpointing(enable)

    def layer_groups(self) -> list[list[str]]:
        groups = [[f"slices.{n}" for n in g] for g in self.slices.layer_groups()]
        own = [n for n, _ in self.named_parameters() if not n.startswith("slices.")]
        return [*groups[:-1], [*(groups[-1] if groups else []), *own]]
