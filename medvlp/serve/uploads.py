"""Uploaded bytes -> a path the repository's reader opens: a DICOM file, a DICOM series folder, NIfTI or PNG.

The kind is told from the content, never from the client's file name (which is not even kept: it may carry a
patient's name). A zip is unpacked into one flat folder under neutral names, within limits on the member count
and the unpacked size (zip bombs), and must hold one DICOM series, or one NIfTI/PNG file.
"""

from __future__ import annotations

import logging
import shutil
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import pydicom
from pydicom.errors import InvalidDicomError

from medvlp.data.dicom import check_inflated_size
from medvlp.data.image import ImageReadError, ImageTooLargeError, MedicalImage
from medvlp.data.readers import ImageProbe, check_decoded_size, probe_image, read_image
from medvlp.serve.errors import ApiError

logger = logging.getLogger(__name__)

__all__ = ["UploadLimits", "check_upload_size", "count_series", "probe_upload", "read_upload", "save_upload", "sniff"]

_CHUNK = 1 << 20


@dataclass(frozen=True)
class UploadLimits:
    """Bounds on what one request may make the server read.

    Attributes:
        max_bytes: the largest upload (and DICOMweb answer); beyond it, 413.
        max_members: the most files in a zip (or instances in a DICOMweb series).
        max_unpacked: the most bytes a zip may unpack to.
        max_decoded: the most bytes an image may decode to (pixels x frames x samples x 4, a whole series
            counted), told from its headers before decoding; beyond it, 413.
    """

    max_bytes: int = 256 << 20
    max_members: int = 4000
    max_unpacked: int = 1 << 30
    max_decoded: int = 512 << 20


def sniff(head: bytes) -> str:
    """``zip``, ``png``, ``jpeg``, ``nifti``, ``nifti-gz`` or ``dicom`` (the fallback, which the reader checks)."""
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return "zip"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"\x1f\x8b"):
        return "nifti-gz"
    if len(head) >= 348 and head[344:348] in (b"n+1\x00", b"ni1\x00"):
        return "nifti"
    if len(head) >= 8 and head[4:8] in (b"n+2\x00", b"ni2\x00"):
        return "nifti"
    return "dicom"


_SUFFIX = {"png": "upload.png", "jpeg": "upload.jpg", "nifti": "upload.nii", "nifti-gz": "upload.nii.gz"}


def _copy_limited(src: IO[bytes], dst: Path, limit: int) -> int:
    n = 0
    with dst.open("wb") as out:
        while chunk := src.read(_CHUNK):
            n += len(chunk)
            if n > limit:
                raise ApiError(413, "payload_too_large", f"the upload is larger than the limit of {limit >> 20} MiB")
            out.write(chunk)
    return n


def _members(zf: zipfile.ZipFile) -> list[zipfile.ZipInfo]:
    out = []
    for info in zf.infolist():
        name = info.filename.replace("\\", "/")
        base = name.rsplit("/", 1)[-1]
        if info.is_dir() or not base or base.startswith(".") or name.startswith("__MACOSX/"):
            continue
        out.append(info)
    return out


def _unzip(archive: Path, dest: Path, limits: UploadLimits) -> Path:
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ApiError(422, "unreadable_image", "the upload looks like a zip archive but cannot be opened") from exc
    with zf:
        members = _members(zf)
        if not members:
            raise ApiError(422, "unreadable_image", "the zip archive holds no file")
        if len(members) > limits.max_members:
            raise ApiError(413, "payload_too_large", f"the zip holds {len(members)} files (limit {limits.max_members})")
        if sum(i.file_size for i in members) > limits.max_unpacked:
            raise ApiError(413, "payload_too_large", f"the zip unpacks to more than {limits.max_unpacked >> 20} MiB")
        dest.mkdir()
        total = 0
        for k, info in enumerate(members):
            target = dest / f"{k:06d}"  # neutral names: member names may carry identifiers, or '../'
            try:
                with zf.open(info) as src, target.open("wb") as out:
                    while chunk := src.read(_CHUNK):
                        total += len(chunk)
                        if total > limits.max_unpacked:  # the header's sizes can lie
                            raise ApiError(
                                413,
                                "payload_too_large",
                                f"the zip unpacks to more than {limits.max_unpacked >> 20} MiB",
                            )
                        out.write(chunk)
            except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError, RuntimeError) as exc:
                raise ApiError(422, "unreadable_image", "the zip archive is corrupted or encrypted") from exc
    files = sorted(dest.iterdir())
    if len(files) == 1:
        with files[0].open("rb") as fh:
            kind = sniff(fh.read(512))
        if kind in _SUFFIX:  # a zipped NIfTI or PNG: read it as such
            return files[0].rename(dest / _SUFFIX[kind])
    return dest


def save_upload(src: IO[bytes], workdir: Path, limits: UploadLimits) -> Path:
    """Copy an upload into ``workdir`` and return what :func:`read_upload` should open.

    Raises:
        ApiError: 400 for an empty upload, 413 beyond the limits, 422 for a broken zip.
    """
    raw = workdir / "upload.bin"
    n = _copy_limited(src, raw, limits.max_bytes)
    if n == 0:
        raise ApiError(400, "empty_upload", "the uploaded file is empty (0 bytes)")
    with raw.open("rb") as fh:
        kind = sniff(fh.read(512))
    if kind == "zip":
        path = _unzip(raw, workdir / "series", limits)
        raw.unlink()
        return path
    return raw.rename(workdir / _SUFFIX.get(kind, "upload.dcm"))


def count_series(files: Iterable[Path], max_bytes: int | None = None) -> int:
    """How many distinct SeriesInstanceUIDs the DICOM files among ``files`` hold (headers only; a Deflate file is
    inflated only up to ``max_bytes``, else :class:`ImageTooLargeError`)."""
    uids = set()
    for p in files:
        if max_bytes is not None:
            check_inflated_size(p, max_bytes)
        try:
            ds = pydicom.dcmread(p, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
        except (InvalidDicomError, OSError, EOFError, ValueError, TypeError, AttributeError):
            continue
        uids.add(str(ds.get("SeriesInstanceUID", "")))
    return len(uids)


def _too_large(exc: ImageTooLargeError, workdir: Path) -> ApiError:
    return ApiError(413, "image_too_large", _scrub(str(exc), workdir).replace(str(workdir), "upload"))


def probe_upload(path: Path, workdir: Path, limits: UploadLimits) -> ImageProbe | None:
    """The decoded shape of a saved upload, from its headers (no pixel decoded; a Deflate DICOM inflated, counted
    and dropped, only up to the limit). Check it with :func:`check_upload_size`.

    Raises:
        ApiError: 413 ``image_too_large`` (a Deflate bomb), 422 ``multiple_series``.
    """
    try:
        if path.is_dir():
            n = count_series((p for p in path.iterdir() if p.is_file()), limits.max_decoded)
            if n > 1:
                raise ApiError(
                    422, "multiple_series", f"the upload holds {n} DICOM series; send one series per request"
                )
        return probe_image(path, limits.max_decoded)
    except ImageTooLargeError as exc:
        raise _too_large(exc, workdir) from exc


def check_upload_size(probe: ImageProbe | None, workdir: Path, limits: UploadLimits) -> None:
    """413 ``image_too_large`` when the probed image would decode to more than ``limits.max_decoded`` bytes."""
    try:
        check_decoded_size(probe, limits.max_decoded, "the upload")
    except ImageTooLargeError as exc:
        raise _too_large(exc, workdir) from exc


def read_upload(path: Path, workdir: Path, max_decoded: int | None = None) -> MedicalImage:
    """Read a saved upload; every failure is an ApiError 422 whose message names no path.

    Raises:
        ApiError: 422 ``unreadable_image`` or ``multiple_series``; 413 ``image_too_large`` beyond ``max_decoded``.
    """
    try:
        if path.is_dir():
            n = count_series((p for p in path.iterdir() if p.is_file()), max_decoded)
            if n > 1:
                raise ApiError(
                    422, "multiple_series", f"the upload holds {n} DICOM series; send one series per request"
                )
        return read_image(path, max_decoded)
    except ImageTooLargeError as exc:
        raise _too_large(exc, workdir) from exc
    except ImageReadError as exc:
        raise ApiError(422, "unreadable_image", _scrub(str(exc), workdir)) from exc
    except (OSError, ValueError, MemoryError) as exc:  # a decoder failing outside the reader's own checks
        raise ApiError(422, "unreadable_image", f"the image cannot be decoded ({type(exc).__name__})") from exc


def _scrub(message: str, workdir: Path) -> str:
    """The reader's message without the server's temporary paths (``upload.dcm: ...``, ``upload: ...``)."""
    series = str(workdir / "series")
    message = message.replace(series + "/", "file ").replace(series, "upload")
    return message.replace(str(workdir) + "/", "").replace(str(workdir), "upload")


def cleanup(workdir: Path) -> None:
    shutil.rmtree(workdir, ignore_errors=True)
