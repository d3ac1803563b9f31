"""Synthetic PA chest radiographs (CR, 256 x 256 at 1.4 mm) with four findings.

The anatomy is drawn in normalised patient coordinates ``(u, v)`` (``u`` to the image right = patient left,
``v`` down, the thorax spanning about ``[-1, 1]``) that a per-study shift, rotation and scale map to pixels.
Every shape is a signed distance field in pixels (positive inside): soft edges for drawing, ``> 0`` for the
hard masks that the grounding boxes are taken from, so boxes and pixels agree.
"""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydicom.uid import RLELossless
from scipy.ndimage import gaussian_filter
from scipy.special import expit

from medvlp.data.synthetic import common as C
from medvlp.data.synthetic.phrasing import styled_report
from medvlp.data.synthetic.reports import cxr_report

if TYPE_CHECKING:
    from medvlp.data.synthetic.style import Style

KIND = "cxr"
MODALITY = "CR"
SPATIAL_DIMS = 2
FINDINGS = ["cardiomegaly", "pleural_effusion", "lung_nodule", "pneumothorax"]
LOCALIZED = ["cardiomegaly", "pleural_effusion", "lung_nodule", "pneumothorax"]
PREVALENCE = {"cardiomegaly": 0.27, "pleural_effusion": 0.27, "lung_nodule": 0.27, "pneumothorax": 0.25}
TRUE_HAZARD = {
    "cardiomegaly": 0.4,
    "pleural_effusion": 0.7,
    "lung_nodule": 0.8,
    "pneumothorax": 0.1,
    "age": 0.35,
    "sex": 0.25,
}
PREPROCESS = {
    "size": [128, 128],
    "spacing": None,
    "orientation": None,
    "intensity": {"mode": "percentile", "lower": 0.5, "upper": 99.5},
}
SIZE = 256
PIXEL_MM = 1.4
CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
_SIDES = {-1: "right", 1: "left"}  # sign of u -> patient side
_ZONES = {"upper": (-0.72, -0.30), "middle": (-0.30, 0.05), "lower": (0.05, 0.36)}
_LOBES = {
    ("right", "upper"): "right upper lobe",
    ("right", "middle"): "right middle lobe",
    ("right", "lower"): "right lower lobe",
    ("left", "upper"): "left upper lobe",
    ("left", "middle"): "lingula",
    ("left", "lower"): "left lower lobe",
}
# effusion size -> (base lo, base hi, meniscus lo, meniscus hi): fluid level relative to the dome top
_EFFUSION_LEVELS = {
    "trace": (0.16, 0.17, 0.10, 0.11),
    "small": (0.0, 0.06, 0.12, 0.16),
    "moderate": (-0.18, -0.12, 0.10, 0.14),
    "large": (-0.42, -0.32, 0.08, 0.12),
}
_YY, _XX = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)


@lru_cache(maxsize=4)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """(row, column) pixel-centre grids of a ``size`` x ``size`` image."""
    if size == SIZE:
        return _YY, _XX
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return yy, xx


def _ellipse_sd(u: Any, v: Any, cu: float, cv: float, a: float, b: float, scale: float) -> Any:
    """Approximate signed distance (pixels, positive inside) to an axis-aligned ellipse."""
    r = np.sqrt(((u - cu) / a) ** 2 + ((v - cv) / b) ** 2)
    return (1.0 - r) * min(a, b) * scale


class Chest:
    """The geometry of one radiograph: coordinate grid and the signed distance fields of its structures."""

    def __init__(self, p: dict[str, Any]) -> None:
        self.p = p
        self.s = p["scale"]
        self.size = int(p.get("size", SIZE))
        self.yy, self.xx = _grid(self.size)
        c, s = math.cos(p["theta"]), math.sin(p["theta"])
        dx = self.xx - (self.size - 1) / 2 - p["shift_x"]
        dy = self.yy - (self.size - 1) / 2 - p["shift_y"]
        self.u = (c * dx + s * dy) / self.s
        self.v = (-s * dx + c * dy) / self.s
        self._cache: dict[Any, np.ndarray] = {}

    def to_pixel(self, u: float, v: float) -> tuple[float, float]:
        """(column, row) of a normalised point."""
        c, s = math.cos(self.p["theta"]), math.sin(self.p["theta"])
        x = (self.size - 1) / 2 + self.p["shift_x"] + self.s * (c * u - s * v)
        y = (self.size - 1) / 2 + self.p["shift_y"] + self.s * (s * u + c * v)
        return x, y

    def dome(self, u: Any, side: int) -> Any:
        """Row (in ``v``) of the hemidiaphragm under the lung of ``side``."""
        lateral = side * u > 0.40
        return self.p["dome"][side] + np.where(lateral, 0.22, 0.10) * ((u - side * 0.40) / 0.32) ** 2

    def heart(self, u: Any = None, v: Any = None) -> Any:
        u, v = (self.u, self.v) if u is None else (u, v)
        h = self.p["heart"]
        return _ellipse_sd(u, v, h["cu"], h["cv"], h["a"], h["b"], self.s)

    def lung(self, side: int, u: Any = None, v: Any = None) -> Any:
        """Signed distance to the lung field of ``side`` (-1 right, +1 left), heart excluded."""
        full = u is None
        if full and ("lung", side) in self._cache:
            return self._cache[("lung", side)]
        u, v = (self.u, self.v) if full else (u, v)
        g = self.p["lung"][side]
        outer = _ellipse_sd(u, v, side * g["cu"], g["cv"], g["a"], g["b"], self.s)
        sd = np.minimum(np.minimum(outer, (self.dome(u, side) - v) * self.s), (side * u - 0.09) * self.s)
        sd = np.minimum(sd, -self.heart(u, v))
        if full:
            self._cache[("lung", side)] = sd
        return sd

    def effusion(self, side: int, u: Any = None, v: Any = None) -> Any:
        e = self.p["effusion"][side]
        uu, vv = (self.u, self.v) if u is None else (u, v)
        t = np.clip((side * uu - 0.09) / 0.63, 0.0, 1.0)
        level = self.p["dome"][side] + e["base"] - e["k"] * t**2
        return np.minimum(self.lung(side, u, v), (vv - level) * self.s)

    def collapsed(self, u: Any = None, v: Any = None) -> Any:
        """Signed distance to the collapsed lung of a pneumothorax."""
        x = self.p["ptx"]
        side, d = x["side"], x["delta"]
        g = self.p["lung"][side]
        uu, vv = (self.u, self.v) if u is None else (u, v)
        if x["location"] == "apical":
            return _ellipse_sd(uu, vv, side * g["cu"], g["cv"] + d, g["a"], g["b"] - d, self.s)
        return _ellipse_sd(uu, vv, side * (g["cu"] - d), g["cv"], g["a"] - d, g["b"], self.s)

    def ptx(self) -> np.ndarray:
        return np.minimum(self.lung(self.p["ptx"]["side"]), -self.collapsed())

    def nodule(self) -> np.ndarray:
        n = self.p["nodule"]
        return n["r"] - np.sqrt((self.xx - n["x"]) ** 2 + (self.yy - n["y"]) ** 2)


def _extent(mask: np.ndarray) -> dict[str, int] | None:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    return {"x": int(cols[0]), "y": int(rows[0]), "w": int(cols[-1] - cols[0] + 1), "h": int(rows[-1] - rows[0] + 1)}


def _sample_geometry(
    rng: np.random.Generator, states: dict[str, str], style: Style | None = None
) -> tuple[dict[str, Any], dict[str, dict]]:
    """Geometry parameters of one study and the per-finding details the report describes."""
    img = style.image if style is not None else {}
    pixel = float(img.get("pixel_mm", PIXEL_MM))
    p: dict[str, Any] = {
        "size": int(img.get("size", SIZE)),
        "pixel_mm": pixel,
        "scale": 128 * (PIXEL_MM / pixel if style is not None else 1) * rng.uniform(0.90, 1.0),
        "theta": math.radians(float(np.clip(rng.normal(0, 2.0), -5, 5))),
        "shift_x": float(np.clip(rng.normal(0, 5), -12, 12)),
        "shift_y": float(np.clip(rng.normal(0, 5), -12, 12)),
        "dome": {-1: rng.uniform(0.36, 0.44), 1: rng.uniform(0.40, 0.48)},
        "lung": {
            side: {
                "cu": rng.uniform(0.39, 0.43),
                "cv": rng.uniform(-0.15, -0.10),
                "a": rng.uniform(0.31, 0.35),
                "b": 0.74,
            }
            for side in (-1, 1)
        },
        "effusion": {},
    }
    width = sum(p["lung"][s]["cu"] + p["lung"][s]["a"] for s in (-1, 1))
    details: dict[str, dict] = {f: {} for f in FINDINGS}
    st = states["cardiomegaly"]
    if st == "present":
        ctr = rng.uniform(0.56, 0.68)
    elif st == "uncertain":
        ctr = rng.uniform(0.50, 0.54)
    else:
        ctr = float(np.clip(rng.normal(0.43, 0.025), 0.37, 0.48))
    a = ctr * width / 2
    p["heart"] = {"cu": 0.05 + 0.45 * (a - 0.30), "cv": 0.37, "a": a, "b": 0.27 + 0.3 * (a - 0.30)}
    details["cardiomegaly"] = {"ctr": round(ctr, 3)}
    st = states["pleural_effusion"]
    if st in ("present", "uncertain"):
        if st == "present":
            if style is None:
                side_name = C.pick(rng, ["right", "left", "bilateral"])
            else:
                side_name = "bilateral" if rng.random() < style.p_bilateral else C.pick(rng, ["right", "left"])
            size = C.pick(rng, ["small", "moderate", "large"])
        else:
            side_name, size = C.pick(rng, ["right", "left"]), "trace"
        ranges = _EFFUSION_LEVELS[size]
        for side in (-1, 1):
            if side_name in (_SIDES[side], "bilateral"):
                p["effusion"][side] = {"base": rng.uniform(*ranges[:2]), "k": rng.uniform(*ranges[2:])}
        details["pleural_effusion"] = {"side": side_name, "size": "small" if size == "trace" else size}
    p["ptx"] = None
    st = states["pneumothorax"]
    if st in ("present", "uncertain"):
        side = int(C.pick(rng, [-1, 1]))
        if st == "present":
            location, size = C.pick(rng, ["apical", "lateral"]), C.pick(rng, ["small", "moderate", "large"])
            delta = rng.uniform(*{"small": (0.03, 0.045), "moderate": (0.06, 0.08), "large": (0.10, 0.13)}[size])
        else:
            location, size, delta = "apical", "tiny", rng.uniform(0.015, 0.02)
        p["ptx"] = {"side": side, "location": location, "delta": delta}
        details["pneumothorax"] = {"side": _SIDES[side], "location": location, "size": size}
    p["nodule"] = None
    st = states["lung_nodule"]
    if st in ("present", "uncertain"):
        if style is None:
            r = rng.uniform(3.0, 12.0) if st == "present" else rng.uniform(2.0, 3.0)
        else:  # diameters in mm, from this hospital's range; an uncertain nodule is at its lower end
            lo, hi = img["nodule_mm"]
            r = (rng.uniform(lo, hi) if st == "present" else rng.uniform(0.6 * lo, lo)) / 2 / pixel
        chest = Chest(p)
        side = int(C.pick(rng, [-1, 1]))
        zone = C.pick(rng, list(_ZONES))
        u, v = _place_nodule(rng, chest, side, zone, r)
        x, y = chest.to_pixel(u, v)
        p["nodule"] = {
            "x": x,
            "y": y,
            "r": r,
            "contrast": (rng.uniform(750, 1100) if st == "present" else rng.uniform(350, 450))
            * float(img.get("contrast", 1.0)),
        }
        lobe_key = (_SIDES[side], zone)
        details["lung_nodule"] = {
            "diameter_mm": round(2 * r * pixel, 1),
            "lobe": _LOBES[lobe_key],
            "zone": f"{_SIDES[side]} {'mid' if zone == 'middle' else zone} lung zone",
        }
    return p, details


def _place_nodule(rng: np.random.Generator, chest: Chest, side: int, zone: str, r: float) -> tuple[float, float]:
    """A nodule centre in aerated lung (away from heart, effusion and pneumothorax) in the given zone."""
    p = chest.p
    for zone_try in (zone, "upper", "middle", "lower"):
        lo, hi = _ZONES[zone_try]
        u = side * rng.uniform(0.14, 0.70, 64)
        v = rng.uniform(lo, hi, 64)
        ok = chest.lung(side, u, v) >= r + 4
        if side in p["effusion"]:
            ok &= chest.effusion(side, u, v) <= -(r + 4)
        if p["ptx"] is not None and p["ptx"]["side"] == side:
            ok &= chest.collapsed(u, v) >= r + 4
        if ok.any():
            k = int(np.flatnonzero(ok)[0])
            return float(u[k]), float(v[k])
    raise RuntimeError("no room for a nodule")  # pragma: no cover - the upper zone always has room


def _boxes(p: dict[str, Any], states: dict[str, str], label_text: dict[str, str]) -> list[dict[str, Any]]:
    """Grounding boxes of the findings labelled present (hard masks of the drawn shapes)."""
    present = [f for f in LOCALIZED if states[f] == "present"]
    if not present:
        return []
    chest = Chest(p)
    masks: list[tuple[str, np.ndarray]] = []
    for f in present:
        if f == "cardiomegaly":
            masks.append((f, chest.heart() > 0))
        elif f == "pleural_effusion":
            masks.extend((f, chest.effusion(side) > 0) for side in sorted(p["effusion"]))
        elif f == "lung_nodule":
            masks.append((f, chest.nodule() > 0))
        else:
            masks.append((f, chest.ptx() > 0))
    boxes = []
    for f, mask in masks:
        box = _extent(mask)
        if box is not None:
            boxes.append({"category_name": f, "label_text": label_text[f], **box})
    return boxes


def sample_study(seed: int, index: int, subject: C.Subject, visit: int, style: Style | None = None) -> dict[str, Any]:
    """The tabular part of study ``index``: labels, details, report, survival, boxes and drawing parameters."""
    rng = C.rng_for(seed, KIND, C.STREAM_STUDY, index)
    states = C.sample_states(rng, PREVALENCE if style is None else style.prevalence)
    params, details = _sample_geometry(rng, states, style)
    report_rng = C.rng_for(seed, KIND, C.STREAM_REPORT, index)
    if style is None:
        report, label_text = cxr_report(states, details, report_rng)
    else:
        report, label_text = styled_report(KIND, states, details, report_rng, style)
    age = C.study_age(subject, visit)
    lp = C.linear_predictor(TRUE_HAZARD, states, age, subject.sex)
    time, event = C.sample_survival(C.rng_for(seed, KIND, C.STREAM_SURVIVAL, index), lp)
    block = C.rng_for(seed, KIND, C.STREAM_BLOCK, index // 10)
    perms = [block.permutation(10)[index % 10] for _ in range(3)]
    study_id = f"S{index:05d}"
    eff, nod, ptx = details["pleural_effusion"], details["lung_nodule"], details["pneumothorax"]
    return {
        "subject_id": subject.subject_id,
        "study_id": study_id,
        "image": f"images/{study_id}.dcm",
        "report": report,
        "split": subject.split,
        **{f: C.LABELS[states[f]] for f in FINDINGS},
        "age": age,
        "sex": subject.sex,
        "time": time,
        "event": event,
        "cardiothoracic_ratio": details["cardiomegaly"]["ctr"],
        "pleural_effusion_side": eff.get("side"),
        "pleural_effusion_size": eff.get("size"),
        "lung_nodule_diameter_mm": nod.get("diameter_mm"),
        "lung_nodule_lobe": nod.get("lobe"),
        "pneumothorax_side": ptx.get("side"),
        "pneumothorax_location": ptx.get("location"),
        "pneumothorax_size": ptx.get("size"),
        "boxes": _boxes(params, states, label_text),
        "_params": params,
        "_storage": {"monochrome1": perms[0] < 2, "rle": perms[1] < 1, "slope": 2 if perms[2] < 1 else 1},
        "_phi": C.study_phi(KIND, seed, index, subject, visit),
    }


def render(p: dict[str, Any], rng: np.random.Generator) -> np.ndarray:
    """The radiograph as float32 brightness in [0, 4095] (higher = more attenuation, MONOCHROME2)."""
    ch = Chest(p)
    u, v, s = ch.u, ch.v, ch.s
    body = expit((1 - ((u / 1.0) ** 4 + ((v - 0.15) / 1.2) ** 4) ** 0.25) * s / 2.0)  # superellipse
    thick = np.sqrt(np.clip(1 - (u / 1.0) ** 2, 0, 1))
    img = 250 + body * (1250 + 650 * thick) * rng.uniform(0.9, 1.1)
    dome_v = np.where(u < 0, ch.dome(u, -1), ch.dome(u, 1))
    img += 260 * body * expit((v - dome_v) * s / 1.5)
    bubble = _ellipse_sd(u, v, 0.33, p["dome"][1] + 0.12, 0.07, 0.045, s)
    img -= 500 * expit(bubble / 1.5) * body
    size = ch.size
    texture = gaussian_filter(rng.standard_normal((size, size)).astype(np.float32), 2.2) * 450
    for side in (-1, 1):
        hilum = np.exp(-(((u - side * 0.17) / 0.12) ** 2 + ((v + 0.08) / 0.22) ** 2))
        value = 820 + 220 * np.clip(v + 0.2, 0, 1) + texture * (0.5 + hilum) + 380 * hilum
        if p["ptx"] is not None and p["ptx"]["side"] == side:
            gone = expit(ch.ptx() / 1.0)
            value = value * (1 - gone) + 600 * gone
            value += 380 * np.exp(-((ch.collapsed() / 0.9) ** 2)) * (ch.lung(side) > 0)
        m = expit(ch.lung(side) / 1.2)
        img = img * (1 - m) + value * m
        if side in p["effusion"]:
            m = expit(ch.effusion(side) / 1.5)
            img = img * (1 - m) + (2050 + 250 * np.clip(v - 0.2, 0, 1)) * m
    medi = np.minimum((0.085 + 0.05 * np.clip(v + 0.3, 0, 1) - np.abs(u - 0.01)) * s, (0.55 - v) * s)
    heart = np.maximum(ch.heart(), medi)
    m = expit(heart / 1.5)
    img = img * (1 - m) + 2350 * m
    img -= 450 * expit((0.025 - np.abs(u)) * s / 1.0) * expit((-0.32 - v) * s / 1.5)  # trachea
    img += 170 * expit((0.055 - np.abs(u)) * s / 1.5) * (1 + 0.3 * np.cos(v * 38))  # spine
    if p["nodule"] is not None:
        n = p["nodule"]
        img += n["contrast"] * expit(ch.nodule() / 0.7)
    au = np.abs(u)
    base = (v - 0.8 * (au - 0.25) ** 2) * (1 / 0.022)
    ribs = np.zeros_like(img)
    for k in range(10):
        t = base - (-0.845 + 0.118 * k + 0.004 * k * k) / 0.022
        t *= t
        ribs += np.exp(-t * t)
    img += 100 * ribs * expit((au - 0.07) * s) * expit((0.80 - au) * s / 2) * body * expit((dome_v - v) * s / 2)
    for side in (-1, 1):  # clavicles and humeral heads
        a, b = np.array([side * 0.05, -0.70]), np.array([side * 0.62, -0.86])
        t = np.clip(((u - a[0]) * (b[0] - a[0]) + (v - a[1]) * (b[1] - a[1])) / np.sum((b - a) ** 2), 0, 1)
        dist = np.hypot(u - a[0] - t * (b[0] - a[0]), v - a[1] - t * (b[1] - a[1]))
        img += 280 * expit((0.03 - dist) * s / 1.0)
        img += 380 * expit(_ellipse_sd(u, v, side * 0.93, -0.88, 0.14, 0.14, s) / 1.5) * body
    gx, gy = rng.normal(0, 0.08, 2)
    img = img * (1 + gx * (ch.xx / size - 0.5) + gy * (ch.yy / size - 0.5)) * rng.uniform(0.92, 1.08)
    img = gaussian_filter(img.astype(np.float32), 0.7)
    img += rng.normal(0, 22, img.shape).astype(np.float32)
    return np.clip(img, 0, 4095).astype(np.float32)


def write_study(row: dict[str, Any], out: Path, seed: int) -> None:
    """Renders study ``row`` and writes it as one CR DICOM file."""
    index = int(row["study_id"][1:])
    img = render(row["_params"], C.rng_for(seed, KIND, C.STREAM_IMAGE, index))
    storage = row["_storage"]
    value = np.rint(img).astype(np.int32)
    if storage["monochrome1"]:
        value = 4095 - value
    stored = (value // storage["slope"]).astype(np.uint16)
    instance = C.uid(seed, KIND, index, "instance")
    ds = C.new_dicom(
        CR_STORAGE,
        instance,
        row["_phi"],
        C.uid(seed, KIND, index, "study"),
        C.uid(seed, KIND, index, "series"),
        MODALITY,
    )
    ds.StudyDescription = "XR CHEST PA"
    ds.SeriesDescription = "PA"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.PatientOrientation = ["L", "F"]
    ds.InstanceNumber = 1
    pixel = row["_params"].get("pixel_mm", PIXEL_MM)
    ds.ImagerPixelSpacing = [pixel, pixel]
    ds.PixelSpacing = [pixel, pixel]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if storage["monochrome1"] else "MONOCHROME2"
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleIntercept, ds.RescaleSlope = 0, storage["slope"]
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    ds.PixelData = stored.tobytes()
    if storage["rle"]:
        ds.compress(RLELossless, encoding_plugin="pydicom", generate_instance_uid=False)
    C.save_dicom(ds, out / row["image"])
