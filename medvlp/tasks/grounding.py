"""Phrase grounding: patch-phrase similarity maps and their agreement with annotated boxes (2D and 3D).

Coordinates follow the cache (:mod:`medvlp.data.cache`): arrays are ``(X, Y[, Z])`` after the channel, and a box
``(x, y[, z], w, h[, d])`` is a voxel corner and size in floats, where voxel ``i`` spans ``[i, i + 1)`` (a box
starting at 3 with width 2 covers voxels 3 and 4).

Metrics follow BioViL / MS-CXR (Boecking et al., "Making the Most of Text Semantics to Improve Biomedical
Vision-Language Processing", ECCV 2022): the contrast-to-noise ratio of the similarity map between the box
interior and exterior, and the IoU of the thresholded map with the box.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["box_mask", "boxes_from_frame", "cnr", "grounding_metrics", "iou", "similarity_map"]

_MODES = {1: "linear", 2: "bilinear", 3: "trilinear"}


@torch.no_grad()
def similarity_map(
    patch_tokens: Tensor,
    grid: Sequence[int],
    phrase_emb: Tensor,
    image_size: Sequence[int],
) -> Tensor:
    """Cosine similarity of each patch token with a phrase, upsampled to the image.

    Args:
        patch_tokens: ``[N, E]`` or ``[B, N, E]``, flattened row-major over ``grid``.
        grid: the token grid ``(X', Y'[, Z'])``, ``prod(grid) == N``.
        phrase_emb: ``[E]`` or ``[B, E]`` (one phrase per image).
        image_size: ``(X, Y[, Z])``.

    Returns:
        ``[*image_size]`` for unbatched input, else ``[B, *image_size]``; float32 cosine similarities,
        (bi/tri)linearly interpolated with ``align_corners=False``.
    """
    grid, image_size = tuple(int(g) for g in grid), tuple(int(s) for s in image_size)
    if len(grid) != len(image_size) or len(grid) not in _MODES:
        raise ValueError(f"grid {grid} and image_size {image_size} must have the same 1-3 dimensions")
    single = patch_tokens.ndim == 2
    tokens = patch_tokens[None] if single else patch_tokens  # [B, N, E]
    phrase = phrase_emb.reshape(-1, phrase_emb.shape[-1]).to(tokens.device)  # [B or 1, E]
    if tokens.shape[1] != int(np.prod(grid)):
        raise ValueError(f"{tokens.shape[1]} tokens do not fill the grid {grid}")
    tokens = F.normalize(tokens.float(), dim=-1)
    phrase = F.normalize(phrase.float(), dim=-1)
    sim = torch.einsum("bne,be->bn", tokens, phrase.expand(tokens.shape[0], -1))  # [B, N]
    sim = sim.reshape(sim.shape[0], 1, *grid)  # [B, 1, *grid]
    out = F.interpolate(sim, size=image_size, mode=_MODES[len(grid)], align_corners=False)[:, 0]  # [B, *size]
    return out[0] if single else out


def _boxes(box: Any) -> np.ndarray:
    """One box or a list of boxes -> ``[K, 2D]`` floats."""
    arr = np.asarray(box, dtype=np.float64)
    return arr.reshape(1, -1) if arr.ndim == 1 else arr.reshape(len(arr), -1)


def box_mask(box: Sequence[float] | Sequence[Sequence[float]], image_size: Sequence[int]) -> np.ndarray:
    """Voxels whose centre lies inside the box (or any of several boxes).

    Args:
        box: ``(x, y[, z], w, h[, d])`` voxel corner + size, or a list of such boxes (union).
        image_size: ``(X, Y[, Z])``.

    Returns:
        bool ``[*image_size]``; voxel ``i`` (centre ``i + 0.5``) is inside when ``x <= i + 0.5 < x + w``.
    """
    size = tuple(int(s) for s in image_size)
    d = len(size)
    mask = np.zeros(size, dtype=bool)
    for b in _boxes(box):
        if len(b) != 2 * d:
            raise ValueError(f"a {d}D box has {2 * d} numbers (corner + size), got {len(b)}")
        inside = np.ones(size, dtype=bool)
        for a in range(d):
            centres = np.arange(size[a]) + 0.5
            along = (centres >= b[a]) & (centres < b[a] + b[d + a])  # [size[a]]
            inside &= along.reshape([-1 if i == a else 1 for i in range(d)])
        mask |= inside
    return mask


def _np(x: Tensor | np.ndarray) -> np.ndarray:
    return x.detach().float().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x, dtype=np.float64)


def cnr(sim_map: Tensor | np.ndarray, mask: np.ndarray) -> float:
    """Contrast-to-noise ratio of a similarity map between the box interior and exterior (BioViL, MS-CXR).

    ``CNR = |mean_in - mean_out| / sqrt(var_in + var_out)`` (Boecking et al. 2022, Sec. 4.3), with population
    variances of the raw (un-thresholded) map inside and outside the mask; NaN values are ignored.

    Returns:
        The CNR; NaN when either region is empty, ``inf`` when both variances are 0 and the means differ, 0 when
        the map is constant.
    """
    values, mask = _np(sim_map), np.asarray(mask, dtype=bool)
    if values.shape != mask.shape:
        raise ValueError(f"map {values.shape} and mask {mask.shape} differ")
    finite = np.isfinite(values)
    inside, outside = values[mask & finite], values[~mask & finite]
    if inside.size == 0 or outside.size == 0:
        return float("nan")
    diff = abs(float(inside.mean()) - float(outside.mean()))
    noise = float(np.sqrt(inside.var() + outside.var()))
    if noise == 0.0:
        return float("inf") if diff > 0 else 0.0
    return diff / noise


def iou(sim_map: Tensor | np.ndarray, mask: np.ndarray, threshold: float = 0.5) -> float:
    """IoU of the thresholded map with the box mask.

    The map is min-max rescaled to [0, 1] per image (a constant map becomes all 0) and the prediction is
    ``rescaled >= threshold``.

    Returns:
        ``|pred & mask| / |pred | mask|``; NaN when both are empty.
    """
    values, mask = _np(sim_map), np.asarray(mask, dtype=bool)
    if values.shape != mask.shape:
        raise ValueError(f"map {values.shape} and mask {mask.shape} differ")
    finite = np.isfinite(values)
    lo, hi = (float(values[finite].min()), float(values[finite].max())) if finite.any() else (0.0, 0.0)
    scaled = (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)
    pred = finite & (scaled >= threshold)
    union = np.logical_or(pred, mask).sum()
    return float(np.logical_and(pred, mask).sum() / union) if union else float("nan")


def boxes_from_frame(frame: pd.DataFrame, spatial_dims: int) -> list[tuple[float, ...]]:
    """Box tuples ``(x, y[, z], w, h[, d])`` from a cache ``grounding`` frame, row by row."""
    cols = ["x", "y", "z", "w", "h", "d"] if spatial_dims == 3 else ["x", "y", "w", "h"]
    return [tuple(float(v) for v in row) for row in frame[cols].itertuples(index=False)]


@torch.no_grad()
def grounding_metrics(
    model: Any,
    images: Tensor | np.ndarray,
    phrases: Sequence[str],
    boxes: Sequence[Any],
    categories: Sequence[str] | None = None,
    iou_threshold: float = 0.5,
    batch_size: int = 16,
) -> pd.DataFrame:
    """CNR and IoU of the model's similarity map for each (image, phrase, box) triple.

    Args:
        model: a :class:`~medvlp.models.MedVLP`.
        images: ``[B, 1, X, Y(, Z)]`` at the model's input size.
        phrases: ``B`` phrases, one per image.
        boxes: ``B`` boxes ``(x, y[, z], w, h[, d])`` on the image grid, or lists of boxes (their union).
        categories: ``B`` category names (default: empty strings).
        iou_threshold: see :func:`iou`.
        batch_size: images per forward pass.

    Returns:
        One row per phrase: ``phrase, category, cnr, iou``.
    """
    images = torch.as_tensor(images)
    n = images.shape[0]
    if not len(phrases) == len(boxes) == n:
        raise ValueError(f"{n} images, {len(phrases)} phrases and {len(boxes)} boxes must agree")
    categories = list(categories) if categories is not None else [""] * n
    size = tuple(int(s) for s in images.shape[2:])
    was_training = getattr(model, "training", False)
    model.eval()
    rows: list[dict[str, Any]] = []
    try:
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            x = images[start:stop].to(model.device, torch.float32)  # [b, 1, *size]
            out = model.forward_image(x)
            text = model.encode_text(list(phrases[start:stop]))  # [b, E]
            maps = similarity_map(out.tokens, out.grid, text, size).cpu()  # [b, *size]
            for j, i in enumerate(range(start, stop)):
                mask = box_mask(boxes[i], size)
                rows.append(
                    {
                        "phrase": phrases[i],
                        "category": categories[i],
                        "cnr": cnr(maps[j], mask),
                        "iou": iou(maps[j], mask, iou_threshold),
                    }
                )
    finally:
        if was_training:
            model.train()
    return pd.DataFrame(rows, columns=["phrase", "category", "cnr", "iou"])
