"""One entry point to read a medical image from disk: DICOM (file or series folder), NIfTI, PNG/JPEG.

Every reader returns a :class:`medvlp.data.image.MedicalImage` in MONAI's axis convention
(``array[i, j(, k)]``, ``i`` along an image row) and raises :class:`medvlp.data.image.ImageReadError`,
naming the file and the problem, for anything it cannot read.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from PIL import Image, UnidentifiedImageError

from medvlp.data.dicom import check_inflated_size, read_dicom_file, read_dicom_series
from medvlp.data.image import ImageReadError, ImageTooLargeError, MedicalImage

logger = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii", ".nii.gz")
PIL_SUFFIXES = (".png", ".jpg", ".jpeg")
_PIL_GRAY_MODES = ("L", "I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_PNG_MAGIC, _JPEG_MAGIC = b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff"


@dataclass(frozen=True)
class ImageProbe:
    """What an image will decode to, told from its headers alone.

    Attributes:
        shape: the array shape the reader will return (``[X, Y]`` or ``[X, Y, Z]``, trailing 1s of NIfTI dropped).
        samples: values per pixel before conversion to luminance (3 for color).
        decoded_bytes: pixels x frames x samples x 4 (the float32 the reader holds): what decoding costs.
    """

    shape: tuple[int, ...]
    samples: int = 1

    @property
    def decoded_bytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.samples * 4

    @property
    def spatial_dims(self) -> int:
        return len(self.shape)


def _dicom_header(path: Path, max_bytes: int | None) -> pydicom.Dataset | None:
    if path.stat().st_size == 0:
        return None
    if max_bytes is not None:
        check_inflated_size(path, max_bytes)
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception:
        return None  # not DICOM, or a damaged header: the reader says which, in its own words
    return ds if "Rows" in ds and "Columns" in ds else None


def _int(ds: pydicom.Dataset, keyword: str, default: int = 1) -> int:
    try:
        return max(int(ds.get(keyword) or default), 0)
    except (TypeError, ValueError):
        return default


def probe_image(path: str | Path, max_bytes: int | None = None) -> ImageProbe | None:
    """The shape an image will decode to, from headers only (no pixel is decoded); None when the headers do not
    tell (the reader then reports what is wrong).

    Args:
        path: what :func:`read_image` would read.
        max_bytes: with it, a Deflate DICOM's dataset is inflated (counted, not kept) only up to this size.

    Raises:
        ImageTooLargeError: a Deflate DICOM inflating beyond ``max_bytes``.
    """
    path = Path(path)
    if not path.exists():
        return None
    name = path.name.lower()
    try:
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
            heads = [h for p in files if (h := _dicom_header(p, max_bytes)) is not None]
            if not heads:
                return None
            if len(heads) == 1:
                ds = heads[0]
            else:
                frames = sum(_int(h, "NumberOfFrames") for h in heads)
                cols, rows = max(_int(h, "Columns") for h in heads), max(_int(h, "Rows") for h in heads)
                return ImageProbe((cols, rows, frames), max(_int(h, "SamplesPerPixel") for h in heads))
        elif name.endswith(NIFTI_SUFFIXES):
            shape = tuple(int(n) for n in nib.load(path).shape)
            while len(shape) > 3 and shape[-1] == 1:
                shape = shape[:-1]
            return ImageProbe(shape)
        elif name.endswith(PIL_SUFFIXES):
            with warnings.catch_warnings():  # Pillow's own bomb warning: the size is judged here, not decoded
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(path) as image:
                    width, height = image.size
                    bands = len(image.getbands())
            return ImageProbe((int(width), int(height)), bands)
        else:
            ds = _dicom_header(path, max_bytes)
            if ds is None:
                return None
    except ImageTooLargeError:
        raise
    except Exception:  # unreadable headers: the reader reports them
        return None
    frames = _int(ds, "NumberOfFrames")
    shape = (_int(ds, "Columns"), _int(ds, "Rows")) + ((frames,) if frames > 1 else ())
    return ImageProbe(shape, _int(ds, "SamplesPerPixel"))


def check_decoded_size(probe: ImageProbe | None, max_bytes: int | None, what: str = "the image") -> None:
    """Refuse an image whose decoded size exceeds ``max_bytes``, before decoding it.

    Raises:
        ImageTooLargeError: naming the shape and the limit.
    """
    if probe is None or max_bytes is None or probe.decoded_bytes <= max_bytes:
        return
    shape = " x ".join(str(n) for n in probe.shape)
    raise ImageTooLargeError(
        f"{what} would decode to {probe.decoded_bytes / (1 << 20):.0f} MiB ({shape} pixels"
        f"{f' x {probe.samples} samples' if probe.samples > 1 else ''}), over the decoded-size limit of "
        f"{max_bytes / (1 << 20):.0f} MiB"
    )


def read_image(path: str | Path, max_bytes: int | None = None) -> MedicalImage:
    """Read an image, choosing the reader from what ``path`` is.

    A folder is read as one DICOM series, ``.nii``/``.nii.gz`` with nibabel, ``.png``/``.jpg``/``.jpeg``
    with Pillow, and anything else as a single DICOM file.

    Args:
        path: file or folder.
        max_bytes: the decoded-size limit (pixels x frames x samples x 4 bytes, a whole series counted), checked
            from the headers before any pixel is decoded; None: no limit.

    Returns:
        The decoded image with its spacing, RAS+ affine and technical metadata.

    Raises:
        ImageReadError: the path is missing or the file cannot be read as an image of the expected kind.
        ImageTooLargeError: the headers announce an image over ``max_bytes``.
    """
    path = Path(path)
    if not path.exists():
        raise ImageReadError(f"{path}: no such file or folder")
    if max_bytes is not None:
        check_decoded_size(probe_image(path, max_bytes), max_bytes, str(path))
    if path.is_dir():
        return read_dicom_series(path, max_bytes)
    name = path.name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        return read_nifti(path)
    if name.endswith(PIL_SUFFIXES):
        return read_pil_image(path)
    return read_dicom_file(path, max_bytes)


def read_nifti(path: str | Path) -> MedicalImage:
    """Read a NIfTI-1/2 file with nibabel as float32 in nibabel's orientation (no reorientation).

    A 4D image whose last dimension is 1 is squeezed to 3D; a true 4D (time series) image is refused.

    Args:
        path: ``.nii`` or ``.nii.gz`` file.

    Returns:
        Array from ``get_fdata(dtype=np.float32)`` (scl_slope/scl_inter applied), nibabel's affine and the
        voxel sizes as spacing.

    Raises:
        ImageReadError: missing, truncated or invalid file, or more than 3 non-trivial dimensions.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: no such file")
    try:
        image = nib.load(path)
        shape = tuple(int(n) for n in image.shape)
    except Exception as exc:  # nibabel raises ImageFileError, HeaderDataError, EOFError, gzip errors...
        raise ImageReadError(f"{path}: not a valid NIfTI file ({type(exc).__name__})") from exc
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) > 3:
        raise ImageReadError(
            f"{path}: a {len(shape)}D image of shape {shape} (e.g. a time series) is not supported; "
            "only 2D and 3D images are"
        )
    if len(shape) < 2:
        raise ImageReadError(f"{path}: a {len(shape)}D image of shape {shape} is not an image")
    try:
        array = np.asarray(image.get_fdata(dtype=np.float32)).reshape(shape)
    except Exception as exc:  # truncated data: EOFError, OSError, ValueError from the array proxy
        raise ImageReadError(f"{path}: the voxel data is truncated or corrupted ({type(exc).__name__})") from exc
    zooms = image.header.get_zooms()
    spacing = tuple(float(z) for z in zooms[: len(shape)])
    meta = {
        "format": "nifti2" if isinstance(image, nib.Nifti2Image) else "nifti1",
        "stored_dtype": str(image.get_data_dtype()),
        "n_files": 1,
    }
    return MedicalImage(array, spacing, np.asarray(image.affine, dtype=np.float64), meta)


def read_pil_image(path: str | Path) -> MedicalImage:
    """Read a PNG or JPEG file with Pillow as a grayscale 2D image.

    Grayscale images keep their bit depth (8-bit "L", 16-bit "I;16", 32-bit "I" or float "F"); anything
    else (RGB, palette, with alpha...) is converted to 8-bit luminance by Pillow ("L": 0.299R+0.587G+0.114B).

    Args:
        path: ``.png``, ``.jpg`` or ``.jpeg`` file.

    Returns:
        ``array = pixels.T`` as float32, spacing 1.0 and an identity affine (no physical geometry).

    Raises:
        ImageReadError: missing, truncated or undecodable file.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: no such file")
    try:
        with Image.open(path) as image:
            image.load()
            mode, image_format = image.mode, image.format
            gray = image if mode in _PIL_GRAY_MODES else image.convert("L")
            pixels = np.asarray(gray)
    except Exception as exc:  # UnidentifiedImageError, OSError for truncated files, DecompressionBombError...
        with path.open("rb") as stream:
            magic = stream.read(8)
        if isinstance(exc, UnidentifiedImageError) and not magic.startswith((_PNG_MAGIC, _JPEG_MAGIC)):
            raise ImageReadError(f"{path}: not a PNG or JPEG image (unrecognised content)") from exc
        raise ImageReadError(f"{path}: the image is truncated or corrupted ({type(exc).__name__}: {exc})") from exc
    if pixels.ndim != 2:
        raise ImageReadError(f"{path}: expected a 2D grayscale image, got pixels of shape {pixels.shape}")
    meta = {
        "format": str(image_format),
        "mode": mode,
        "stored_dtype": str(pixels.dtype),
        "color_converted": mode not in _PIL_GRAY_MODES,
        "n_files": 1,
    }
    return MedicalImage(np.ascontiguousarray(pixels.T, dtype=np.float32), (1.0, 1.0), np.eye(4), meta)
