"""The in-memory image type every reader returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


class ImageReadError(ValueError):
    """An image could not be read; the message says why in the user's terms (file, what is wrong)."""


class ImageTooLargeError(ImageReadError):
    """An image whose decoded size (pixels x frames x samples x 4 bytes) exceeds the allowed limit, found from its
    headers before any pixel is decoded (decompression bombs)."""


@dataclass
class MedicalImage:
    """A decoded image in physical units, with its geometry and no resampling.

    Axis convention (the one MONAI's readers use): ``array[i, j(, k)]`` where ``i`` runs along a DICOM
    row (image x, the columns), ``j`` down the rows (image y) and ``k`` across slices or frames.
    So a radiograph of ``Rows x Columns`` pixels has ``array.shape == (Columns, Rows)``.

    Attributes:
        array: float32 values in physical units (stored value * RescaleSlope + RescaleIntercept; HU for CT;
            MONOCHROME1 inverted so that higher is brighter). Shape ``[X, Y]`` (2D) or ``[X, Y, Z]`` (3D).
        spacing: voxel size in mm along each array axis.
        affine: 4x4 matrix mapping ``(i, j, k, 1)`` to RAS+ world coordinates in mm (as nibabel).
        meta: technical, non-identifying facts (modality, photometric interpretation, transfer syntax,
            number of source files...). Never names, IDs, dates or accession numbers.
    """

    array: np.ndarray
    spacing: tuple[float, ...]
    affine: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.array.ndim not in (2, 3):
            raise ImageReadError(f"expected a 2D or 3D image, got an array of shape {self.array.shape}")
        if len(self.spacing) != self.array.ndim:
            raise ImageReadError(f"spacing {self.spacing} does not match array shape {self.array.shape}")
        if self.affine.shape != (4, 4):
            raise ImageReadError(f"affine must be 4x4, got {self.affine.shape}")

    @property
    def spatial_dims(self) -> int:
        return int(self.array.ndim)
