"""MONAI's ResNet as an image tower (2D or 3D, MedicalNet layout), with the heads that read its stages.

A feature pyramid for finer grounding tokens (``token_stage``), a laterality moment, and fixed spot statistics of the
input (:mod:`medvlp.models.blobs`): beside the embedding as numbers (``blobs``), or into the stem as maps
(``spot_maps``). Every head starts at zero, so a tower built with one starts as the one without and loads a plain
backbone checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets.resnet import ResNet, ResNetBlock, ResNetBottleneck
from torch import Tensor, nn

from medvlp.models.blobs import BlobStatistics, SpotMaps, margin_maps
from medvlp.models.image import ImageEncoder, ImageEncoderOutput, flatten_map, maybe_checkpoint
from medvlp.models.pooling import GLOBAL_POOLS, LateralityMoment, global_pool

__all__ = ["MonaiResNetEncoder"]


_RESNET_LAYOUTS: dict[int, tuple[type[nn.Module], list[int]]] = {
    10: (ResNetBlock, [1, 1, 1, 1]),
    18: (ResNetBlock, [2, 2, 2, 2]),
    34: (ResNetBlock, [3, 4, 6, 3]),
    50: (ResNetBottleneck, [3, 4, 6, 3]),
    101: (ResNetBottleneck, [3, 4, 23, 3]),
    152: (ResNetBottleneck, [3, 8, 36, 3]),
}


class MonaiResNetEncoder(ImageEncoder):
    """MONAI's ResNet (2D or 3D, MedicalNet layout); tokens from the last stage (or ``token_stage``), embedding the
    last stage's pool.

    ``global_pool`` (``avg`` by default, ``max``, ``avgmax``) makes the embedding: a small lesion fills one token of
    the last stage, so its signal survives a maximum over the tokens, where a mean over them dilutes it.

    ``token_stage`` (4 by default, 3 or 2) takes the tokens from a finer stage merged top-down with the deeper ones
    (FPN: the deeper map upsampled, plus a 1 x 1 lateral of the finer stage), each step halving the token size so that
    a lesion can have a token of its own. The laterals start at zero (the tokens are then the last stage's, repeated);
    the embedding stays the last stage's pool, so only what reads tokens trains them (the phrase-box and local terms,
    SimMIM). They are heads (``head_prefixes``): never locked, not expected in a backbone checkpoint.

    ``laterality=True`` adds a :class:`LateralityMoment` of the last stage along ``laterality_axis`` (0: the L/R
    axis of an RAS cache) to the embedding, a head as the laterals are; ``blobs=True`` adds the input's
    :class:`~medvlp.models.blobs.BlobStatistics` (fixed spot margins per half along that axis; a list of kinds adds
    spot levels), a head too; ``spot_maps=True`` adds the input's :class:`~medvlp.models.blobs.SpotMaps` (the spot
    margins as maps) to the stem's output, a head as well. ``tower_drop`` (0 by default) drops the tower's pooled
    embedding for that fraction of the training samples (drop path on a branch, the kept ones scaled up), so that the
    heads beside it (the spot statistics; the laterality head still reads the tower's map, and the tokens are never
    dropped) must carry those samples and are not drowned by a tower that memorises a few hundred series;
    evaluation always uses both. The statistics' map is also returned alone (``ImageEncoderOutput.branch``), so that
    stage 2 can align it with the reports by itself (``branch_weight``).
    """

    def __init__(
        self,
        spatial_dims: int,
        image_size: Sequence[int],
        depth: int = 18,
        block_inplanes: Sequence[int] = (64, 128, 256, 512),
        conv1_t_size: int = 7,
        conv1_t_stride: int = 2,
        no_max_pool: bool = False,
        shortcut_type: str = "B",
        bias_downsample: bool = False,
        widen_factor: float = 1.0,
        global_pool: str = "avg",
        token_stage: int = 4,
        laterality: bool = False,
        laterality_axis: int = 0,
        blobs: bool | str | Sequence[str] = False,
        spot_maps: bool = False,
        tower_drop: float = 0.0,
    ) -> None:
        super().__init__(spatial_dims, image_size)
        if token_stage not in (2, 3, 4):
            raise ValueError(f"token_stage must be 2, 3 or 4 (the last stage), got {token_stage!r}")
        if not 0.0 <= tower_drop < 1.0:
            raise ValueError(f"tower_drop is a probability below 1, got {tower_drop!r}")
        self.tower_drop = float(tower_drop)
        if global_pool not in GLOBAL_POOLS:
            raise ValueError(f"unknown global_pool {global_pool!r}; choose one of {', '.join(GLOBAL_POOLS)}")
        self.global_pool = global_pool
        if depth not in _RESNET_LAYOUTS:
            raise ValueError(f"unsupported ResNet depth {depth}; choose one of {sorted(_RESNET_LAYOUTS)}")
        block, layers = _RESNET_LAYOUTS[depth]
        self.backbone = ResNet(
            block=block,
            layers=layers,
            block_inplanes=list(block_inplanes),
            spatial_dims=spatial_dims,
            n_input_channels=1,
            conv1_t_size=conv1_t_size,
            conv1_t_stride=conv1_t_stride,
            no_max_pool=no_max_pool,
            shortcut_type=shortcut_type,
            bias_downsample=bias_downsample,
            widen_factor=widen_factor,
            feed_forward=False,
        )
        self.embed_dim = self.token_dim = int(int(block_inplanes[3] * widen_factor) * block.expansion)
        self.token_stage = token_stage
        conv = nn.Conv3d if spatial_dims == 3 else nn.Conv2d
        widths = [int(int(w * widen_factor) * block.expansion) for w in block_inplanes]
        self.laterals = nn.ModuleDict(
            {str(s): conv(widths[s - 1], self.token_dim, kernel_size=1) for s in range(token_stage, 4)}
        )
        for lateral in self.laterals.values():
            nn.init.zeros_(lateral.weight)
            nn.init.zeros_(lateral.bias)
        self.head_prefixes = ("laterals.",) if len(self.laterals) else ()
        self.laterality: LateralityMoment | None = None
        if laterality:
            self.laterality = LateralityMoment(self.embed_dim, laterality_axis, spatial_dims)
            self.head_prefixes = (*self.head_prefixes, "laterality.")
        self.blobs: BlobStatistics | None = None
        if blobs:
            self.blobs = BlobStatistics(self.embed_dim, spatial_dims, laterality_axis, kinds=blobs)
            self.head_prefixes = (*self.head_prefixes, "blobs.")
            self.has_branch = True
        self.spot_maps: SpotMaps | None = None
        if spot_maps:
            self.spot_maps = SpotMaps(self.backbone.conv1, spatial_dims)
            self.head_prefixes = (*self.head_prefixes, "spot_maps.")

    def _forward(self, x: Tensor) -> ImageEncoderOutput:
        net = self.backbone
        # the full-resolution margins, computed once and freed before the tower runs (only summaries are kept)
        margins = margin_maps(x.float(), self.spot_maps.scales) if self.spot_maps is not None else None
        stats = self.blobs.statistics(x, margins) if self.blobs is not None else None
        h = net.conv1(x)
        if self.spot_maps is not None:
            h = h + self.spot_maps(x, margins)
        del margins
        h = net.act(net.bn1(h))
        if not net.no_max_pool:
            h = net.maxpool(h)
        stages = []
        for stage in (net.layer1, net.layer2, net.layer3, net.layer4):
            h = maybe_checkpoint(self.grad_checkpointing, stage, h)
            stages.append(h)
        last, _ = flatten_map(h)  # [B, N, C]
        embedding = global_pool(last, self.global_pool)
        if self.training and self.tower_drop > 0:  # drop path on the tower's branch, one draw per sample
            keep = torch.rand(embedding.shape[0], 1, device=embedding.device) >= self.tower_drop
            embedding = embedding * keep.to(embedding.dtype) / (1.0 - self.tower_drop)
        if self.laterality is not None:
            embedding = embedding + self.laterality(h)
        branch = self.blobs.head(stats) if self.blobs is not None and stats is not None else None
        if branch is not None:
            embedding = embedding + branch
        for s in range(3, self.token_stage - 1, -1):  # top-down: upsample, add the finer stage's lateral
            finer = stages[s - 1]
            h = nn.functional.interpolate(h, size=finer.shape[2:], mode="nearest") + self.laterals[str(s)](finer)
        tokens, grid = flatten_map(h)  # [B, N, C] on the token stage's grid
        return ImageEncoderOutput(embedding=embedding, tokens=tokens, grid=grid, branch=branch)

    def _group_prefixes(self) -> list[tuple[str, ...]]:
        stages = [(f"backbone.layer{i}.",) for i in range(1, 4)]
        return [
            ("backbone.conv1.", "backbone.bn1.", "spot_maps."),
            *stages,
            ("backbone.layer4.", "laterals.", "laterality.", "blobs."),
        ]
