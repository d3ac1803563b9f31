"""The one orientation rule for every picture medvlp draws (card, notebooks, viewer).

- 2D images are shown as acquired: rows down, columns across (a cached ``(X, Y)`` array is shown as ``array.T``).
- 3D volumes are shown in the radiological convention, worked out from the affine: the volume is first reoriented
  so that its axes point to the patient's Left, Posterior and Superior (nibabel orientations), then
  axial slices put the patient's right on the image's left and anterior up; coronal slices the patient's right on
  the left and superior up; sagittal slices anterior on the left and superior up.

Boxes ``(x, y[, z], w, h[, d])`` on the cached grid follow the same moves, so they stay on their lesion.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["VIEWS", "Plane", "display_volume", "peak", "planes"]

VIEWS = ("axial", "coronal", "sagittal")
_FIXED = {"axial": 2, "coronal": 1, "sagittal": 0}  # the axis a view holds fixed, in L-P-S order


@dataclass
class Plane:
    """One 2D picture: ``image`` and ``overlay`` ``[rows, cols]`` ready for ``imshow`` (row 0 at the top), boxes as
    ``(col, row, width, height)`` with ``solid`` False for a 3D box the slice does not cross; ``index`` is the
    slice of a 3D view along its axis of the reoriented (left, posterior, superior) volume, None in 2D."""

    label: str
    image: np.ndarray
    overlay: np.ndarray | None
    boxes: list[tuple[float, float, float, float]]
    solid: list[bool]
    index: int | None = None


def _to_lps(shape: Sequence[int], affine: np.ndarray) -> np.ndarray:
    import nibabel.orientations as nio

    current = nio.io_orientation(np.asarray(affine, dtype=np.float64))
    return nio.ornt_transform(current, nio.axcodes2ornt(("L", "P", "S")))


def display_volume(volume: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """A 3D array reoriented so that its axes point Left, Posterior, Superior (no resampling: flips and swaps)."""
    import nibabel.orientations as nio

    return np.ascontiguousarray(nio.apply_orientation(np.asarray(volume), _to_lps(volume.shape, affine)))


def _display_boxes(boxes: np.ndarray, shape: Sequence[int], ornt: np.ndarray) -> np.ndarray:
    """Boxes ``[K, 6]`` (corner + size per array axis) moved like :func:`display_volume` moves the array."""
    out = np.empty_like(boxes)
    for src, (dst, flip) in enumerate(ornt.astype(int)):
        lo, size = boxes[:, src], boxes[:, 3 + src]
        out[:, dst] = shape[src] - (lo + size) if flip == -1 else lo
        out[:, 3 + dst] = size
    return out


def peak(values: np.ndarray) -> tuple[int, ...]:
    """Index of the largest finite value."""
    return tuple(int(i) for i in np.unravel_index(int(np.nanargmax(values)), values.shape))


def _plane_of(vol: np.ndarray, view: str, index: int) -> np.ndarray:
    if view == "axial":
        return vol[:, :, index].T  # rows: posterior going down; cols: towards the patient's left
    if view == "coronal":
        return vol[:, index, :].T[::-1]  # rows: inferior going down
    return vol[index, :, :].T[::-1]  # sagittal: cols towards posterior, rows inferior going down


def _box_in(view: str, b: np.ndarray, shape: Sequence[int]) -> tuple[float, float, float, float]:
    x, y, z, w, h, d = (float(v) for v in b)
    if view == "axial":
        return x, y, w, h
    if view == "coronal":
        return x, shape[2] - (z + d), w, d
    return y, shape[2] - (z + d), h, d


def planes(
    image: np.ndarray,
    overlay: np.ndarray | None = None,
    boxes: Sequence[Sequence[float]] | np.ndarray | None = None,
    affine: np.ndarray | None = None,
    views: Sequence[str] = VIEWS,
    at: Sequence[int] | None = None,
) -> list[Plane]:
    """The pictures of one image (and an overlay such as a similarity map, and boxes), by the one rule.

    Args:
        image: ``(X, Y)`` or ``(X, Y, Z)`` on the cached grid (a leading channel of 1 is dropped).
        overlay: same shape as ``image``, or None.
        boxes: ``[K, 2 * D]`` boxes on the same grid.
        affine: ``[4, 4]`` voxel -> RAS+ mm; required in 3D (the orientation comes from it).
        views: 3D only: which of ``axial``, ``coronal``, ``sagittal``.
        at: 3D only: the voxel ``(L, P, S)`` of the reoriented volume the slices go through; default the overlay's
            peak, or the centre without an overlay.

    Returns:
        One :class:`Plane` for a 2D image, one per view in 3D.
    """
    img = np.asarray(image, dtype=np.float32)
    if img.ndim in (3, 4) and img.shape[0] == 1 and img.ndim - 1 in (2, 3):
        img = img[0]
    ov = None if overlay is None else np.asarray(overlay, dtype=np.float32).reshape(img.shape)
    d = img.ndim
    bx = np.zeros((0, 2 * d)) if boxes is None else np.asarray(boxes, dtype=float).reshape(-1, 2 * d)
    if d == 2:
        return [Plane("", img.T, None if ov is None else ov.T, [tuple(map(float, b)) for b in bx], [True] * len(bx))]
    if d != 3:
        raise ValueError(f"an image to draw is 2D or 3D, got shape {img.shape}")
    if affine is None:
        raise ValueError("a 3D volume needs its affine to be drawn in the radiological convention")
    ornt = _to_lps(img.shape, affine)
    vol = display_volume(img, affine)
    ovl = None if ov is None else display_volume(ov, affine)
    bxl = _display_boxes(bx, img.shape, ornt) if len(bx) else bx
    centre = tuple(int(at[i]) for i in range(3)) if at is not None else (peak(ovl) if ovl is not None else None)
    if centre is None:
        centre = tuple(s // 2 for s in vol.shape)
    out = []
    for view in views:
        if view not in _FIXED:
            raise ValueError(f"unknown view {view!r}; the views are {', '.join(VIEWS)}")
        axis = _FIXED[view]
        index = centre[axis]
        solid = [b[axis] <= index + 0.5 < b[axis] + b[3 + axis] for b in bxl]
        label = f"{view} {'LPS'[axis]}={index}"
        out.append(
            Plane(
                label,
                _plane_of(vol, view, index),
                None if ovl is None else _plane_of(ovl, view, index),
                [_box_in(view, b, vol.shape) for b in bxl],
                solid,
                int(index),
            )
        )
    return out
