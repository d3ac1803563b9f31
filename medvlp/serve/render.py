"""PNG pictures for the viewer: the model's input image and each finding's grounding heatmap as an overlay.

Both come out at the model's input size and in the same orientation, so the overlay lies exactly on the image.
2D images are shown as stored (rows down, columns across). A 3D volume is shown as axial slices in the
radiological convention (the patient's right on the viewer's left, anterior up), worked out from the affine.
"""

from __future__ import annotations

import base64
import io

import numpy as np
from matplotlib import colormaps
from PIL import Image

__all__ = ["display_plane", "heatmap_png", "image_png", "peak_slice"]

_CMAP = colormaps["jet"]


def _png(pixels: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", optimize=False)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def peak_slice(sim_map: np.ndarray) -> int | None:
    """For a 3D map ``[X, Y, Z]``, the slice ``k`` holding its maximum; None for a 2D map."""
    if sim_map.ndim == 2:
        return None
    return int(np.unravel_index(int(np.nanargmax(sim_map)), sim_map.shape)[2])


def display_plane(volume: np.ndarray, affine: np.ndarray, k: int | None) -> np.ndarray:
    """A 2D plane ``[rows, cols]`` ready to show: ``volume.T`` for 2D; slice ``k`` of a 3D volume, flipped so that
    the patient's right is on the left and anterior is up when the axes are close to RAS."""
    if volume.ndim == 2:
        return volume.T
    plane = volume[:, :, k if k is not None else volume.shape[2] // 2].T  # [Y, X]
    x_dir, y_dir = affine[:3, 0], affine[:3, 1]  # world direction of array axes i and j
    if x_dir[0] > 0:  # i runs towards the patient's right (+R): show it right-to-left
        plane = plane[:, ::-1]
    if y_dir[1] > 0:  # j runs towards anterior (+A): anterior at the top
        plane = plane[::-1, :]
    return np.ascontiguousarray(plane)


def image_png(plane: np.ndarray) -> str:
    """Base64 PNG (8-bit gray) of a plane with values in [0, 1]."""
    return _png((np.clip(np.nan_to_num(plane), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8))


def heatmap_png(plane: np.ndarray, floor: float = 0.3, max_alpha: float = 0.75) -> str:
    """Base64 RGBA PNG of a similarity map: min-max scaled, colour-mapped, transparent below ``floor``.

    Args:
        plane: ``[rows, cols]`` similarity values.
        floor: scaled values below it are fully transparent.
        max_alpha: opacity of the strongest values.
    """
    v = np.nan_to_num(plane.astype(np.float64))
    lo, hi = float(v.min()), float(v.max())
    scaled = (v - lo) / (hi - lo) if hi > lo else np.zeros_like(v)
    rgba = _CMAP(scaled)  # [rows, cols, 4] in [0, 1]
    rgba[..., 3] = np.clip((scaled - floor) / (1.0 - floor), 0.0, 1.0) * max_alpha
    return _png((rgba * 255.0 + 0.5).astype(np.uint8))
