"""Image towers: one small interface over timm (2D) and MONAI (2D/3D) backbones.

Every encoder takes a one-channel image ``[B, 1, X, Y]`` or ``[B, 1, X, Y, Z]`` and returns an
:class:`ImageEncoderOutput` with a global embedding and the patch/voxel tokens of its last stage (or, for the MONAI
ResNet's ``token_stage``, of a finer stage merged with the deeper ones), laid out on a token grid in the input's axis
order. Encoders are registered and built by name in :mod:`medvlp.models.registry`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import timm
import torch
from monai.networks.nets import ViT
from monai.networks.nets.swin_unetr import SwinTransformer
from monai.utils import look_up_option
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from medvlp.models.pooling import GLOBAL_POOLS, LateralityMoment, PositionalAttentionPool, global_pool

logger = logging.getLogger(__name__)

__all__ = [
    "GLOBAL_POOLS",
    "ImageEncoder",
    "ImageEncoderOutput",
    "MonaiSwinEncoder",
    "MonaiViTEncoder",
    "PositionalAttentionPool",
    "TimmImageEncoder",
    "flatten_map",
    "global_pool",
    "maybe_checkpoint",
]


@dataclass
class ImageEncoderOutput:
    """What an image encoder returns.

    Attributes:
        embedding: global image embedding, ``[B, embed_dim]``.
        tokens: patch/voxel tokens of the last stage (or the ``token_stage`` of a pyramid), ``[B, N, token_dim]``,
            flattened row-major over ``grid``.
        grid: token grid in the input's axis order ``(X, Y[, Z])``; ``prod(grid) == N``.
        branch: the part of ``embedding`` that a fixed head adds on its own (the spot statistics' map), ``[B,
            embed_dim]``, for a term that aligns it alone (``branch_weight``); None for a tower without one.
    """

    embedding: Tensor  # [B, embed_dim]
    tokens: Tensor  # [B, N, token_dim]
    grid: tuple[int, ...]
    branch: Tensor | None = None


class ImageEncoder(nn.Module):
    """Base class of all image towers.

    Attributes:
        spatial_dims: 2 or 3.
        image_size: the input size given at construction, ``(X, Y[, Z])``.
        embed_dim: width of ``ImageEncoderOutput.embedding``.
        token_dim: width of ``ImageEncoderOutput.tokens``.
        fixed_size: True when the input must have exactly ``image_size`` (learned position embeddings).
        num_prefix_tokens: prefix (class/register) positions in the backbone's position embedding.
        head_prefixes: parameter-name prefixes of the tower's own new heads (a token pyramid's laterals): a backbone
            checkpoint need not hold them (a strict load does not miss them) and ``lock`` leaves them trainable, as
            the projections on top of a locked tower.
        has_branch: whether ``ImageEncoderOutput.branch`` is set (a head that can be aligned on its own).
    """

    fixed_size: bool = False
    num_prefix_tokens: int = 0

    def __init__(self, spatial_dims: int, image_size: Sequence[int]) -> None:
        super().__init__()
        self.spatial_dims = int(spatial_dims)
        self.image_size = tuple(int(s) for s in image_size)
        self.embed_dim = 0
        self.token_dim = 0
        self.grad_checkpointing = False
        self.unused_parameters: set[str] = set()  # kept for checkpoint compatibility, frozen, never unlocked
        self.head_prefixes: tuple[str, ...] = ()
        self.has_branch = False

    @property
    def static_grid(self) -> tuple[int, ...] | None:
        """Token grid at ``image_size`` for fixed-size encoders (used to resample position embeddings)."""
        return None

    def forward(self, x: Tensor) -> ImageEncoderOutput:
        """Encode ``x`` ``[B, 1, X, Y(, Z)]``."""
        if x.ndim != self.spatial_dims + 2 or x.shape[1] != 1:
            raise ValueError(
                f"{type(self).__name__} expects a [B, 1, {', '.join('XYZ'[: self.spatial_dims])}] tensor, "
                f"got shape {tuple(x.shape)}"
            )
        if self.fixed_size and tuple(x.shape[2:]) != self.image_size:
            raise ValueError(
                f"{type(self).__name__} was built for image_size {self.image_size} and cannot take an image of "
                f"size {tuple(x.shape[2:])}; resize the input or rebuild the encoder with that image_size"
            )
        return self._forward(x)

    def _forward(self, x: Tensor) -> ImageEncoderOutput:
        raise NotImplementedError

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute activations in the backward pass to save memory."""
        self.grad_checkpointing = enable

    def _group_prefixes(self) -> list[tuple[str, ...]]:
        """Parameter-name prefixes of each layer group, from input to output."""
        return [("",)]

    def layer_groups(self) -> list[list[str]]:
        """Parameter names grouped from input (stem) to output (last stage and head)."""
        prefixes = self._group_prefixes()
        groups: list[list[str]] = [[] for _ in prefixes]
        for name, _ in self.named_parameters():
            idx = next((i for i, ps in enumerate(prefixes) if any(name.startswith(p) for p in ps)), len(groups) - 1)
            groups[idx].append(name)
        return [g for g in groups if g]

    def lock(self, unlocked_groups: int = 0) -> None:
        """Freeze all parameters except those of the last ``unlocked_groups`` layer groups and the heads."""
        groups = self.layer_groups()
        n_locked = max(len(groups) - max(unlocked_groups, 0), 0)
        params = dict(self.named_parameters())
        for i, group in enumerate(groups):
            for name in group:
                trainable = i >= n_locked or name.startswith(self.head_prefixes)
                params[name].requires_grad_(trainable and name not in self.unused_parameters)


def maybe_checkpoint(enabled: bool, fn: nn.Module, x: Tensor) -> Tensor:
    """``fn(x)``, recomputed in the backward pass (activation checkpointing) when ``enabled`` and training."""
    if enabled and torch.is_grad_enabled():
        return checkpoint(fn, x, use_reentrant=False)
    return fn(x)


def flatten_map(feats: Tensor) -> tuple[Tensor, tuple[int, ...]]:
    """``[B, C, *grid]`` -> tokens ``[B, prod(grid), C]`` and the grid."""
    return feats.flatten(2).transpose(1, 2), tuple(int(s) for s in feats.shape[2:])


class TimmImageEncoder(ImageEncoder):
    """Any timm architecture, built for one input channel and no classifier (2D only).

    ``global_pool="attn"`` or ``"avgattn"`` (CNNs only) ends the tower in a :class:`PositionalAttentionPool` instead
    of timm's pooling; any other ``global_pool`` is timm's own. ``laterality=True`` (CNNs whose pool keeps the
    channels) adds a :class:`LateralityMoment` of the feature map along ``laterality_axis`` (0: the radiograph's
    columns, the patient's left-right) to the embedding.
    """

    def __init__(
        self,
        model_name: str,
        image_size: Sequence[int],
        laterality: bool = False,
        laterality_axis: int = 0,
        **timm_kwargs: Any,
    ) -> None:
        super().__init__(2, image_size)
        self.model_name = model_name
        self.attn_pool: PositionalAttentionPool | None = None
        self.laterality: LateralityMoment | None = None
        pool_kind = timm_kwargs.get("global_pool")
        attn = pool_kind if pool_kind in PositionalAttentionPool.MODES else None
        if attn:
            timm_kwargs = {k: v for k, v in timm_kwargs.items() if k != "global_pool"}
        kwargs = {"pretrained": False, "in_chans": 1, "num_classes": 0, **timm_kwargs}
        if kwargs["pretrained"]:
            raise ValueError("medvlp never downloads weights: pass checkpoint=<local file> instead of pretrained=True")
        if not timm.is_model(model_name):
            try:  # a name that is only padded with spaces is taken without them
                model_name = look_up_option(model_name, timm.list_models(), print_all_options=False)
            except ValueError as exc:  # MONAI's message says "did you mean ...?" when a timm name is close
                raise ValueError(
                    f"unknown timm model {model_name!r}: {' '.join(str(exc).split())} (see timm.list_models())"
                ) from None
        try:
            self.backbone = timm.create_model(model_name, img_size=self.image_size, **kwargs)
        except TypeError:  # architectures without an img_size argument (CNNs)
            self.backbone = timm.create_model(model_name, **kwargs)
        patch_embed = getattr(self.backbone, "patch_embed", None)
        self.fixed_size = bool(getattr(patch_embed, "strict_img_size", False))
        self.num_prefix_tokens = int(getattr(self.backbone, "num_prefix_tokens", 0))
        self.output_fmt = str(getattr(self.backbone, "output_fmt", "NCHW"))
        was_training = self.backbone.training
        if attn or laterality:  # the heads are sized from the backbone's feature map at image_size
            with torch.no_grad():
                feats = self.backbone.eval().forward_features(torch.zeros(1, int(kwargs["in_chans"]), *self.image_size))
        if attn:
            if feats.ndim != 4 or self.output_fmt != "NCHW":
                raise ValueError(f"global_pool {attn!r} needs a CNN's [B, C, H, W] feature map; {model_name} has none")
            grid = tuple(int(g) for g in feats.shape[2:])
            self.attn_pool = PositionalAttentionPool(int(feats.shape[1]), grid, mode=attn)
        if laterality:
            self.laterality = self._laterality_head(feats, laterality_axis)
            self.head_prefixes = ("laterality.",)
        with torch.no_grad():
            out = self.eval()._forward(torch.zeros(1, int(kwargs["in_chans"]), *self.image_size))
        self.train(was_training)
        self.embed_dim, self.token_dim = int(out.embedding.shape[-1]), int(out.tokens.shape[-1])

    def _laterality_head(self, feats: Tensor, axis: int) -> LateralityMoment:
        """The laterality head for this backbone's feature map ``feats``, refused where there is no map or the pool
        changes the width (timm's ``catavgmax``)."""
        if feats.ndim != 4:
            raise ValueError(f"laterality needs a CNN's feature map; {self.model_name} gives {tuple(feats.shape)}")
        channels = int(feats.shape[1] if self.output_fmt == "NCHW" else feats.shape[3])
        with torch.no_grad():
            width = channels if self.attn_pool else int(self.backbone.forward_head(feats, pre_logits=True).shape[-1])
        if width != channels:
            raise ValueError(f"laterality needs a pool that keeps the {channels} channels; this one gives {width}")
        return LateralityMoment(channels, axis, 2)

    @property
    def static_grid(self) -> tuple[int, ...] | None:
        grid = getattr(getattr(self.backbone, "patch_embed", None), "grid_size", None)
        return tuple(int(g) for g in grid) if grid is not None else None

    def _forward(self, x: Tensor) -> ImageEncoderOutput:
        feats = self.backbone.forward_features(x)
        if self.attn_pool is not None:
            embedding, tokens = self.attn_pool(feats)
            if self.laterality is not None:
                embedding = embedding + self.laterality(feats)
            return ImageEncoderOutput(embedding=embedding, tokens=tokens, grid=tuple(int(g) for g in feats.shape[2:]))
        embedding = self.backbone.forward_head(feats, pre_logits=True)  # [B, embed_dim]
        if self.laterality is not None:
            embedding = embedding + self.laterality(feats if self.output_fmt == "NCHW" else feats.permute(0, 3, 1, 2))
        if feats.ndim == 3:  # [B, prefix + N, C] (ViT-like)
            tokens = feats[:, self.num_prefix_tokens :]
            patch_embed = getattr(self.backbone, "patch_embed", None)
            grid = tuple(int(g) for g in patch_embed.dynamic_feat_size(tuple(x.shape[2:]))) if patch_embed else ()
            if not grid or grid[0] * grid[1] != tokens.shape[1]:
                grid = (int(tokens.shape[1]),)
        else:  # a feature map [B, C, H, W] or [B, H, W, C]
            if self.output_fmt == "NHWC":
                feats = feats.permute(0, 3, 1, 2)
            tokens, grid = flatten_map(feats)
        if embedding.ndim > 2:
            embedding = embedding.flatten(1)
        return ImageEncoderOutput(embedding=embedding, tokens=tokens, grid=grid)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        super().set_grad_checkpointing(enable)
        try:
            self.backbone.set_grad_checkpointing(enable)
        except (AssertionError, NotImplementedError, AttributeError):
            logger.warning("timm model %s does not support gradient checkpointing; continuing without", self.model_name)

    def layer_groups(self) -> list[list[str]]:
        try:
            from timm.models import group_parameters

            grouped = group_parameters(self.backbone, self.backbone.group_matcher(coarse=True))
            groups = [[f"backbone.{n}" for n in grouped[k]] for k in sorted(grouped)]
        except (AttributeError, NotImplementedError):
            return super().layer_groups()  # the attention pool falls in the last group there
        for name, head in (("attn_pool", self.attn_pool), ("laterality", self.laterality)):
            if head is not None:  # the pool is the head: it belongs with the last group
                groups[-1] += [f"{name}.{n}" for n, _ in head.named_parameters()]
        return groups


class MonaiViTEncoder(ImageEncoder):
    """MONAI's ViT (2D or 3D); tokens are the normalized last hidden states, embedding their normalized mean."""

    fixed_size = True

    def __init__(
        self,
        spatial_dims: int,
        image_size: Sequence[int],
        patch_size: int | Sequence[int] = 16,
        hidden_size: int = 768,
        mlp_dim: int = 3072,
        num_layers: int = 12,
        num_heads: int = 12,
        pos_embed_type: str = "learnable",
        dropout_rate: float = 0.0,
        qkv_bias: bool = False,
    ) -> None:
        super().__init__(spatial_dims, image_size)
        patch = (patch_size,) * spatial_dims if isinstance(patch_size, int) else tuple(patch_size)
        if len(patch) != spatial_dims or any(s % p for s, p in zip(self.image_size, patch, strict=True)):
            raise ValueError(f"image_size {self.image_size} must be divisible by patch_size {patch}")
        self.patch_size = patch
        self.backbone = ViT(
            in_channels=1,
            img_size=self.image_size,
            patch_size=patch,
            hidden_size=hidden_size,
            mlp_dim=mlp_dim,
            num_layers=num_layers,
            num_heads=num_heads,
            proj_type="conv",
            pos_embed_type=pos_embed_type,
            classification=False,
            dropout_rate=dropout_rate,
            spatial_dims=spatial_dims,
            qkv_bias=qkv_bias,
        )
        for i, blk in enumerate(self.backbone.blocks):  # MONAI keeps an unused cross-attention norm
            if not blk.with_cross_attention:
                blk.norm_cross_attn.requires_grad_(False)
                self.unused_parameters.update(f"backbone.blocks.{i}.norm_cross_attn.{n}" for n in ("weight", "bias"))
        self.head_norm = nn.LayerNorm(hidden_size)
        self.embed_dim = self.token_dim = hidden_size

    @property
    def static_grid(self) -> tuple[int, ...]:
        return tuple(s // p for s, p in zip(self.image_size, self.patch_size, strict=True))

    def _forward(self, x: Tensor) -> ImageEncoderOutput:
        h = self.backbone.patch_embedding(x)  # [B, N, C], row-major over the patch grid
        for blk in self.backbone.blocks:
            h = maybe_checkpoint(self.grad_checkpointing, blk, h)
        tokens = self.backbone.norm(h)  # [B, N, C]
        embedding = self.head_norm(tokens.mean(dim=1))  # [B, C]
        return ImageEncoderOutput(embedding=embedding, tokens=tokens, grid=self.static_grid)

    def _group_prefixes(self) -> list[tuple[str, ...]]:
        blocks = [(f"backbone.blocks.{i}.",) for i in range(len(self.backbone.blocks))]
        return [("backbone.patch_embedding.",), *blocks, ("backbone.norm.", "head_norm.")]


class MonaiSwinEncoder(ImageEncoder):
    """The Swin transformer encoder of MONAI's SwinUNETR (2D or 3D), four stages, total stride 32."""

    def __init__(
        self,
        spatial_dims: int,
        image_size: Sequence[int],
        feature_size: int = 48,
        depths: Sequence[int] = (2, 2, 2, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 7,
        patch_size: int = 2,
        drop_path_rate: float = 0.0,
        use_v2: bool = False,
    ) -> None:
        super().__init__(spatial_dims, image_size)
        if len(depths) != 4 or len(num_heads) != 4:
            raise ValueError(f"the SwinUNETR encoder has 4 stages; got depths={depths}, num_heads={num_heads}")
        self.backbone = SwinTransformer(
            in_chans=1,
            embed_dim=feature_size,
            window_size=(window_size,) * spatial_dims,
            patch_size=(patch_size,) * spatial_dims,
            depths=tuple(depths),
            num_heads=tuple(num_heads),
            drop_path_rate=drop_path_rate,
            spatial_dims=spatial_dims,
            use_v2=use_v2,
        )
        self.embed_dim = self.token_dim = feature_size * 2**4  # each stage ends with a patch merging
        self.norm = nn.LayerNorm(self.token_dim)
        self.head_norm = nn.LayerNorm(self.token_dim)

    def _forward(self, x: Tensor) -> ImageEncoderOutput:
        last = self.backbone(x, normalize=False)[-1]  # [B, C, *grid]
        tokens, grid = flatten_map(last)
        tokens = self.norm(tokens)  # [B, N, C]
        return ImageEncoderOutput(embedding=self.head_norm(tokens.mean(dim=1)), tokens=tokens, grid=grid)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        super().set_grad_checkpointing(enable)
        for module in self.backbone.modules():
            if hasattr(module, "use_checkpoint"):
                module.use_checkpoint = enable

    def _group_prefixes(self) -> list[tuple[str, ...]]:
        stages = [(f"backbone.layers{i}.", f"backbone.layers{i}c.") for i in range(1, 5)]
        return [("backbone.patch_embed.",), *stages, ("norm.", "head_norm.")]
