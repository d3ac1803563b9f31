"""Synthetic axial abdominal CT series (96 x 96 x 40 at 4 x 4 x 5 mm, HU) with four findings.

The volume is built in millimetres relative to its centre, ``X`` to the patient's left (image right),
``Y`` posterior (image down), ``Z`` superior; array layout ``vol[k, row, column]`` with ``k`` ascending in
``Z``, which is also the slice order of the grounding boxes. Lesions are spheres whose grounding boxes are
the extents of the very voxel masks that are painted.
"""

from __future__ import annotations

from functools import lru_cache, partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pydicom
from scipy.ndimage import gaussian_filter

from medvlp.data.synthetic import common as C
from medvlp.data.synthetic.phrasing import styled_report
from medvlp.data.synthetic.reports import ct_report

if TYPE_CHECKING:
    from medvlp.data.synthetic.style import Style

KIND = "ct"
MODALITY = "CT"
SPATIAL_DIMS = 3
FINDINGS = ["renal_mass", "kidney_stone", "hepatic_lesion", "ascites"]
LOCALIZED = ["renal_mass", "kidney_stone", "hepatic_lesion"]
PREVALENCE = {"renal_mass": 0.27, "kidney_stone": 0.27, "hepatic_lesion": 0.27, "ascites": 0.25}
TRUE_HAZARD = {
    "renal_mass": 1.2,
    "kidney_stone": 0.0,
    "hepatic_lesion": 0.5,
    "ascites": 0.8,
    "age": 0.3,
    "sex": 0.2,
}
PREPROCESS = {
    "size": [64, 64, 32],
    "spacing": [6.0, 6.0, 8.0],
    "orientation": "RAS",
    "intensity": {"mode": "window", "center": 40, "width": 400},
}
N_XY, N_Z = 96, 40
PIXEL_MM, SLICE_MM = 4.0, 5.0
CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
_X = ((np.arange(N_XY) - (N_XY - 1) / 2) * PIXEL_MM).astype(np.float32)
_Z = ((np.arange(N_Z) - (N_Z - 1) / 2) * SLICE_MM).astype(np.float32)
_SIDE_X = {"right": -1, "left": 1}  # patient right is -X (image left)
DEFAULT_GRID = (N_XY, N_Z, PIXEL_MM, SLICE_MM)


@lru_cache(maxsize=4)
def _axes(grid: tuple[int, int, float, float]) -> tuple[np.ndarray, np.ndarray]:
    """(in-plane, slice) voxel-centre coordinates in mm of a grid ``(n_xy, n_z, pixel_mm, slice_mm)``."""
    if grid == DEFAULT_GRID:
        return _X, _Z
    n_xy, n_z, pixel, slice_mm = grid
    x = ((np.arange(n_xy) - (n_xy - 1) / 2) * pixel).astype(np.float32)
    return x, ((np.arange(n_z) - (n_z - 1) / 2) * slice_mm).astype(np.float32)


def _ellipse2d(cx: float, cy: float, a: float, b: float, X: np.ndarray = _X) -> np.ndarray:
    """[row, column] mask of an axis-aligned ellipse in the axial plane."""
    return ((X[None, :] - cx) / a) ** 2 + ((X[:, None] - cy) / b) ** 2 <= 1.0


def _index_range(lo: float, hi: float, axis: np.ndarray) -> slice:
    return slice(int(np.searchsorted(axis, lo, "left")), int(np.searchsorted(axis, hi, "right")))


def _ellipsoid(
    center: tuple[float, float, float],
    axes: tuple[float, float, float],
    X: np.ndarray = _X,
    Z: np.ndarray = _Z,
) -> tuple[tuple[slice, ...], np.ndarray]:
    """(sub-volume slices, mask within them) of an ellipsoid given in mm as ``(X, Y, Z)``."""
    (cx, cy, cz), (a, b, c) = center, axes
    sl = (_index_range(cz - c, cz + c, Z), _index_range(cy - b, cy + b, X), _index_range(cx - a, cx + a, X))
    z, y, x = Z[sl[0], None, None], X[None, sl[1], None], X[None, None, sl[2]]
    return sl, ((x - cx) / a) ** 2 + ((y - cy) / b) ** 2 + ((z - cz) / c) ** 2 <= 1.0


def _sphere_voxels(
    center: tuple[float, float, float],
    r: float,
    X: np.ndarray = _X,
    Z: np.ndarray = _Z,
) -> tuple[tuple[slice, ...], np.ndarray]:
    """Voxels whose centre lies within ``r`` mm of ``center``; at least the nearest voxel."""
    sl, mask = _ellipsoid(center, (r, r, r), X, Z)
    if mask.size == 0 or not mask.any():
        idx = [int(np.argmin(np.abs(axis - c))) for axis, c in ((Z, center[2]), (X, center[1]), (X, center[0]))]
        sl = tuple(slice(i, i + 1) for i in idx)
        mask = np.ones((1, 1, 1), bool)
    return sl, mask


def _box(sl: tuple[slice, ...], mask: np.ndarray) -> dict[str, int]:
    k = np.flatnonzero(mask.any(axis=(1, 2)))
    j = np.flatnonzero(mask.any(axis=(0, 2)))
    i = np.flatnonzero(mask.any(axis=(0, 1)))
    z0, y0, x0 = sl[0].start + k[0], sl[1].start + j[0], sl[2].start + i[0]
    return {
        "x": int(x0), "y": int(y0), "w": int(i[-1] - i[0] + 1), "h": int(j[-1] - j[0] + 1),
        "z": int(z0), "d": int(k[-1] - k[0] + 1),
    }  # fmt: skip


def _in_ellipsoid(p: np.ndarray, center: tuple[float, ...], axes: tuple[float, ...], margin: float) -> bool:
    """Whether point ``p`` lies inside the ellipsoid shrunk by ``margin`` mm."""
    return bool(sum(((p[i] - center[i]) / max(axes[i] - margin, 1e-3)) ** 2 for i in range(3)) <= 1.0)


def _anatomy(rng: np.random.Generator) -> dict[str, Any]:
    a_b, b_b = rng.uniform(145, 172), rng.uniform(105, 128)
    px, py = rng.normal(0, 5), rng.normal(8, 4)
    fat, wall = rng.uniform(10, 28), rng.uniform(9, 13)
    ac, bc = a_b - fat - wall, b_b - fat - wall
    y_vb = py + bc - 40
    dz = rng.uniform(-15, 15)
    kid_axes = (rng.uniform(22, 26), rng.uniform(26, 30), rng.uniform(48, 56))
    return {
        "body": (px, py, a_b, b_b), "fat": fat, "wall": wall, "cavity": (px, py, ac, bc), "y_vb": y_vb,
        "liver": ((px - 58, py - 8, 60 + dz), (rng.uniform(88, 100), rng.uniform(80, 90), 75.0)),
        "spleen": ((px + 82, y_vb - 18, 65 + dz), (28.0, 42.0, 45.0)),
        "stomach": ((px + 42, py - 42, 72 + dz), (38.0, 28.0, 38.0)),
        "pancreas": ((px + 5, y_vb - 48, 25 + dz), (55.0, 11.0, 14.0)),
        "kidney": {
            "right": ((px - 66, y_vb - 2, -5 + dz), kid_axes),
            "left": ((px + 66, y_vb - 2, 5 + dz), kid_axes),
        },
        "disc_phase": rng.uniform(0, 32),
    }  # fmt: skip


def _lesion_mm(style: Style | None, finding: str, present: bool, default: tuple[float, float, float, float]) -> tuple:
    """(low, high) diameter range in mm: the built-in ones, or the hospital's (uncertain: below its low end)."""
    if style is None:
        return default[:2] if present else default[2:]
    lo, hi = style.image[f"{finding}_mm"]
    return (lo, hi) if present else (0.6 * lo, lo)


def _contrast(hu: float, organ_hu: float, style: Style | None) -> float:
    """A lesion's HU with its difference from the organ scaled by the style's contrast factor."""
    return hu if style is None else organ_hu + (hu - organ_hu) * float(style.image["contrast"])


def _sample_lesions(
    rng: np.random.Generator, states: dict[str, str], a: dict[str, Any], style: Style | None = None
) -> tuple[dict, dict]:
    lesions: dict[str, Any] = {"ascites": 0.0}
    z_top = float(_axes(_grid_of(style))[1][-1])
    details: dict[str, dict] = {f: {} for f in FINDINGS}
    for f in ("renal_mass", "kidney_stone"):
        if states[f] not in ("present", "uncertain"):
            continue
        present = states[f] == "present"
        side = C.pick(rng, ["right", "left"])
        bilateral = f == "kidney_stone" and present and style is not None and rng.random() < style.p_bilateral
        center, axes = a["kidney"][side]
        reach = 0.65 if f == "renal_mass" else 0.45
        direction = rng.normal(size=3)
        offset = direction / np.linalg.norm(direction) * rng.uniform(0, reach)
        pos = np.array(center) + offset * np.array(axes)
        if f == "renal_mass":
            diam = rng.uniform(*_lesion_mm(style, f, present, (15, 50, 11, 15)))
            hu = _contrast(rng.uniform(120, 165) if present else rng.uniform(110, 125), 70.0, style)
        else:
            diam = rng.uniform(*_lesion_mm(style, f, present, (3, 8, 2, 3)))
            hu = _contrast(rng.uniform(900, 1500) if present else rng.uniform(450, 600), 70.0, style)
        pole = "upper pole" if offset[2] > 0.3 else ("lower pole" if offset[2] < -0.3 else "interpolar region")
        lesions[f] = {"center": tuple(float(x) for x in pos), "r": diam / 2, "hu": hu}
        details[f] = {"side": side, "pole": pole, "diameter_mm": round(diam, 1)}
        if bilateral:  # a second stone in the other kidney: one phrase, two boxes
            other = "left" if side == "right" else "right"
            center, axes = a["kidney"][other]
            direction = rng.normal(size=3)
            pos = np.array(center) + direction / np.linalg.norm(direction) * rng.uniform(0, reach) * np.array(axes)
            diam2 = rng.uniform(*_lesion_mm(style, f, True, (3, 8, 2, 3)))
            hu2 = _contrast(rng.uniform(900, 1500), 70.0, style)
            lesions["kidney_stone_contralateral"] = {"center": tuple(float(x) for x in pos), "r": diam2 / 2, "hu": hu2}
            details[f] = {"side": "bilateral", "pole": pole, "diameter_mm": round(max(diam, diam2), 1)}
    if states["hepatic_lesion"] in ("present", "uncertain"):
        present = states["hepatic_lesion"] == "present"
        diam = rng.uniform(*_lesion_mm(style, "hepatic_lesion", present, (10, 40, 6, 9.5)))
        r = diam / 2
        center, axes = a["liver"]
        px, py, ac, bc = a["cavity"]
        kidney = a["kidney"]["right"]
        for _ in range(1000):
            pos = np.array(center) + rng.uniform(-1, 1, 3) * np.array(axes)
            inside_cavity = ((pos[0] - px) / (ac - r - 40)) ** 2 + ((pos[1] - py) / (bc - r - 40)) ** 2 <= 1
            if (
                inside_cavity
                and abs(pos[2]) <= z_top - r - 3
                and _in_ellipsoid(pos, center, axes, r + 6)
                and not _in_ellipsoid(pos, kidney[0], tuple(x + r + 6 for x in kidney[1]), 0.0)
            ):
                break
        else:  # pragma: no cover - practically unreachable
            pos = np.array(center) + np.array([0.0, 0.0, -0.2 * axes[2]])
        lobe = "left hepatic lobe" if pos[0] - px > -15 else "right hepatic lobe"
        if pos[2] - center[2] > 0.55 * axes[2]:
            lobe = "hepatic dome"
        hu = _contrast(rng.uniform(-5, 15) if present else rng.uniform(10, 20), 62.0, style)
        lesions["hepatic_lesion"] = {"center": tuple(float(x) for x in pos), "r": r, "hu": hu}
        details["hepatic_lesion"] = {"lobe": lobe, "diameter_mm": round(diam, 1)}
    if states["ascites"] in ("present", "uncertain"):
        amount = C.pick(rng, ["small", "moderate", "large"]) if states["ascites"] == "present" else "trace"
        lo, hi = {"trace": (4, 6), "small": (8, 11), "moderate": (14, 20), "large": (24, 34)}[amount]
        lesions["ascites"] = rng.uniform(lo, hi)
        details["ascites"] = {"amount": amount}
    return lesions, details


def _grid_of(style: Style | None) -> tuple[int, int, float, float]:
    """The volume grid ``(n_xy, n_z, pixel_mm, slice_mm)`` of a style (the built-in one without)."""
    if style is None:
        return DEFAULT_GRID
    img = style.image
    return int(img["n_xy"]), int(img["n_z"]), float(img["pixel_mm"]), float(img["slice_mm"])


def sample_study(seed: int, index: int, subject: C.Subject, visit: int, style: Style | None = None) -> dict[str, Any]:
    """The tabular part of study ``index``: labels, details, report, survival, boxes and drawing parameters."""
    rng = C.rng_for(seed, KIND, C.STREAM_STUDY, index)
    states = C.sample_states(rng, PREVALENCE if style is None else style.prevalence)
    anatomy = _anatomy(rng)
    lesions, details = _sample_lesions(rng, states, anatomy, style)
    grid = _grid_of(style)
    X, Z = _axes(grid)
    ascending = bool(rng.random() < 0.6)
    z0 = float(np.round(rng.uniform(-420, -180) * 2) / 2)
    y0 = float(np.round(rng.uniform(-200, -180) * 2) / 2)
    report_rng = C.rng_for(seed, KIND, C.STREAM_REPORT, index)
    if style is None:
        report, label_text = ct_report(states, details, report_rng)
    else:
        report, label_text = styled_report(KIND, states, details, report_rng, style)
    age = C.study_age(subject, visit)
    lp = C.linear_predictor(TRUE_HAZARD, states, age, subject.sex)
    time, event = C.sample_survival(C.rng_for(seed, KIND, C.STREAM_SURVIVAL, index), lp)
    boxes = []
    for f in LOCALIZED:
        if states[f] == "present":
            for key in (f, f"{f}_contralateral"):
                if key in lesions:
                    sl, mask = _sphere_voxels(lesions[key]["center"], lesions[key]["r"], X, Z)
                    boxes.append({"category_name": f, "label_text": label_text[f], **_box(sl, mask)})
    study_id = f"S{index:05d}"
    row = {
        "subject_id": subject.subject_id,
        "study_id": study_id,
        "image": f"images/{study_id}",
        "report": report,
        "split": subject.split,
        **{f: C.LABELS[states[f]] for f in FINDINGS},
        "age": age,
        "sex": subject.sex,
        "time": time,
        "event": event,
    }
    for f, keys in (("renal_mass", ("side", "pole", "diameter_mm")), ("kidney_stone", ("side", "pole", "diameter_mm")),
                    ("hepatic_lesion", ("lobe", "diameter_mm")), ("ascites", ("amount",))):  # fmt: skip
        row.update({f"{f}_{k}": details[f].get(k) for k in keys})
    row.update(
        boxes=boxes,
        slice_order="ascending" if ascending else "descending",
        _params={"anatomy": anatomy, "lesions": lesions, "z0": z0, "y0": y0, "ascending": ascending, "grid": grid},
        _phi=C.study_phi(KIND, seed, index, subject, visit),
    )
    return row


def _upsample(a: np.ndarray, n_out: int, axis: int) -> np.ndarray:
    """Linear interpolation of ``a`` along ``axis`` to ``n_out`` samples spanning the same extent."""
    n_in = a.shape[axis]
    pos = np.linspace(0, n_in - 1, n_out)
    lo = np.minimum(np.floor(pos).astype(int), n_in - 2)
    shape = [1] * a.ndim
    shape[axis] = n_out
    w = (pos - lo).astype(np.float32).reshape(shape)
    return np.take(a, lo, axis=axis) * (1 - w) + np.take(a, lo + 1, axis=axis) * w


def _smooth_noise(
    rng: np.random.Generator, coarse: tuple[int, int, int], n_xy: int = N_XY, n_z: int = N_Z
) -> np.ndarray:
    """Standard normal noise on a coarse grid, linearly interpolated to the volume grid."""
    g = rng.standard_normal(coarse).astype(np.float32)
    return _upsample(_upsample(_upsample(g, n_xy, 2), n_xy, 1), n_z, 0)


def render(p: dict[str, Any], rng: np.random.Generator) -> np.ndarray:
    """The volume in HU, float32 ``[k, row, column]`` with ``k`` ascending in Z."""
    a, les = p["anatomy"], p["lesions"]
    grid = p.get("grid", DEFAULT_GRID)
    n_xy, n_z = grid[0], grid[1]
    X, Z = _axes(grid)
    ell2, ell3, sphere = partial(_ellipse2d, X=X), partial(_ellipsoid, X=X, Z=Z), partial(_sphere_voxels, X=X, Z=Z)
    px, py, a_b, b_b = a["body"]
    _, _, ac, bc = a["cavity"]
    t = les["ascites"]
    body = ell2(px, py, a_b, b_b)
    cavity = ell2(px, py, ac, bc)
    inner = ell2(px, py, ac - t, bc - t) if t > 0 else cavity
    y_vb = a["y_vb"]
    sl2 = np.full((n_xy, n_xy), -1000.0, np.float32)
    sl2[body] = -100
    sl2[ell2(px, py, a_b - a["fat"], b_b - a["fat"])] = 40
    sl2[cavity] = -90
    table = (np.abs(X[:, None] - (py + b_b + 12)) < 4) & (np.abs(X[None, :]) < 170)
    sl2[table] = 250
    vol = np.repeat(sl2[None], n_z, axis=0)
    bowel = _smooth_noise(rng, (6, 14, 14), n_xy, n_z)
    gas = _smooth_noise(rng, (8, 20, 20), n_xy, n_z)
    gut = cavity[None] & (X[None, :, None] < y_vb - 15)
    vol[gut & (bowel > 0.1)] = 38
    vol[gut & (bowel > 0.1) & (gas > 1.2)] = -700
    if t > 0:
        vol[:, cavity & ~inner & (X[:, None] < y_vb + 10)] = 8
    for sx in (-1, 1):
        vol[:, ell2(px + sx * 32, y_vb + 48, 24, 20)] = 50  # paraspinal muscles
        sl, m = ell3((px + sx * 32, y_vb - 4, -110.0), (17.0, 15.0, 105.0))  # psoas
        vol[sl][m] = 45
    spine = ell2(px, y_vb, 19, 17)
    disc = (np.mod(Z - a["disc_phase"], 32.0) < 6)[:, None, None]
    vol[:, spine] = 700
    vol[np.broadcast_to(disc, vol.shape) & spine[None]] = 90
    vol[:, ell2(px, y_vb + 30, 19, 11) | ell2(px, y_vb + 48, 5, 13)] = 650
    vol[:, ell2(px, y_vb + 26, 8, 7)] = 20
    vol[:, ell2(px + 16, y_vb - 28, 11, 11)] = 40  # aorta
    vol[:, ell2(px - 22, y_vb - 24, 13, 9)] = 35  # IVC
    for name, hu in (("stomach", 15), ("pancreas", 45), ("spleen", 50), ("liver", 62)):
        sl, m = ell3(*a[name])
        m = m & inner[None, sl[1], sl[2]]
        if name == "stomach":
            gas_cap = X[None, sl[1], None] < a[name][0][1] - 0.35 * a[name][1][1]
            vol[sl][m & gas_cap] = -900
            m = m & ~gas_cap
        vol[sl][m] = hu
    for side in ("right", "left"):
        center, axes = a["kidney"][side]
        sl, m = ell3(center, axes)
        vol[sl][m] = 70
        sl, m = ell3(center, tuple(x - 7 for x in axes))
        vol[sl][m] = 30
        sl, m = ell3((center[0] - _SIDE_X[side] * 13, center[1] - 2, center[2]), (8.0, 9.0, 22.0))
        vol[sl][m] = -60  # renal sinus fat
    for f in ("hepatic_lesion", "renal_mass", "kidney_stone", "kidney_stone_contralateral"):
        if f in les:
            if f == "kidney_stone":  # painted after the blur: a calcification keeps its full density
                vol = gaussian_filter(vol, (0.3, 0.55, 0.55))
            sl, m = sphere(les[f]["center"], les[f]["r"])
            noise = rng.normal(0, 12 if f == "renal_mass" else 3, m.shape).astype(np.float32)
            vol[sl][m] = (les[f]["hu"] + noise)[m]
    if "kidney_stone" not in les:
        vol = gaussian_filter(vol, (0.3, 0.55, 0.55))
    vol += rng.normal(0, 15, vol.shape).astype(np.float32)
    return vol


def write_study(row: dict[str, Any], out: Path, seed: int) -> None:
    """Renders study ``row`` and writes one CT DICOM file per slice into its folder."""
    index = int(row["study_id"][1:])
    p = row["_params"]
    n_xy, n_z, pixel, slice_mm = p.get("grid", DEFAULT_GRID)
    vol = render(p, C.rng_for(seed, KIND, C.STREAM_IMAGE, index))
    stored = (np.clip(np.rint(vol), -1024, 3071) + 1024).astype(np.int16)
    folder = out / row["image"]
    folder.mkdir(parents=True, exist_ok=True)
    study_uid, series_uid = C.uid(seed, KIND, index, "study"), C.uid(seed, KIND, index, "series")
    ds = C.new_dicom(CT_STORAGE, C.uid(seed, KIND, index, "slice", 0), row["_phi"], study_uid, series_uid, MODALITY)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.StudyDescription = "CT ABDOMEN WITH CONTRAST"
    ds.SeriesDescription = f"AXIAL {slice_mm:g}MM"
    ds.BodyPartExamined = "ABDOMEN"
    ds.PatientPosition = "HFS" if p["ascending"] else "FFS"
    ds.FrameOfReferenceUID = C.uid(seed, KIND, index, "frame")
    ds.KVP = 120
    ds.SliceThickness = slice_mm
    ds.PixelSpacing = [pixel, pixel]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = n_xy
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
    ds.WindowCenter, ds.WindowWidth = 40, 400
    ds.AcquisitionNumber = 1
    x0 = float(-(n_xy - 1) / 2 * pixel)
    for k in range(n_z):
        sop = C.uid(seed, KIND, index, "slice", k)
        ds.SOPInstanceUID = sop
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        z = p["z0"] + slice_mm * k
        ds.ImagePositionPatient = [x0, p["y0"], z]
        ds.SliceLocation = z
        ds.InstanceNumber = k + 1 if p["ascending"] else n_z - k
        ds.PixelData = stored[k].tobytes()
        path = folder / f"{C.hex_name(seed, KIND, index, k)}.dcm"
        C.save_dicom(ds, path)
        if k == 0:  # re-read: a dataset of already encoded (raw) elements is written about twice as fast
            ds = pydicom.dcmread(path)
