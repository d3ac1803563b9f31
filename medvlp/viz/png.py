"""PNG pictures for the viewer: the model's input image and each finding's heatmap as an overlay, base64-encoded.

Both come out of :func:`medvlp.viz.orient.planes` (2D as acquired; 3D as the axial slice through the map's peak, in
the radiological convention), so the overlay lies exactly on the image and the viewer agrees with the card.
"""

from __future__ import annotations

import base64
import io

import numpy as np
from matplotlib import colormaps
from PIL import Image

__all__ = ["heatmap_png", "image_png"]

_CMAP = colormaps["jet"]


def _png(pixels: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", optimize=False)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def image_png(plane: np.ndarray) -> str:
    """Base64 PNG (8-bit gray) of a plane ``[rows, cols]`` with values in [0, 1]."""
    return _png((np.clip(np.nan_to_num(plane), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8))


def heatmap_png(plane: np.ndarray, floor: float = 0.3, max_alpha: float = 0.75) -> str:
    """Base64 RGBA PNG of a similarity map: min-max scaled, colour-mapped, transparent below ``floor``.

    Args:
        plane: ``[rows, cols]`` similarity values.
        floor: scaled values below it are fully transparent.
        max_alpha: opacity of the strongest values.
    """
    v = np.nan_to_num(np.asarray(plane, dtype=np.float64))
    lo, hi = float(v.min()), float(v.max())
    scaled = (v - lo) / (hi - lo) if hi > lo else np.zeros_like(v)
    rgba = _CMAP(scaled)  # [rows, cols, 4] in [0, 1]
    rgba[..., 3] = np.clip((scaled - floor) / (1.0 - floor), 0.0, 1.0) * max_alpha
    return _png((np.ascontiguousarray(rgba) * 255.0 + 0.5).astype(np.uint8))
