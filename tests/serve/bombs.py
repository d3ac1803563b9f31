"""Hostile inputs built on the spot, small on the wire and huge once decoded (shared by the tests and
``benchmarks/bench_attack.py``). Each builder streams its zeros through zlib, so building one costs little memory.
"""

from __future__ import annotations

import gzip
import io
import struct
import time
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler

import nibabel as nib
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filewriter import dcmwrite, write_file_meta_info
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

_ZEROS = bytes(1 << 20)


def _zeros(n: int) -> Iterator[bytes]:
    while n > 0:
        yield _ZEROS[: min(n, len(_ZEROS))]
        n -= len(_ZEROS)


def _deflated(head: bytes, n_zeros: int) -> bytes:
    """A raw deflate stream of ``head`` then ``n_zeros`` zero bytes, fast: after a full flush a block depends on
    nothing before it, so the block of 1 MiB of zeros is compressed once and repeated."""
    z = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    out = [z.compress(head), z.flush(zlib.Z_FULL_FLUSH)]
    block = z.compress(_ZEROS) + z.flush(zlib.Z_FULL_FLUSH)
    whole, rest = divmod(n_zeros, len(_ZEROS))
    out.append(block * whole)
    out.append(z.compress(_ZEROS[:rest]) + z.flush())
    return b"".join(out)


def _crc_zeros(crc: int, n: int) -> int:
    for chunk in _zeros(n):
        crc = zlib.crc32(chunk, crc)
    return crc


def _image_dataset(rows: int, columns: int, bits: int = 16, series: str | None = None, z: float = 0.0) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), series or generate_uid()
    ds.Modality, ds.Rows, ds.Columns = "CR", rows, columns
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    ds.ImageOrientationPatient, ds.ImagePositionPatient = [1, 0, 0, 0, 1, 0], [0, 0, z]
    ds.PixelSpacing = [1, 1]
    return ds


def _meta(ds: Dataset, syntax: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    meta.TransferSyntaxUID = syntax
    return meta


def rle_bomb(side: int = 65535) -> bytes:
    """An RLE Lossless DICOM of ~1 KB whose header declares ``side`` x ``side`` 16-bit pixels."""
    ds = _image_dataset(side, side)
    header = struct.pack("<16I", 2, 64, 64 + 512, *([0] * 13))  # two segments (high and low bytes)
    segment = bytes([0x81, 0]) * 256  # "repeat 0 128 times", far fewer bytes than declared
    ds.PixelData = encapsulate([header + segment + segment])
    ds["PixelData"].VR = "OB"
    ds.file_meta = _meta(ds, RLELossless)
    buf = io.BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def deflate_bomb(side: int = 16384) -> bytes:
    """A Deflated Explicit VR DICOM of ~0.5 MB holding ``side`` x ``side`` 16-bit zeros (512 MiB inflated)."""
    ds = _image_dataset(side, side)
    body = io.BytesIO()
    plain = _image_dataset(side, side)
    plain.SOPInstanceUID = ds.SOPInstanceUID
    plain.file_meta = _meta(ds, ExplicitVRLittleEndian)
    dcmwrite(body, plain, enforce_file_format=True)
    raw = body.getvalue()
    start = raw.index(b"DICM") + 4
    group_len = struct.unpack("<I", raw[start + 8 : start + 12])[0]
    dataset = raw[start + 12 + group_len :]  # the dataset alone, explicit VR little endian
    n = side * side * 2
    pixel_header = struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, n)
    out = io.BytesIO()
    out.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(out, _meta(ds, DeflatedExplicitVRLittleEndian), enforce_standard=True)
    out.write(_deflated(dataset + pixel_header, n))
    return out.getvalue()


def png_bomb(side: int = 13000) -> bytes:
    """A grayscale PNG of ~170 KB declaring ``side`` x ``side`` pixels (zeros), written row by row."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    z = zlib.compressobj(1)
    row = bytes(side + 1)  # filter byte 0, then the row
    idat = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def nifti_bomb(shape: tuple[int, ...] = (32000, 32000)) -> bytes:
    """A ``.nii.gz`` of a few KB whose header declares ``shape`` float32 voxels (3.8 GiB); the data are cut short."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.float32)
    header["vox_offset"] = 352
    return gzip.compress(header.binaryblock + b"\0" * 4 + bytes(1 << 20), compresslevel=9)


def series_zip_bomb(slices: int = 56, side: int = 2048) -> bytes:
    """A zip (~0.5 MB) of one DICOM series: ``slices`` slices of ``side`` x ``side`` 16-bit zeros
    (``slices * side**2 * 4`` bytes decoded: 896 MiB for the defaults). Written by hand (local headers, central
    directory) so that its deflate streams can be built fast."""
    series = generate_uid()
    out, central = io.BytesIO(), io.BytesIO()
    n = side * side * 2
    for k in range(slices):
        ds = _image_dataset(side, side, series=series, z=float(k))
        ds.file_meta = _meta(ds, ExplicitVRLittleEndian)
        head = io.BytesIO()
        dcmwrite(head, ds, enforce_file_format=True)
        member = head.getvalue() + struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, n)
        data = _deflated(member, n)
        crc, size = _crc_zeros(zlib.crc32(member), n), len(member) + n
        name = f"slice{k:03d}.dcm".encode()
        offset = out.tell()
        fields = struct.pack("<HHHHHIII", 20, 0, 8, 0, 0, crc, len(data), size)
        out.write(b"PK\x03\x04" + fields + struct.pack("<HH", len(name), 0) + name + data)
        central.write(b"PK\x01\x02" + struct.pack("<H", 20) + fields)
        central.write(struct.pack("<HHHHHII", len(name), 0, 0, 0, 0, 0, offset) + name)
    cd = central.getvalue()
    start = out.tell()
    out.write(cd + b"PK\x05\x06" + struct.pack("<HHHHIIH", 0, 0, slices, slices, len(cd), start, 0))
    return out.getvalue()


def dicom_with(modality: str | None = None, photometric: str | None = None, side: int = 64) -> bytes:
    """A small, valid 8-bit DICOM radiograph whose Modality / PhotometricInterpretation hold the given text."""
    ds = _image_dataset(side, side, bits=8)
    if modality is not None:
        ds.Modality = modality
    if photometric is not None:
        ds.PhotometricInterpretation = photometric
    ds.PixelData = np.random.default_rng(0).integers(0, 255, (side, side), dtype=np.uint8).tobytes()
    ds.file_meta = _meta(ds, ExplicitVRLittleEndian)
    buf = io.BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


class TricklingPacs(BaseHTTPRequestHandler):
    """A DICOMweb server that answers at once, then trickles its body a byte every half second (for a minute)."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", 'multipart/related; type="application/dicom"; boundary=b')
        self.end_headers()
        try:
            for _ in range(120):
                self.wfile.write(b"-")
                self.wfile.flush()
                time.sleep(0.5)
        except OSError:
            pass

    def log_message(self, *args: object) -> None:
        pass
