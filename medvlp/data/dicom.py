"""DICOM reading: one file (2D, multi-frame, enhanced multi-frame) or a folder holding one series.

Pixels are decoded by pydicom (compressed syntaxes through pylibjpeg), put in physical units (Modality LUT
or rescale, per frame or slice), MONOCHROME1 inverted and color turned to luminance; axes and affine follow
:class:`medvlp.data.image.MedicalImage`. Error messages name the file and the problem, never header values
of identifying elements.
"""

from __future__ import annotations

import logging
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut, apply_modality_lut, convert_color_space, get_decoder

from medvlp.data.image import ImageReadError, ImageTooLargeError, MedicalImage
from medvlp.data.privacy import MODALITIES, PHOTOMETRIC_INTERPRETATIONS, standard_term

logger = logging.getLogger(__name__)

_PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


_DEFLATED = "1.2.840.10008.1.2.1.99"


def check_inflated_size(path: Path, max_decoded: int) -> None:
    """Refuse a Deflated Explicit VR file whose dataset inflates beyond half the decoded-size limit (16-bit pixels
    become 32-bit floats), before pydicom inflates it whole: the stream is inflated in bounded pieces and counted,
    never kept.

    Raises:
        ImageTooLargeError: the inflated dataset is larger than ``max_decoded // 2``.
    """
    limit = max_decoded // 2
    with path.open("rb") as fh:
        head = fh.read(132)
        if len(head) < 132 or head[128:132] != b"DICM":
            return
        try:
            meta = pydicom.filereader.read_file_meta_info(path)
        except Exception:  # the reader reports a broken header in its own words
            return
        if str(meta.get("TransferSyntaxUID", "")) != _DEFLATED:
            return
        group = meta.get("FileMetaInformationGroupLength")
        if group is None:
            raise ImageReadError(f"{path}: deflated DICOM without a file meta group length")
        fh.seek(132 + 12 + int(group))  # (0002,0000) UL takes 12 bytes in explicit VR
        inflate, total = zlib.decompressobj(-zlib.MAX_WBITS), 0
        try:
            while (chunk := fh.read(1 << 16)) and not inflate.eof:
                total += len(inflate.decompress(chunk, 1 << 20))
                while inflate.unconsumed_tail and total <= limit:
                    total += len(inflate.decompress(inflate.unconsumed_tail, 1 << 20))
                if total > limit:
                    raise ImageTooLargeError(
                        f"{path}: the deflated dataset inflates to more than {limit >> 20} MiB (the decoded-size limit)"
                    )
        except zlib.error as exc:
            raise ImageReadError(f"{path}: the deflated dataset is corrupted") from exc


def _shown_pi(value: str) -> str:
    return standard_term(value, PHOTOMETRIC_INTERPRETATIONS)


class _StackError(ValueError):
    """Slice positions do not form one evenly spaced stack."""


def _read_dataset(path: Path, max_bytes: int | None = None) -> Dataset:
    """Read a whole DICOM file (header and undecoded pixel data); every failure is an ImageReadError."""
    if not path.exists():
        raise ImageReadError(f"{path}: no such file")
    if path.is_dir():
        raise ImageReadError(f"{path}: is a folder, not a DICOM file")
    if path.stat().st_size == 0:
        raise ImageReadError(f"{path}: empty file (0 bytes)")
    if max_bytes is not None:
        check_inflated_size(path, max_bytes)
    try:
        return pydicom.dcmread(path)
    except InvalidDicomError as exc:
        raise ImageReadError(f"{path}: not a DICOM file (no 'DICM' marker after the 128-byte preamble)") from exc
    except Exception as exc:  # pydicom raises struct.error, EOFError, KeyError... on damaged headers
        raise ImageReadError(f"{path}: DICOM header is truncated or corrupted ({type(exc).__name__})") from exc


def _has_pixels(ds: Dataset) -> bool:
    return any(tag in ds for tag in _PIXEL_TAGS)


def _sop_class(ds: Dataset) -> Any:
    file_meta = getattr(ds, "file_meta", None)
    return (file_meta.get("MediaStorageSOPClassUID") if file_meta is not None else None) or ds.get("SOPClassUID")


def _is_dicomdir(ds: Dataset) -> bool:
    return str(_sop_class(ds)) == _DICOMDIR_SOP_CLASS or "DirectoryRecordSequence" in ds


def _claims_image(ds: Dataset) -> bool:
    """True when the header says 'image' (image SOP class or image pixel module) whatever the pixel data."""
    return "Rows" in ds or "Image Storage" in str(getattr(_sop_class(ds), "name", ""))


def _floats(value: Any, n: int) -> np.ndarray | None:
    """``n`` finite floats from a DICOM value (DS, multi-value...), or None when absent or malformed."""
    if value is None or value == "":
        return None
    try:
        out = np.asarray([float(v) for v in value] if n > 1 else [float(value)], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return out if out.shape == (n,) and np.isfinite(out).all() else None


def _fg(ds: Dataset, sequence: str, keyword: str, frame: int = 0) -> Any:
    """An attribute from the per-frame, then shared functional groups, then the top-level dataset."""
    for groups_name, index in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        groups = ds.get(groups_name)
        if groups and len(groups) > index:
            inner = groups[index].get(sequence)
            if inner and inner[0].get(keyword) is not None:
                return inner[0].get(keyword)
    return ds.get(keyword)


def _n_frames(ds: Dataset) -> int:
    frames = _floats(ds.get("NumberOfFrames"), 1)
    return 1 if frames is None else int(frames[0])


def _pixel_spacing(ds: Dataset) -> tuple[float, float]:
    """Spacing along ``i`` (between columns) and ``j`` (between rows); PixelSpacing is (row, column)."""
    for value in (_fg(ds, "PixelMeasuresSequence", "PixelSpacing"), ds.get("ImagerPixelSpacing")):
        spacing = _floats(value, 2)
        if spacing is not None and (spacing > 0).all():
            return float(spacing[1]), float(spacing[0])
    return 1.0, 1.0


def _nominal_gap(ds: Dataset) -> float:
    for keyword in ("SpacingBetweenSlices", "SliceThickness"):
        gap = _floats(_fg(ds, "PixelMeasuresSequence", keyword), 1)
        if gap is not None and gap[0] != 0:
            return abs(float(gap[0]))
    return 1.0


def _orientation(ds: Dataset, frame: int = 0) -> np.ndarray | None:
    """Unit row and column direction cosines (2, 3) in LPS, or None."""
    cosines = _floats(_fg(ds, "PlaneOrientationSequence", "ImageOrientationPatient", frame), 6)
    if cosines is None:
        return None
    cosines = cosines.reshape(2, 3)
    norms = np.linalg.norm(cosines, axis=1)
    return None if (norms < 1e-3).any() else cosines / norms[:, None]


def _position(ds: Dataset, frame: int = 0) -> np.ndarray | None:
    return _floats(_fg(ds, "PlanePositionSequence", "ImagePositionPatient", frame), 3)


def lps_to_ras_affine(
    cosines: np.ndarray, spacing_ij: tuple[float, float], step: np.ndarray, origin: np.ndarray
) -> np.ndarray:
    """Build the RAS+ affine of a DICOM image from its LPS geometry.

    Args:
        cosines: (2, 3) row and column direction cosines (ImageOrientationPatient).
        spacing_ij: spacing along ``i`` (between columns) and ``j`` (between rows), mm.
        step: LPS vector from one slice (or frame) to the next, mm.
        origin: LPS position of the centre of the first voxel (ImagePositionPatient of the first slice).

    Returns:
        4x4 matrix mapping ``(i, j, k, 1)`` to RAS+ mm.
    """
    affine = np.eye(4)
    affine[:3, 0] = cosines[0] * spacing_ij[0]
    affine[:3, 1] = cosines[1] * spacing_ij[1]
    affine[:3, 2] = step
    affine[:3, 3] = origin
    return _LPS_TO_RAS @ affine


def _stack(positions: np.ndarray, normal: np.ndarray) -> tuple[np.ndarray, float, np.ndarray]:
    """Order positions along ``normal`` and check they form one evenly spaced stack.

    Returns:
        (order, gap, step): indices sorting the slices by ascending position along the normal, the median
        gap in mm and the LPS step between consecutive sorted slices (``normal * gap`` unless the stack
        is sheared, as with a gantry tilt, where it is the mean step between slices).

    Raises:
        _StackError: duplicate positions, a missing slice or uneven spacing.
    """
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    sorted_along = along[order]
    gaps = np.diff(sorted_along)
    duplicates = np.flatnonzero(gaps < 1e-3)
    if duplicates.size:
        where = sorted_along[duplicates[0]]
        raise _StackError(
            f"{duplicates.size + 1} images share a slice position ({where:.3f} mm along the slice normal, "
            "among others): several echoes, phases or time points in one series are not a 3D volume"
        )
    gap = float(np.median(gaps))
    ratios = gaps / gap
    too_wide = np.flatnonzero(ratios > 1.5)
    if too_wide.size:
        index = too_wide[0]
        raise _StackError(
            f"missing slice: gap of {gaps[index]:.3f} mm between positions {sorted_along[index]:.3f} and "
            f"{sorted_along[index + 1]:.3f} mm along the slice normal, {ratios[index]:.1f} times the usual "
            f"{gap:.3f} mm"
        )
    uneven = np.flatnonzero(np.abs(ratios - 1.0) > 1e-2)
    if uneven.size:
        raise _StackError(
            f"uneven slice spacing: gaps from {gaps.min():.3f} to {gaps.max():.3f} mm (median {gap:.3f} mm, "
            f"{uneven.size} gap(s) differ by more than 1%)"
        )
    total = positions[order[-1]] - positions[order[0]]
    drift = total - (total @ normal) * normal
    step = total / (len(positions) - 1) if np.linalg.norm(drift) > 1e-2 * gap else normal * gap
    return order, gap, step


def _decode(ds: Dataset, path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    """Decode all frames as float32 ``[F, Rows, Columns]`` in physical units, plus technical meta."""
    if not _has_pixels(ds):
        if _claims_image(ds):
            raise ImageReadError(f"{path}: image header without pixel data (the file is probably truncated)")
        raise ImageReadError(f"{path}: no pixel data: not an image (a report, plan, waveform or other document)")
    file_meta = getattr(ds, "file_meta", None)
    syntax = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
    if not syntax:
        raise ImageReadError(f"{path}: the file meta header has no transfer syntax; cannot decode the pixels")
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError as exc:
        raise ImageReadError(f"{path}: unsupported transfer syntax {syntax.name} ({syntax})") from exc
    if not decoder.is_available:
        raise ImageReadError(f"{path}: no installed plugin can decode {syntax.name} (install pylibjpeg plugins)")
    try:
        raw, info = decoder.as_array(ds)
    except Exception as exc:  # decoders raise ValueError, RuntimeError, AttributeError...
        detail = " ".join(str(exc).split())
        for keyword in ("PhotometricInterpretation", "Modality"):  # a decoder may quote them: never echo free text
            value = str(ds.get(keyword, "") or "").strip()
            if value:
                detail = detail.replace(value, "other" if keyword == "Modality" else _shown_pi(value))
        detail = detail[:300]
        what = "pixel data is truncated" if "less than expected" in detail else "pixel data could not be decoded"
        raise ImageReadError(f"{path}: {what} ({syntax.name}: {detail})") from exc

    frames = int(info.get("number_of_frames") or 1)
    rows, columns = int(info["rows"]), int(info["columns"])
    samples = int(info.get("samples_per_pixel") or 1)
    photometric = str(info.get("photometric_interpretation") or ds.get("PhotometricInterpretation", "")).strip()
    shown = standard_term(photometric, PHOTOMETRIC_INTERPRETATIONS)  # messages echo the standard's terms only
    meta: dict[str, Any] = {
        "modality": standard_term(ds.get("Modality", ""), MODALITIES),
        "photometric_interpretation": standard_term(
            ds.get("PhotometricInterpretation", ""), PHOTOMETRIC_INTERPRETATIONS
        ),
        "transfer_syntax_uid": str(syntax),
        "transfer_syntax": syntax.name,
        "number_of_frames": frames,
        "rows": rows,
        "columns": columns,
        "bits_allocated": int(info.get("bits_allocated") or 0),
        "bits_stored": int(info.get("bits_stored") or ds.get("BitsStored") or 0),
        "pixel_representation": int(info.get("pixel_representation") or 0),
        "inverted": False,
        "color_converted": False,
    }
    try:
        if photometric == "PALETTE COLOR":
            raw, photometric = apply_color_lut(raw, ds), "RGB"
        elif samples == 3 and photometric.startswith("YBR"):
            raw, photometric = convert_color_space(raw, photometric, "RGB", per_frame=frames > 1), "RGB"
    except Exception as exc:
        raise ImageReadError(f"{path}: could not convert {shown} pixels to RGB ({type(exc).__name__})") from exc
    if samples == 3 or photometric == "RGB":
        if raw.shape[-1] != 3:
            raise ImageReadError(f"{path}: {shown} image does not have 3 samples per pixel")
        rgb = raw.reshape(frames, rows, columns, 3)
        luminance = np.zeros((frames, rows, columns), dtype=np.float32)
        for channel, weight in enumerate(_LUMA):
            luminance += rgb[..., channel] * weight
        meta.update(color_converted=True, color_to_luminance="0.299R+0.587G+0.114B")
        return luminance, meta
    if samples != 1:
        raise ImageReadError(f"{path}: unsupported image with {samples} samples per pixel ({shown})")
    stored = raw.reshape(frames, rows, columns)
    physical, lo, hi = _to_physical(ds, stored, meta)
    if photometric == "MONOCHROME1":
        np.subtract((lo + hi)[:, None, None], physical, out=physical)
        meta["inverted"] = True
    return physical, meta


def _to_physical(ds: Dataset, stored: np.ndarray, meta: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Modality LUT or per-frame rescale as float32, and per-frame physical values of the storable extremes."""
    bits, signed = meta["bits_stored"] or 8 * stored.itemsize, meta["pixel_representation"] == 1
    extremes = np.array([-(2 ** (bits - 1)), 2 ** (bits - 1) - 1] if signed else [0, 2**bits - 1], dtype=np.int64)
    n = stored.shape[0]
    if ds.get("ModalityLUTSequence"):
        meta["modality_lut"] = True
        physical = apply_modality_lut(stored, ds).astype(np.float32)
        ends = apply_modality_lut(extremes, ds).astype(np.float64)
        return physical, np.full(n, ends.min(), np.float32), np.full(n, ends.max(), np.float32)
    slopes, intercepts = np.ones(n), np.zeros(n)
    for frame in range(n):
        slope = _floats(_fg(ds, "PixelValueTransformationSequence", "RescaleSlope", frame), 1)
        intercept = _floats(_fg(ds, "PixelValueTransformationSequence", "RescaleIntercept", frame), 1)
        slopes[frame] = 1.0 if slope is None else slope[0]
        intercepts[frame] = 0.0 if intercept is None else intercept[0]
    uniform = np.all(slopes == slopes[0]) and np.all(intercepts == intercepts[0])
    meta["rescale_slope"] = float(slopes[0]) if uniform else slopes.tolist()
    meta["rescale_intercept"] = float(intercepts[0]) if uniform else intercepts.tolist()
    physical = stored.astype(np.float32)  # in place from here: large multi-frame images stay affordable
    physical *= slopes.astype(np.float32)[:, None, None]
    physical += intercepts.astype(np.float32)[:, None, None]
    ends = extremes[None, :] * slopes[:, None] + intercepts[:, None]
    return physical, ends.min(axis=1).astype(np.float32), ends.max(axis=1).astype(np.float32)


def _file_geometry(ds: Dataset, frames: int, path: Path, meta: dict[str, Any]) -> tuple[tuple[float, ...], np.ndarray]:
    """Spacing and RAS affine of a single file (2D image or stack of frames)."""
    spacing_ij = _pixel_spacing(ds)
    gap = _nominal_gap(ds)
    cosines, origin = _orientation(ds), _position(ds)
    spacing = (*spacing_ij, gap) if frames > 1 else spacing_ij
    if cosines is None or origin is None:
        return spacing, np.diag([*spacing_ij, gap, 1.0])
    normal = np.cross(cosines[0], cosines[1])
    step = normal * gap
    if frames > 1 and "PerFrameFunctionalGroupsSequence" in ds:
        positions = [_position(ds, f) for f in range(frames)]
        planes = [_orientation(ds, f) for f in range(frames)]
        try:
            if any(p is None for p in positions) or not all(
                c is not None and np.allclose(c, cosines, atol=1e-4) for c in planes
            ):
                raise _StackError("frames lack positions or have different orientations")
            order, gap, step = _stack(np.asarray(positions), normal)
            if not (np.array_equal(order, np.arange(frames)) or np.array_equal(order, np.arange(frames)[::-1])):
                raise _StackError("frames are not stored in position order")
            step = step if order[0] == 0 else -step
            spacing = (*spacing_ij, gap)
        except _StackError as exc:
            logger.warning("%s: frame geometry is approximate (%s)", path, exc)
            meta["frame_geometry"] = f"approximate: {exc}"
    elif frames > 1 and _floats(ds.get("GridFrameOffsetVector"), frames) is not None:
        offsets = _floats(ds.get("GridFrameOffsetVector"), frames)
        steps = np.diff(offsets)
        if np.allclose(steps, steps[0], rtol=1e-2) and steps[0] != 0:
            step, spacing = normal * steps[0], (*spacing_ij, abs(float(steps[0])))
    return spacing, lps_to_ras_affine(cosines, spacing_ij, step, origin)


def read_dicom_file(path: str | Path, max_bytes: int | None = None) -> MedicalImage:
    """Read one DICOM file: a 2D image ``[X, Y]`` or a multi-frame image ``[X, Y, F]``.

    Args:
        path: the DICOM file.

    Returns:
        The image in physical units with its spacing and RAS+ affine.

    Raises:
        ImageReadError: missing, empty, non-DICOM, truncated or undecodable file, or no pixel data.
    """
    path = Path(path)
    ds = _read_dataset(path, max_bytes)
    if _is_dicomdir(ds):
        raise ImageReadError(f"{path}: is a DICOMDIR (an index of other files), not an image")
    frames, meta = _decode(ds, path)
    spacing, affine = _file_geometry(ds, frames.shape[0], path, meta)
    array = frames[0].T if frames.shape[0] == 1 else frames.transpose(2, 1, 0)
    meta["n_files"] = 1
    return MedicalImage(np.ascontiguousarray(array), tuple(float(s) for s in spacing), affine, meta)


def _series_member(path: Path, max_bytes: int | None = None) -> Dataset | None:
    """The dataset of an image file of a series folder, or None for a file to skip (non-DICOM, DICOMDIR...)."""
    if path.stat().st_size == 0:
        logger.info("%s: skipped (empty file)", path)
        return None
    if max_bytes is not None:
        check_inflated_size(path, max_bytes)
    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError:
        logger.info("%s: skipped (not a DICOM file)", path)
        return None
    except Exception as exc:
        raise ImageReadError(f"{path}: DICOM header is truncated or corrupted ({type(exc).__name__})") from exc
    if _is_dicomdir(ds) or not (_has_pixels(ds) or _claims_image(ds)):
        logger.info("%s: skipped (DICOM file without an image)", path)
        return None
    if not _has_pixels(ds):
        raise ImageReadError(f"{path}: DICOM image file without pixel data (the file is probably truncated)")
    return ds


def read_dicom_series(folder: str | Path, max_bytes: int | None = None) -> MedicalImage:
    """Read a folder holding one DICOM series as a 3D volume ``[X, Y, Z]``.

    Slices are ordered by their position along the slice normal (``cross(row, column)`` direction cosines),
    ascending; file names and InstanceNumber are ignored. Hidden files, non-DICOM files and DICOM files
    without an image (DICOMDIR, reports) are skipped. A folder with a single image file is read as that file.

    Args:
        folder: the series folder (not searched recursively).

    Returns:
        The volume in physical units (rescale applied per slice), spacing ``(di, dj, median gap)`` and the
        RAS+ affine whose origin is the lowest slice along the normal.

    Raises:
        ImageReadError: no image, several series, mixed sizes, orientations or pixel spacings, missing
            geometry, duplicate positions, a missing slice, uneven spacing, or an unreadable slice.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ImageReadError(f"{folder}: no such folder")
    members: list[tuple[Path, Dataset]] = []
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    for path in files:
        ds = _series_member(path, max_bytes)
        if ds is not None:
            members.append((path, ds))
    skipped = len(files) - len(members)
    if not members:
        raise ImageReadError(f"{folder}: no DICOM image in this folder ({skipped} other file(s) skipped)")
    if len(members) == 1:
        image = read_dicom_file(members[0][0], max_bytes)
        image.meta["skipped_files"] = skipped
        return image

    def refuse(problem: str) -> ImageReadError:
        return ImageReadError(f"{folder}: cannot stack {len(members)} DICOM images as one volume: {problem}")

    series = Counter(str(ds.get("SeriesInstanceUID", "")) for _, ds in members)
    if len(series) > 1:
        sizes = ", ".join(str(n) for n in sorted(series.values(), reverse=True))
        raise refuse(f"folder holds {len(series)} series ({sizes} images); put each series in its own folder")
    if any(_n_frames(ds) > 1 for _, ds in members):
        raise refuse("it holds multi-frame files; read each multi-frame file on its own")
    shapes = Counter(f"{ds.get('Rows')}x{ds.get('Columns')}" for _, ds in members)
    if len(shapes) > 1:
        raise refuse(f"images have different sizes (rows x columns: {', '.join(sorted(shapes))})")
    cosines = [_orientation(ds) for _, ds in members]
    positions = [_position(ds) for _, ds in members]
    missing = sum(c is None or p is None for c, p in zip(cosines, positions, strict=True))
    if missing:
        raise refuse(
            f"{missing} image(s) lack ImageOrientationPatient/ImagePositionPatient, so slices can't be ordered"
        )
    if not all(np.allclose(c, cosines[0], atol=1e-4) for c in cosines):
        raise refuse("images have different orientations (ImageOrientationPatient differs)")
    spacings = [_pixel_spacing(ds) for _, ds in members]
    if not all(np.allclose(s, spacings[0], rtol=1e-4) for s in spacings):
        raise refuse("images have different pixel spacings")
    normal = np.cross(cosines[0][0], cosines[0][1])
    try:
        order, gap, step = _stack(np.asarray(positions), normal)
    except _StackError as exc:
        raise refuse(str(exc)) from exc

    array = np.empty((int(members[0][1].Columns), int(members[0][1].Rows), len(order)), dtype=np.float32)
    metas = []
    for k, index in enumerate(order):  # one slice decoded at a time: peak memory ~ the volume
        frames, slice_meta = _decode(members[index][1], members[index][0])
        array[:, :, k] = frames[0].T
        metas.append(slice_meta)
    meta = dict(metas[0])
    for key in ("rescale_slope", "rescale_intercept", "transfer_syntax_uid", "inverted"):
        values = [m.get(key) for m in metas]
        meta[key] = values[0] if all(v == values[0] for v in values) else values
    meta.update(number_of_frames=1, n_files=len(members), skipped_files=skipped)
    affine = lps_to_ras_affine(cosines[0], spacings[0], step, positions[order[0]])
    return MedicalImage(array, (*spacings[0], gap), affine, meta)
