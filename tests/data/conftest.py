"""Fixtures for the reader tests: synthetic CT series written slice by slice with pydicom."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

AXIAL = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0))
PATIENT_NAME = "Phantom^Synthetic"
PATIENT_ID = "PHANTOM-0042"


def rotation(z_deg: float, x_deg: float) -> np.ndarray:
    """Rotation about z then x; its first two columns make an oblique ImageOrientationPatient."""
    cz, sz = np.cos(np.radians(z_deg)), np.sin(np.radians(z_deg))
    cx, sx = np.cos(np.radians(x_deg)), np.sin(np.radians(x_deg))
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    return rz @ rx


def phantom_hu(shape: tuple[int, int, int] = (24, 20, 12)) -> np.ndarray:
    """A ``[X, Y, Z]`` HU volume: a gradient along every axis and a 1500 HU cube at [5:9, 12:16, 7:10]."""
    i, j, k = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    hu = -1000 + 10 * i + 3 * j + 40 * k
    hu[5:9, 12:16, 7:10] = 1500
    return hu.astype(np.float32)


@dataclass
class WrittenSeries:
    folder: Path
    files: list[Path]  # in ascending position order along the slice normal
    hu: np.ndarray  # [X, Y, Z] physical values in position order
    cosines: np.ndarray  # (2, 3) row and column direction cosines, LPS
    spacing: tuple[float, float, float]
    origin: np.ndarray  # LPS position of the first slice


def write_slice(
    path: Path,
    stored: np.ndarray,
    *,
    position: Sequence[float],
    cosines: np.ndarray,
    spacing: tuple[float, float, float],
    series_uid: str,
    study_uid: str,
    instance: int,
    intercept: float = -1024.0,
    slope: float = 1.0,
    modality: str = "CT",
) -> Path:
    """Write one CT (or MR) slice; ``stored`` is ``[Rows, Columns]`` int16 (pixel_array layout)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage if modality == "CT" else MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, generate_uid()
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = PATIENT_NAME, PATIENT_ID, "19700101"
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber = "20240102", "101010", "ACC-7777"
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber, ds.AcquisitionNumber = modality, 3, instance, 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ImageOrientationPatient = [round(float(v), 8) for v in np.ravel(cosines)]
    ds.ImagePositionPatient = [round(float(v), 4) for v in position]
    ds.PixelSpacing = [spacing[1], spacing[0]]  # (between rows, between columns)
    ds.SliceThickness = spacing[2]
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = intercept, slope, "HU"
    ds.PixelData = np.ascontiguousarray(stored, dtype="<i2").tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture()
def write_series(tmp_path: Path) -> Callable[..., WrittenSeries]:
    """Return ``write(name, hu=None, *, cosines=AXIAL, spacing, origin, offsets, drop, slopes, ...)``.

    Files get random names and are written in a shuffled order with scrambled InstanceNumbers. ``offsets``
    overrides the positions (mm along the normal from ``origin``) of the slices; ``drop`` lists slice
    indices not written; ``folder`` and ``series_uid`` let several calls share a folder or a series.
    """
    rng = np.random.default_rng(7)

    def write(
        name: str,
        hu: np.ndarray | None = None,
        *,
        cosines: Sequence[Sequence[float]] | np.ndarray = AXIAL,
        spacing: tuple[float, float, float] = (0.8, 0.7, 2.5),
        origin: Sequence[float] = (-40.0, -30.0, 100.0),
        offsets: Sequence[float] | None = None,
        drop: Sequence[int] = (),
        slopes: Sequence[float] | None = None,
        series_uid: str | None = None,
        folder: Path | None = None,
        modality: str = "CT",
    ) -> WrittenSeries:
        hu = phantom_hu() if hu is None else hu
        folder = folder or tmp_path / name
        folder.mkdir(parents=True, exist_ok=True)
        cos = np.asarray(cosines, dtype=np.float64)
        normal = np.cross(cos[0], cos[1])
        offsets = np.arange(hu.shape[2]) * spacing[2] if offsets is None else np.asarray(offsets, dtype=float)
        slopes = [1.0] * hu.shape[2] if slopes is None else slopes
        series_uid, study_uid = series_uid or generate_uid(), generate_uid()
        keep = [k for k in range(hu.shape[2]) if k not in drop]
        instances = rng.permutation(len(keep)) + 1
        files: dict[int, Path] = {}
        physical = np.empty_like(hu)
        for n, k in enumerate(rng.permutation(keep)):
            stored = np.round((hu[:, :, k] + 1024.0) / slopes[k]).T
            physical[:, :, k] = stored.T * slopes[k] - 1024.0
            files[int(k)] = write_slice(
                folder / uuid.UUID(bytes=rng.bytes(16)).hex,
                stored,
                position=np.asarray(origin) + normal * offsets[k],
                cosines=cos,
                spacing=spacing,
                series_uid=series_uid,
                study_uid=study_uid,
                instance=int(instances[n]),
                slope=slopes[k],
                modality=modality,
            )
        return WrittenSeries(folder, [files[k] for k in keep], physical[:, :, keep], cos, spacing, np.asarray(origin))

    return write
