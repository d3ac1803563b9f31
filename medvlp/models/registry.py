"""Image-encoder registry (as timm's ``register_model``/``create_model``) and loading of users' checkpoints.

Builders are registered by name with :func:`register_image_encoder` and built with :func:`create_image_encoder`.
The encoder classes live in :mod:`medvlp.models.image`; their families and named presets are registered here.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from monai.utils import look_up_option
from torch import Tensor

from medvlp.models.image import (
    ImageEncoder,
    MonaiSwinEncoder,
    MonaiViTEncoder,
    TimmImageEncoder,
)
from medvlp.models.resnet import MonaiResNetEncoder
from medvlp.models.slices import SliceImageEncoder

logger = logging.getLogger(__name__)

__all__ = [
    "ImageEncoderSpec",
    "create_image_encoder",
    "get_image_encoder_spec",
    "list_image_encoders",
    "load_image_checkpoint",
    "register_image_encoder",
]

BuilderT = TypeVar("BuilderT", bound=Callable[..., Any])


@dataclass(frozen=True)
class ImageEncoderSpec:
    """A registered image encoder: its builder, the spatial dims it supports and a one-line description."""

    name: str
    builder: Callable[..., ImageEncoder]
    spatial_dims: tuple[int, ...]
    description: str


_REGISTRY: dict[str, ImageEncoderSpec] = {}


def register_image_encoder(
    name: str, *, spatial_dims: Sequence[int] = (2, 3), description: str | None = None
) -> Callable[[BuilderT], BuilderT]:
    """Decorator registering ``builder(spatial_dims, image_size, **kwargs) -> ImageEncoder`` under ``name``.

    Args:
        name: registry name; must be new.
        spatial_dims: the dimensionalities the builder supports.
        description: one line for listings; defaults to the first line of the builder's docstring.
    """

    def decorator(builder: BuilderT) -> BuilderT:
        if name in _REGISTRY:
            raise ValueError(f"image encoder {name!r} is already registered")
        lines = (builder.__doc__ or "").strip().splitlines()
        text = description if description is not None else (lines[0] if lines else "")
        _REGISTRY[name] = ImageEncoderSpec(name, builder, tuple(int(d) for d in spatial_dims), text)
        return builder

    return decorator


def list_image_encoders(spatial_dims: int | None = None) -> list[str]:
    """Sorted registered names, optionally only those supporting ``spatial_dims``."""
    return sorted(n for n, s in _REGISTRY.items() if spatial_dims is None or spatial_dims in s.spatial_dims)


def _split_name(name: str, kwargs: dict[str, Any]) -> str:
    if name.startswith("timm/"):
        if kwargs.get("model_name") not in (None, name[5:]):
            raise ValueError(f"image encoder {name!r} conflicts with model_name={kwargs['model_name']!r}")
        kwargs["model_name"] = name[5:]
        return "timm"
    return name


def get_image_encoder_spec(name: str) -> ImageEncoderSpec:
    """The registry entry for ``name`` (``"timm/<model>"`` maps to ``"timm"``).

    Raises:
        ValueError: unknown name; the message lists close matches and all known names.
    """
    key = "timm" if name.startswith("timm/") else name
    try:
        return look_up_option(key, _REGISTRY, print_all_options=False)
    except ValueError as exc:  # MONAI's message says "did you mean ...?" when a known name is close
        raise ValueError(
            f"unknown image encoder {name!r}: {' '.join(str(exc).split())} Known encoders: "
            f'{", ".join(sorted(_REGISTRY))}; any timm architecture also works as "timm/<model_name>".'
        ) from None


def create_image_encoder(
    name: str,
    spatial_dims: int,
    image_size: int | Sequence[int],
    *,
    checkpoint: str | Path | None = None,
    strict: bool = False,
    **kwargs: Any,
) -> ImageEncoder:
    """Build a registered image encoder for one-channel ``image_size`` inputs.

    Args:
        name: a name from :func:`list_image_encoders`, or ``"timm/<model_name>"``.
        spatial_dims: 2 or 3.
        image_size: ``(X, Y[, Z])`` or one int for all axes.
        checkpoint: optional local ``.pt/.pth/.safetensors`` file loaded with :func:`load_image_checkpoint`.
        strict: passed to :func:`load_image_checkpoint`.
        **kwargs: builder arguments (e.g. ``model_name`` for ``"timm"``, ``hidden_size`` for ``"monai_vit"``).

    Raises:
        ValueError: unknown name, unsupported ``spatial_dims`` or a bad ``image_size``.
    """
    spec = get_image_encoder_spec(name)
    _split_name(name, kwargs)
    if spatial_dims not in spec.spatial_dims:
        dims = " or ".join(f"{d}D" for d in spec.spatial_dims)
        alternatives = ", ".join(list_image_encoders(spatial_dims))
        raise ValueError(
            f"image encoder {name!r} supports {dims} images only, not spatial_dims={spatial_dims}. "
            f"Encoders for {spatial_dims}D: {alternatives}"
        )
    size = (int(image_size),) * spatial_dims if isinstance(image_size, int) else tuple(int(s) for s in image_size)
    if len(size) != spatial_dims or min(size) <= 0:
        raise ValueError(f"image_size {image_size} does not describe a {spatial_dims}D image")
    encoder = spec.builder(spatial_dims, size, **kwargs)
    if checkpoint is not None:
        load_image_checkpoint(encoder, checkpoint, strict=strict)
    return encoder


# --------------------------------------------------------------------------------------------------------------------
# Registered builders: ``builder(spatial_dims, image_size, **kwargs) -> ImageEncoder``.
# --------------------------------------------------------------------------------------------------------------------


@register_image_encoder("timm", spatial_dims=(2,))
def timm_encoder(
    spatial_dims: int, image_size: Sequence[int], model_name: str | None = None, **kwargs: Any
) -> ImageEncoder:
    """Any timm architecture by name (``model_name=...`` or the shorthand ``"timm/<model_name>"``)."""
    if not model_name:
        raise ValueError('the "timm" image encoder needs model_name=<a timm architecture>, e.g. "resnet18"')
    return TimmImageEncoder(model_name, image_size, **kwargs)


@register_image_encoder("monai_vit")
def monai_vit(spatial_dims: int, image_size: Sequence[int], **kwargs: Any) -> ImageEncoder:
    """MONAI ViT, configurable (patch_size, hidden_size, mlp_dim, num_layers, num_heads...)."""
    return MonaiViTEncoder(spatial_dims, image_size, **kwargs)


@register_image_encoder("monai_resnet")
def monai_resnet(spatial_dims: int, image_size: Sequence[int], **kwargs: Any) -> ImageEncoder:
    """MONAI ResNet, configurable (depth, block_inplanes, conv1_t_stride...)."""
    return MonaiResNetEncoder(spatial_dims, image_size, **kwargs)


@register_image_encoder("monai_swin")
def monai_swin(spatial_dims: int, image_size: Sequence[int], **kwargs: Any) -> ImageEncoder:
    """SwinUNETR's Swin encoder, configurable (feature_size, depths, num_heads, window_size...)."""
    return MonaiSwinEncoder(spatial_dims, image_size, **kwargs)


@register_image_encoder("timm_slices", spatial_dims=(3,))
def timm_slices(
    spatial_dims: int, image_size: Sequence[int], model_name: str | None = None, **kwargs: Any
) -> ImageEncoder:
    """2.5D: a timm 2D backbone over axial slabs, shared weights, pooled across slices (slab, pooling...)."""
    if not model_name:
        raise ValueError('the "timm_slices" image encoder needs model_name=<a timm architecture>, e.g. "resnet10t"')
    return SliceImageEncoder(spatial_dims, image_size, model_name, **kwargs)


_VIT_S = {"patch_size": 16, "hidden_size": 384, "mlp_dim": 1536, "num_layers": 12, "num_heads": 6}
_VIT_B = {"patch_size": 16, "hidden_size": 768, "mlp_dim": 3072, "num_layers": 12, "num_heads": 12}
_TINY_VIT = {"patch_size": 8, "hidden_size": 32, "mlp_dim": 64, "num_layers": 2, "num_heads": 2}
_TINY_RESNET = {"depth": 10, "block_inplanes": (8, 16, 32, 64)}
_TINY_SLICES = {"model_name": "test_resnet", "slab": 3, "pooling": "attention"}
_SLICES = {"model_name": "resnet10t", "slab": 3, "pooling": "attention"}
_TINY_SWIN = {"feature_size": 12, "depths": (1, 1, 1, 1), "num_heads": (1, 2, 2, 4), "window_size": 4}

# name: (family, spatial dims, description, default arguments that callers may override)
PRESETS: dict[str, tuple[str, tuple[int, ...], str, dict[str, Any]]] = {
    # tiny variants for tests and smoke runs
    "tiny_timm_vit": ("timm", (2,), "timm test_vit (tiny ViT)", {"model_name": "test_vit"}),
    "tiny_timm_convnext": ("timm", (2,), "timm test_convnext (tiny ConvNeXt)", {"model_name": "test_convnext"}),
    "tiny_timm_resnet": ("timm", (2,), "timm test_resnet (tiny ResNet)", {"model_name": "test_resnet"}),
    "tiny_vit": ("monai_vit", (2, 3), "MONAI ViT, hidden 32, 2 layers, 2 heads, patch 8", _TINY_VIT),
    "tiny_resnet": ("monai_resnet", (2, 3), "MONAI ResNet-10, widths 8/16/32/64", _TINY_RESNET),
    "tiny_swin": ("monai_swin", (2, 3), "SwinUNETR encoder, feature_size 12, depths 1x4, window 4", _TINY_SWIN),
    "tiny_slices": ("timm_slices", (3,), "2.5D: timm test_resnet over 3-slice slabs, attention pooling", _TINY_SLICES),
    # CPU / demo defaults
    "resnet10t_slices": ("timm_slices", (3,), "2.5D: timm resnet10t over 3-slice slabs, attention pooling", _SLICES),
    "resnet18_2d": ("timm", (2,), "timm resnet18, one channel", {"model_name": "resnet18"}),
    "resnet10_3d": ("monai_resnet", (3,), "MONAI ResNet-10 (MedicalNet layout)", {"depth": 10}),
    "vit_small_3d": ("monai_vit", (3,), "MONAI ViT-S/16: hidden 384, 12 layers, 6 heads", _VIT_S),
    # full-scale towers for GPU configs
    "vit_base_patch16": ("timm", (2,), "timm vit_base_patch16_224, any size", {"model_name": "vit_base_patch16_224"}),
    "vit_base_3d": ("monai_vit", (3,), "MONAI ViT-B/16: hidden 768, 12 layers, 12 heads", _VIT_B),
    "swin_unetr": ("monai_swin", (2, 3), "SwinUNETR encoder, feature_size 48", {"feature_size": 48}),
}
_FAMILIES = {
    "timm": timm_encoder,
    "timm_slices": timm_slices,
    "monai_vit": monai_vit,
    "monai_resnet": monai_resnet,
    "monai_swin": monai_swin,
}


def _preset_builder(family: str, defaults: dict[str, Any]) -> Any:
    def build(spatial_dims: int, image_size: Sequence[int], **kwargs: Any) -> ImageEncoder:
        return _FAMILIES[family](spatial_dims, image_size, **{**defaults, **kwargs})

    return build


for _name, (_family, _dims, _doc, _defaults) in PRESETS.items():
    register_image_encoder(_name, spatial_dims=_dims, description=_doc)(_preset_builder(_family, _defaults))


# --------------------------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------------------------

_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net")
_PREFIXES = ("module.", "_orig_mod.", "model.", "backbone.", "encoder.", "image_encoder.", "visual.", "trunk.")
_PREFIXES_MORE = ("swinViT.", "vit.", "net.")


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"image checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        obj: Any = load_file(str(path), device="cpu")
    else:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    while isinstance(obj, dict):
        wrapper = next((k for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if wrapper is None:
            break
        obj = obj[wrapper]
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict")
    return {k: v for k, v in obj.items() if isinstance(v, Tensor)}


def _candidate_keys(key: str) -> Iterator[str]:
    yield key
    yield "backbone." + key
    yield "slices.backbone." + key  # a 2D checkpoint into the slice tower's shared backbone
    while True:
        prefix = next((p for p in (*_PREFIXES, *_PREFIXES_MORE) if key.startswith(p)), None)
        if prefix is None:
            return
        key = key[len(prefix) :]
        yield key
        yield "backbone." + key
        yield "slices.backbone." + key


def _resample_pos_embed(src: Tensor, dst: Tensor, encoder: ImageEncoder) -> Tensor | None:
    """Interpolate a ``[1, prefix + N, C]`` position embedding to the encoder's token grid (None if impossible)."""
    grid = encoder.static_grid
    if grid is None or src.ndim != 3 or dst.ndim != 3 or src.shape[-1] != dst.shape[-1]:
        return None
    prefix = 0 if dst.shape[1] == math.prod(grid) else encoder.num_prefix_tokens  # timm's no_embed_class: 0
    if dst.shape[1] != math.prod(grid) + prefix:
        return None
    n_old = src.shape[1] - prefix
    side = round(n_old ** (1 / len(grid)))
    if side ** len(grid) != n_old:
        return None
    pos = src[:, prefix:].transpose(1, 2).reshape(1, -1, *(side,) * len(grid)).float()  # [1, C, *old_grid]
    mode = "bicubic" if len(grid) == 2 else "trilinear"
    pos = F.interpolate(pos, size=grid, mode=mode, align_corners=False).flatten(2).transpose(1, 2)
    return torch.cat([src[:, :prefix].float(), pos], dim=1).to(dst.dtype)


def _adapt(key: str, src: Tensor, dst: Tensor, encoder: ImageEncoder) -> Tensor | None:
    """Make ``src`` fit ``dst``: sum RGB input filters to one channel, resample position embeddings."""
    rgb_to_gray = src.ndim == dst.ndim >= 3 and dst.shape[1] == 1 and src.shape[1] > 1
    if rgb_to_gray and src.shape[0] == dst.shape[0] and src.shape[2:] == dst.shape[2:]:
        return src.float().sum(dim=1, keepdim=True).to(dst.dtype)  # as timm's adapt_input_conv
    if key.rsplit(".", 1)[-1] in ("pos_embed", "position_embeddings"):
        return _resample_pos_embed(src, dst, encoder)
    return None


def load_image_checkpoint(encoder: ImageEncoder, path: str | Path, strict: bool = False) -> dict[str, list[str]]:
    """Load a user's checkpoint into ``encoder``, matching keys loosely.

    Reads ``.pt/.pth`` (``torch.load(weights_only=True)``; ``{"state_dict": ...}``/``{"model": ...}`` wrappers are
    opened) or ``.safetensors``. Prefixes such as ``module.``/``model.`` are stripped, bare backbone keys match the
    encoder's ``backbone.`` submodule, 3-channel first convolutions/patch embeddings are summed to one channel and
    learned position embeddings are interpolated to the encoder's token grid.

    Args:
        encoder: the encoder to fill in place.
        path: the checkpoint file.
        strict: raise if anything is missing (but the encoder's new heads, ``head_prefixes``), unexpected or of the
            wrong shape.

    Returns:
        ``{"loaded", "adapted", "missing", "unexpected", "mismatched"}`` lists of keys (encoder keys for loaded,
        adapted and missing; checkpoint keys for unexpected; ``"key: ckpt shape vs model shape"`` for mismatched).

    Raises:
        ValueError: no tensor of the checkpoint matches the encoder, or ``strict`` and the match is partial.
    """
    path = Path(path)
    source = _read_state_dict(path)
    target = encoder.state_dict()
    mapped: dict[str, Tensor] = {}
    report: dict[str, list[str]] = {"loaded": [], "adapted": [], "missing": [], "unexpected": [], "mismatched": []}
    for key, value in source.items():
        dst_key = next((k for k in _candidate_keys(key) if k in target and k not in mapped), None)
        if dst_key is None:
            report["unexpected"].append(key)
            continue
        dst = target[dst_key]
        if value.shape != dst.shape:
            adapted = _adapt(dst_key, value, dst, encoder)
            if adapted is None or adapted.shape != dst.shape:
                report["mismatched"].append(f"{key}: {tuple(value.shape)} vs {tuple(dst.shape)}")
                continue
            report["adapted"].append(dst_key)
            value = adapted
        mapped[dst_key] = value.to(dst.dtype)
    if not mapped:
        raise ValueError(
            f"no tensor in {path.name} matches {type(encoder).__name__}: checkpoint keys look like "
            f"{list(source)[:5]}, the encoder's like {list(target)[:5]} (mismatched shapes: {report['mismatched'][:5]})"
        )
    report["loaded"] = sorted(mapped)
    report["missing"] = sorted(k for k in target if k not in mapped and not k.endswith("num_batches_tracked"))
    backbone_missing = [k for k in report["missing"] if not k.startswith(encoder.head_prefixes)]  # heads start anew
    if strict and (backbone_missing or report["unexpected"] or report["mismatched"]):
        raise ValueError(
            f"{path.name} does not fit {type(encoder).__name__} exactly: missing {backbone_missing[:10]}, "
            f"unexpected {report['unexpected'][:10]}, mismatched {report['mismatched'][:10]}"
        )
    encoder.load_state_dict(mapped, strict=False)
    logger.info(
        "loaded %d tensors from %s into %s (%d adapted, %d missing, %d unexpected, %d mismatched)",
        len(mapped),
        path.name,
        type(encoder).__name__,
        len(report["adapted"]),
        len(report["missing"]),
        len(report["unexpected"]),
        len(report["mismatched"]),
    )
    return report
