"""Image readers: parity with pydicom/nibabel on their own test files, series geometry, dcm2niix, errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut, apply_rescale
from pydicom.uid import (
    JPEG2000,
    JPEG2000Lossless,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)

from medvlp.data.dicom import read_dicom_file, read_dicom_series
from medvlp.data.image import ImageReadError
from medvlp.data.readers import read_image

NIBABEL_DATA = Path(nib.__file__).parent / "tests" / "data"
PHI = ("Phantom", "PHANTOM-0042", "19700101", "20240102", "ACC-7777")
PARITY = [
    *("CT_small.dcm", "MR_small.dcm", "MR_small_bigendian.dcm", "MR_small_implicit.dcm"),  # native
    *("image_dfl.dcm", "mlut_18.dcm"),  # deflated; Modality LUT
    *("JPEG2000.dcm", "MR_small_jp2klossless.dcm", "693_J2KI.dcm", "MR_small_RLE.dcm"),
    *("MR_small_jpeg_ls_lossless.dcm", "JPEGLSNearLossless_16.dcm"),
    *("JPEG-LL.dcm", "JPGLosslessP14SV1_1s_1f_8b.dcm", "JPGExtended.dcm"),  # JPEG lossless SV1, lossy 12-bit
    *("RG3_UNCI.dcm", "RG3_J2KR.dcm", "RG1_J2KI.dcm"),  # CR, MONOCHROME1
    "6154",  # CR, MONOCHROME1 with RescaleSlope 0.684 / RescaleIntercept 200
    *("emri_small.dcm", "emri_small_RLE.dcm", "emri_small_jpeg_ls_lossless.dcm"),  # multi-frame MR, 10 frames
    *("emri_small_jpeg_2k_lossless.dcm", "emri_small_big_endian.dcm"),
]
IDENTIFYING = ("PatientName", "PatientID", "PatientBirthDate", "StudyInstanceUID", "SeriesInstanceUID")
IDENTIFYING += ("SOPInstanceUID", "FrameOfReferenceUID", "StudyDate", "AccessionNumber", "InstitutionName")


def dicom_test_file(name: str) -> Path:
    path = get_testdata_file(name, download=False)
    assert path is not None, f"{name} not found: install pydicom-data (pip install pydicom-data)"
    return Path(path)


def expected_physical(ds: pydicom.Dataset) -> np.ndarray:
    """pydicom's decode + rescale, MONOCHROME1 inverted over the storable range, in ``[X, Y(, F)]``."""
    values = apply_rescale(ds.pixel_array, ds).astype(np.float64)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        bits, signed = ds.BitsStored, ds.PixelRepresentation == 1
        lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
        slope, intercept = float(ds.get("RescaleSlope", 1.0)), float(ds.get("RescaleIntercept", 0.0))
        values = (lo * slope + intercept) + (hi * slope + intercept) - values
    if int(ds.get("NumberOfFrames", 1) or 1) == 1:
        return values.T
    return np.stack([frame.T for frame in values], axis=-1)


def ras_affine(cosines: np.ndarray, spacing: tuple[float, float, float], origin: np.ndarray) -> np.ndarray:
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1] = cosines[0] * spacing[0], cosines[1] * spacing[1]
    lps[:3, 2], lps[:3, 3] = np.cross(cosines[0], cosines[1]) * spacing[2], origin
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def oblique() -> np.ndarray:
    """Row and column cosines rotated 20 degrees about z then 15 degrees about x."""
    cz, sz, cx, sx = np.cos(np.radians(20)), np.sin(np.radians(20)), np.cos(np.radians(15)), np.sin(np.radians(15))
    rotation = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]]) @ np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    return rotation[:, :2].T


def raises(path: Path, *fragments: str, reader: Callable = read_image) -> str:
    """Assert the reader fails with an ImageReadError naming the file, the problem and no PHI."""
    with pytest.raises(ImageReadError) as info:
        reader(path)
    message = str(info.value)
    assert path.name in message, message
    for fragment in fragments:
        assert fragment.lower() in message.lower(), message
    assert not any(value in message for value in PHI), message
    return message


# --- single DICOM files: parity with pydicom -------------------------------------------------------------


def test_parity_files_cover_compression_monochrome1_and_multiframe() -> None:
    datasets = [pydicom.dcmread(dicom_test_file(name), stop_before_pixels=True) for name in PARITY]
    syntaxes = {ds.file_meta.TransferSyntaxUID for ds in datasets}
    assert {JPEG2000, JPEG2000Lossless, RLELossless, JPEGLSLossless, JPEGLosslessSV1, JPEGExtended12Bit} <= syntaxes
    assert sum(ds.PhotometricInterpretation == "MONOCHROME1" for ds in datasets) >= 4
    assert sum(int(ds.get("NumberOfFrames", 1) or 1) > 1 for ds in datasets) >= 5


@pytest.mark.parametrize("name", PARITY)
def test_dicom_parity_with_pydicom(name: str) -> None:
    path = dicom_test_file(name)
    ds = pydicom.dcmread(path)
    image = read_image(path)
    expected = expected_physical(ds)
    assert image.array.dtype == np.float32
    assert image.array.shape == expected.shape
    np.testing.assert_allclose(image.array, expected.astype(np.float32), rtol=1e-6, atol=1e-4)
    assert image.meta["inverted"] is (ds.PhotometricInterpretation == "MONOCHROME1")
    assert image.meta["transfer_syntax_uid"] == str(ds.file_meta.TransferSyntaxUID)
    assert image.meta["modality"] == ds.get("Modality", "")
    json.dumps(image.meta)


def test_monochrome1_inverted_in_physical_units() -> None:
    plain = pydicom.dcmread(dicom_test_file("RG3_UNCI.dcm"))  # 10 bits stored, no rescale
    image = read_image(dicom_test_file("RG3_UNCI.dcm"))
    np.testing.assert_array_equal(image.array, (1023.0 - plain.pixel_array).T)
    assert image.meta["inverted"] is True and image.meta["photometric_interpretation"] == "MONOCHROME1"

    cr = pydicom.dcmread(dicom_test_file("6154"))  # 12 bits, slope 0.684, intercept 200
    assert (cr.BitsStored, float(cr.RescaleSlope), float(cr.RescaleIntercept)) == (12, 0.684, 200.0)
    image = read_image(dicom_test_file("6154"))
    np.testing.assert_allclose(image.array, ((4095 - cr.pixel_array) * 0.684 + 200).T, rtol=1e-6)
    brightest_stored = np.unravel_index(np.argmin(cr.pixel_array), cr.pixel_array.shape)
    assert image.array[brightest_stored[::-1]] == image.array.max()


@pytest.mark.parametrize(
    "name", ["US1_UNCI.dcm", "SC_rgb_jpeg_dcmtk.dcm", "SC_rgb_rle_2frame.dcm", "US1_J2KR.dcm", "OBXXXX1A.dcm"]
)
def test_color_images_become_luminance(name: str) -> None:
    ds = pydicom.dcmread(dicom_test_file(name))
    rgb = apply_color_lut(ds.pixel_array, ds) if ds.PhotometricInterpretation == "PALETTE COLOR" else ds.pixel_array
    luma = rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    expected = luma.T if luma.ndim == 2 else np.stack([frame.T for frame in luma], axis=-1)
    image = read_image(dicom_test_file(name))
    np.testing.assert_allclose(image.array, expected, rtol=1e-6, atol=1e-3)
    assert image.meta["color_converted"] is True and "0.299R" in image.meta["color_to_luminance"]


def test_ct_small_hounsfield_spacing_and_affine() -> None:
    path = dicom_test_file("CT_small.dcm")
    ds = pydicom.dcmread(path)
    image = read_image(path)
    assert image.spacing == (0.661468, 0.661468)
    # IOP [1,0,0,0,1,0], IPP [-158.135803, -179.035797, -75.699997], PixelSpacing 0.661468, thickness 5; LPS->RAS
    expected = np.array(
        [
            [-0.661468, 0, 0, 158.135803],
            [0, -0.661468, 0, 179.035797],
            [0, 0, 5.0, -75.699997],
            [0, 0, 0, 1],
        ]
    )
    np.testing.assert_allclose(image.affine, expected, atol=1e-6)
    assert image.meta["rescale_intercept"] == -1024.0 and image.meta["rescale_slope"] == 1.0
    assert image.array.min() == ds.pixel_array.min() - 1024 and image.array.max() == ds.pixel_array.max() - 1024
    assert -1024 <= image.array.min() < image.array.max() <= 3071


def test_enhanced_multiframe_uses_functional_groups() -> None:
    path = dicom_test_file("eCT_Supplemental.dcm")  # rescale and geometry only in the functional groups
    ds = pydicom.dcmread(path)
    image = read_image(path)
    np.testing.assert_array_equal(image.array, np.stack([f.T - 1024.0 for f in ds.pixel_array], axis=-1))
    assert image.spacing == pytest.approx((0.388672, 0.388672, 10.0))
    # IOP [-1,0,0,0,1,0]; frame positions [99.5,-301.5,-159] then [99.5,-301.5,-149]
    expected = np.array(
        [
            [0.388672, 0, 0, -99.5],
            [0, -0.388672, 0, 301.5],
            [0, 0, 10.0, -159.0],
            [0, 0, 0, 1],
        ]
    )
    np.testing.assert_allclose(image.affine, expected, atol=1e-6)


def test_enhanced_multiframe_rescale_per_frame(tmp_path: Path) -> None:
    ds = pydicom.dcmread(dicom_test_file("eCT_Supplemental.dcm"))
    transform = Dataset()
    transform.RescaleSlope, transform.RescaleIntercept, transform.RescaleType = 2.0, -1000.0, "US"
    ds.PerFrameFunctionalGroupsSequence[1].PixelValueTransformationSequence = [transform]
    ds.save_as(tmp_path / "per_frame.dcm")
    image = read_image(tmp_path / "per_frame.dcm")
    frames = ds.pixel_array.astype(np.float64)
    np.testing.assert_array_equal(image.array, np.stack([frames[0].T - 1024, frames[1].T * 2 - 1000], axis=-1))
    assert image.meta["rescale_slope"] == [1.0, 2.0] and image.meta["rescale_intercept"] == [-1024.0, -1000.0]


def test_legacy_multiframe_spacing_from_spacing_between_slices() -> None:
    image = read_image(dicom_test_file("emri_small.dcm"))
    assert image.array.shape == (64, 64, 10)
    assert image.spacing == (1.0, 1.0, 1.2)
    np.testing.assert_allclose(image.affine, np.diag([1.0, 1.0, 1.2, 1.0]))


def test_meta_is_technical_only(write_series: Callable) -> None:
    ds = pydicom.dcmread(dicom_test_file("CT_small.dcm"))
    series = write_series("meta")
    first = pydicom.dcmread(series.files[0])
    for image, source in ((read_image(dicom_test_file("CT_small.dcm")), ds), (read_image(series.folder), first)):
        text = json.dumps(image.meta)
        for keyword in IDENTIFYING:
            value = str(source.get(keyword, "") or "")
            assert not value or value not in text, keyword


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("JPEG-lossy.dcm", "could not be decoded"),  # a JPEG stream neither libjpeg nor Pillow can decode
        ("MR_truncated.dcm", "truncated"),
        ("emri_small_jpeg_2k_lossless_too_short.dcm", "truncated"),
        ("meta_missing_tsyntax.dcm", "transfer syntax"),
        ("README.txt", "not a DICOM file"),
        ("test-SR.dcm", "not an image"),
        ("DICOMDIR", "DICOMDIR"),
    ],
)
def test_bad_real_files_raise_read_errors(name: str, fragment: str) -> None:
    path = dicom_test_file(name)
    ds = pydicom.dcmread(path, force=True)
    message = raises(path, fragment)
    for keyword in ("PatientName", "PatientID"):
        value = str(ds.get(keyword, "") or "")
        assert not value or value not in message


def test_local_file_errors(tmp_path: Path, write_series: Callable) -> None:
    raises(tmp_path / "absent.dcm", "no such file")
    (tmp_path / "empty.dcm").write_bytes(b"")
    raises(tmp_path / "empty.dcm", "empty")
    (tmp_path / "notes.txt").write_text("Findings: no acute abnormality.\n" * 20)
    raises(tmp_path / "notes.txt", "not a DICOM file")
    whole = write_series("one").files[0]
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    raises(cut, "truncated")
    raises(cut, "truncated", reader=read_dicom_file)


# --- series ----------------------------------------------------------------------------------------------


def test_axial_series_is_stacked_by_position(write_series: Callable) -> None:
    series = write_series("axial")
    by_name = sorted(series.files, key=lambda p: p.name)
    instances = [int(pydicom.dcmread(p, stop_before_pixels=True).InstanceNumber) for p in series.files]
    assert by_name != series.files and instances != sorted(instances)  # neither order helps
    image = read_image(series.folder)
    np.testing.assert_array_equal(image.array, series.hu)
    assert image.array[6, 13, 8] == 1500 and image.array[6, 13, 6] != 1500  # the cube at [5:9, 12:16, 7:10]
    assert image.spacing == pytest.approx((0.8, 0.7, 2.5))
    expected = np.array([[-0.8, 0, 0, 40.0], [0, -0.7, 0, 30.0], [0, 0, 2.5, 100.0], [0, 0, 0, 1]])
    np.testing.assert_allclose(image.affine, expected, atol=1e-6)
    assert image.meta["n_files"] == 12 and image.meta["rescale_intercept"] == -1024.0


def test_oblique_series_geometry(write_series: Callable) -> None:
    cosines = oblique()
    series = write_series("oblique", cosines=cosines, spacing=(0.9, 0.6, 3.0), origin=(12.0, -80.0, 40.0))
    image = read_dicom_series(series.folder)
    np.testing.assert_array_equal(image.array, series.hu)
    np.testing.assert_allclose(image.affine, ras_affine(cosines, (0.9, 0.6, 3.0), series.origin), atol=1e-3)
    assert image.spacing == pytest.approx((0.9, 0.6, 3.0), abs=1e-3)
    # the cube centre lands where the geometry says, in RAS
    centre_lps = series.origin + cosines[0] * 0.9 * 6.5 + cosines[1] * 0.6 * 13.5 + np.cross(*cosines) * 3.0 * 8
    centre_ras = (image.affine @ [6.5, 13.5, 8, 1])[:3]
    np.testing.assert_allclose(centre_ras, centre_lps * [-1, -1, 1], atol=1e-3)


def test_series_rescale_per_slice_and_skipped_files(write_series: Callable) -> None:
    slopes = [1.0, 2.0, 0.5, 1.0, 4.0, 1.0, 1.0, 2.0, 1.0, 1.0, 0.25, 1.0]
    series = write_series("slopes", slopes=slopes)
    (series.folder / "notes.txt").write_text("not an image")
    (series.folder / ".hidden").write_bytes(b"\0" * 200)
    shutil.copy(dicom_test_file("DICOMDIR"), series.folder / "DICOMDIR")
    image = read_image(series.folder)
    np.testing.assert_array_equal(image.array, series.hu)
    assert image.meta["skipped_files"] == 2 and image.meta["rescale_slope"] == slopes


def test_single_file_folder_reads_that_file(tmp_path: Path) -> None:
    folder = tmp_path / "one"
    folder.mkdir()
    shutil.copy(dicom_test_file("emri_small_RLE.dcm"), folder / "IM0001")
    image = read_image(folder)
    np.testing.assert_array_equal(image.array, read_image(dicom_test_file("emri_small_RLE.dcm")).array)


def test_series_errors(tmp_path: Path, write_series: Callable) -> None:
    two = write_series("two").folder
    write_series("two-b", folder=two)
    raises(two, "2 series")

    mixed = write_series("mixed").folder
    write_series("mixed-b", cosines=oblique(), origin=(0, 0, 300), folder=mixed, series_uid=_uid(mixed))
    raises(mixed, "different orientations")

    sizes = write_series("sizes").folder
    write_series("sizes-b", hu=np.zeros((8, 8, 2)), origin=(0, 0, 300), folder=sizes, series_uid=_uid(sizes))
    raises(sizes, "different sizes")

    raises(write_series("gap", drop=[5]).folder, "missing slice")
    raises(write_series("uneven", offsets=[0, 2.5, 5, 7.5, 10, 12.5, 15, 17.9, 20, 22.5, 25, 27.5]).folder, "uneven")
    raises(write_series("dupes", offsets=[0, 2.5, 5, 7.5, 10, 10, 15, 17.5, 20, 22.5, 25, 27.5]).folder, "share")

    truncated = write_series("truncated")
    victim = truncated.files[3]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    raises(truncated.folder, victim.name, "truncated")

    header_cut = write_series("header-cut")
    victim = header_cut.files[0]
    victim.write_bytes(victim.read_bytes()[:600])
    raises(header_cut.folder, victim.name, "truncated")

    (tmp_path / "nothing").mkdir()
    (tmp_path / "nothing" / "readme.txt").write_text("no images here")
    raises(tmp_path / "nothing", "no DICOM image")


def _uid(folder: Path) -> str:
    return str(pydicom.dcmread(next(folder.iterdir()), stop_before_pixels=True).SeriesInstanceUID)


# --- dcm2niix as a peer ----------------------------------------------------------------------------------


@pytest.mark.external
@pytest.mark.parametrize("orientation", ["axial", "oblique"])
def test_series_matches_dcm2niix(orientation: str, tmp_path: Path, write_series: Callable) -> None:
    if shutil.which("dcm2niix") is None:
        if os.environ.get("CI"):
            pytest.fail("dcm2niix is not installed (apt-get install dcm2niix)")
        pytest.skip("dcm2niix is not installed (apt-get install dcm2niix)")
    # dcm2niix 1.0.20220720 sometimes aborts on oblique CT (NaN gantry-tilt estimate): oblique MR as the peer
    cosines, modality = (((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)), "CT") if orientation == "axial" else (oblique(), "MR")
    series = write_series(orientation, cosines=cosines, modality=modality)
    out = tmp_path / "nifti"
    out.mkdir()
    done = subprocess.run(
        ["dcm2niix", "-z", "n", "-f", "out", "-o", str(out), str(series.folder)], capture_output=True, text=True
    )
    niftis = sorted(out.glob("*.nii"))
    assert done.returncode == 0 and len(niftis) == 1, done.stdout + done.stderr
    theirs = nib.as_closest_canonical(nib.load(niftis[0]))
    image = read_image(series.folder)
    ours = nib.as_closest_canonical(nib.Nifti1Image(image.array, image.affine))
    assert theirs.shape == ours.shape
    np.testing.assert_allclose(ours.affine, theirs.affine, atol=1e-3)
    np.testing.assert_allclose(ours.get_fdata(), theirs.get_fdata(), atol=1e-3)


# --- NIfTI -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["anatomical.nii", "standard.nii.gz", "reoriented_anat_moved.nii", "resampled_anat_moved.nii"]
)
def test_nifti_parity_with_nibabel(name: str) -> None:
    path = NIBABEL_DATA / name
    reference = nib.load(path)
    image = read_image(path)
    np.testing.assert_array_equal(image.array, reference.get_fdata(dtype=np.float32))
    np.testing.assert_array_equal(image.affine, reference.affine)
    assert image.spacing == tuple(float(z) for z in reference.header.get_zooms())


def test_nifti2_and_squeezed_4d(tmp_path: Path) -> None:
    source = nib.load(NIBABEL_DATA / "example_nifti2.nii.gz")
    volume = np.asarray(source.dataobj[..., :1])  # (32, 20, 12, 1)
    path = tmp_path / "one_volume.nii.gz"
    nib.save(nib.Nifti2Image(volume, source.affine, source.header), path)
    image = read_image(path)
    assert image.array.shape == (32, 20, 12) and image.meta["format"] == "nifti2"
    np.testing.assert_array_equal(image.array, nib.load(path).get_fdata(dtype=np.float32)[..., 0])
    np.testing.assert_array_equal(image.affine, source.affine)


@pytest.mark.parametrize("name", ["example4d.nii.gz", "example_nifti2.nii.gz", "functional.nii"])
def test_true_4d_nifti_is_refused(name: str) -> None:
    raises(NIBABEL_DATA / name, "4D", "not supported")


def test_broken_nifti(tmp_path: Path) -> None:
    raw = (NIBABEL_DATA / "anatomical.nii").read_bytes()
    (tmp_path / "cut.nii").write_bytes(raw[: len(raw) // 2])
    raises(tmp_path / "cut.nii", "truncated")
    (tmp_path / "text.nii.gz").write_text("hello")
    raises(tmp_path / "text.nii.gz", "not a valid NIfTI")


# --- PNG / JPEG ------------------------------------------------------------------------------------------


def test_png_8_and_16_bit(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    pixels8 = rng.integers(0, 256, size=(30, 40), dtype=np.uint8)
    Image.fromarray(pixels8).save(tmp_path / "a.png")
    image = read_image(tmp_path / "a.png")
    np.testing.assert_array_equal(image.array, pixels8.T)
    assert image.spacing == (1.0, 1.0) and image.array.shape == (40, 30)
    np.testing.assert_array_equal(image.affine, np.eye(4))

    pixels16 = rng.integers(0, 65536, size=(30, 40), dtype=np.uint16)
    pixels16[0, 0] = 65535
    Image.fromarray(pixels16).save(tmp_path / "b.png")
    image = read_image(tmp_path / "b.png")
    np.testing.assert_array_equal(image.array, pixels16.T)
    assert image.array.max() == 65535 and image.meta["color_converted"] is False


def test_color_png_and_jpeg(tmp_path: Path) -> None:
    rgb = np.zeros((10, 12, 3), dtype=np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 100, 50
    Image.fromarray(rgb).save(tmp_path / "c.png")
    image = read_image(tmp_path / "c.png")
    assert image.array.shape == (12, 10) and image.meta["color_converted"] is True
    assert np.all(np.abs(image.array - (0.299 * 200 + 0.587 * 100 + 0.114 * 50)) <= 1)
    gray = np.tile(np.arange(0, 240, 10, dtype=np.uint8), (16, 1))
    Image.fromarray(gray).save(tmp_path / "d.jpeg", quality=95)
    image = read_image(tmp_path / "d.jpeg")
    assert image.array.shape == (24, 16) and np.abs(image.array - gray.T).max() <= 8
    data = (tmp_path / "c.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    raises(tmp_path / "cut.png", "truncated")
    (tmp_path / "fake.jpg").write_text("not a jpeg")
    raises(tmp_path / "fake.jpg", "not a PNG or JPEG")


@pytest.mark.parametrize(
    "name",
    [
        "CT_small.dcm",  # explicit VR little endian
        "MR_small_RLE.dcm",
        "SC_rgb_rle.dcm",
        "JPEG2000.dcm",
        "SC_jpeg_no_color_transform.dcm",
        "image_dfl.dcm",  # deflated explicit VR
        "JPEGLSNearLossless_16.dcm",
        "emri_small_jpeg_2k_lossless.dcm",  # multi-frame
    ],
)
def test_the_decoded_size_is_told_from_the_headers_for_every_transfer_syntax(name: str) -> None:
    from medvlp.data.image import ImageTooLargeError
    from medvlp.data.readers import probe_image

    path = Path(get_testdata_file(name))
    image = read_image(path)
    probe = probe_image(path)
    assert probe is not None and probe.shape == image.array.shape
    assert probe.decoded_bytes >= image.array.nbytes  # float32 values per sample: never an underestimate
    read_image(path, max_bytes=probe.decoded_bytes)  # at the limit: read
    with pytest.raises(ImageTooLargeError, match="decoded-size limit"):
        read_image(path, max_bytes=probe.decoded_bytes - 1)


def test_nifti_and_png_sizes_are_told_from_their_headers(tmp_path: Path) -> None:
    import nibabel as nib
    from PIL import Image

    from medvlp.data.image import ImageTooLargeError
    from medvlp.data.readers import probe_image

    nii = tmp_path / "v.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((20, 30, 8, 1), np.float32), np.eye(4)), nii)
    png = tmp_path / "p.png"
    Image.fromarray(np.zeros((40, 70), np.uint8)).save(png)
    assert probe_image(nii).shape == read_image(nii).array.shape == (20, 30, 8)
    assert probe_image(png).shape == read_image(png).array.shape == (70, 40)
    for path in (nii, png):
        with pytest.raises(ImageTooLargeError):
            read_image(path, max_bytes=probe_image(path).decoded_bytes - 1)
