"""Tests of the built-in synthetic cohorts (medvlp.data.synthetic)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
import yaml
from pydicom.uid import RLELossless

from medvlp.data.synthetic import FINDINGS, LOCALIZED, TRUE_HAZARD, get_style, sample_cases, synthesize

KINDS = ("cxr", "ct")
KEYWORDS = {
    "cardiomegaly": r"cardiomegaly|\bheart\b|cardiac|cardiomediastinal|cardiothoracic",
    "pleural_effusion": r"effusion",
    "lung_nodule": r"nodul",
    "pneumothorax": r"pneumothorax",
    "renal_mass": r"\bmass(es)?\b|renal lesion",
    "kidney_stone": r"stone|calcul|nephrolith",
    "hepatic_lesion": r"\bliver\b|\bhepatic\b",
    "ascites": r"ascites|free fluid",
}
NEGATION = re.compile(r"\b(no|not|without|normal|unremarkable)\b", re.I)
UNCERTAINTY = re.compile(r"possible|possibly|cannot be excluded|may represent|questionable|borderline", re.I)
IMAGE_SHAPE = {"cxr": (256, 256), "ct": (96, 96, 40)}


@pytest.fixture(scope="module")
def make(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Synthesizes (once per module) a cohort and returns its folder."""
    root = tmp_path_factory.mktemp("synthetic")
    cache: dict[tuple, Path] = {}

    def _make(kind: str, n: int, seed: int = 0, copy: str = "a", style: int | None = None) -> Path:
        key = (kind, n, seed, copy, style)
        if key not in cache:
            cache[key] = synthesize(kind, n, root / f"{kind}-{n}-{seed}-{copy}-{style}", seed=seed, style=style).parent
        return cache[key]

    return _make


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _read_2d(path: Path) -> tuple[np.ndarray, pydicom.Dataset]:
    """Brightness of a radiograph (rescaled, MONOCHROME1 inverted), [row, column]."""
    ds = pydicom.dcmread(path)
    a = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        a = 4095 - a
    return a, ds


def _read_ct(folder: Path) -> tuple[np.ndarray, list[pydicom.Dataset]]:
    """HU volume [slice, row, column] with slices in ascending ImagePositionPatient z."""
    slices = sorted((pydicom.dcmread(p) for p in folder.glob("*.dcm")), key=lambda d: float(d.ImagePositionPatient[2]))
    vol = np.stack([d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in slices])
    return vol, slices


def test_unknown_kind_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"'mri'.*ct, cxr"):
        synthesize("mri", 2, tmp_path)
    with pytest.raises(ValueError, match="mri"):
        sample_cases("mri", 2)
    assert not (tmp_path / "cohort.yaml").exists()


@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_gives_identical_bytes(make: Callable[..., Path], kind: str) -> None:
    a, b, other = _files(make(kind, 6)), _files(make(kind, 6, copy="b")), _files(make(kind, 6, seed=1))
    assert a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []
    assert a["manifest.csv"] != other["manifest.csv"]
    dicoms = {v for k, v in a.items() if k.endswith(".dcm")}
    assert dicoms and not dicoms & {v for k, v in other.items() if k.endswith(".dcm")}


@pytest.mark.parametrize("kind", KINDS)
def test_a_cohort_is_the_prefix_of_a_larger_one(make: Callable[..., Path], kind: str) -> None:
    small, large = make(kind, 4), make(kind, 6)
    ms, ml = pd.read_csv(small / "manifest.csv"), pd.read_csv(large / "manifest.csv")
    pd.testing.assert_frame_equal(ms, ml.head(4), check_dtype=False)
    gs, gl = pd.read_csv(small / "grounding.csv"), pd.read_csv(large / "grounding.csv")
    pd.testing.assert_frame_equal(gs, gl[gl.study_id.isin(ms.study_id)].reset_index(drop=True))
    fs, fl = _files(small / "images"), _files(large / "images")
    assert fs and all(fl[k] == v for k, v in fs.items())
    four, six = sample_cases(kind, 4, seed=0), sample_cases(kind, 6, seed=0).head(4)
    pd.testing.assert_frame_equal(four, six)


@pytest.mark.parametrize("kind", KINDS)
def test_cohort_layout(make: Callable[..., Path], kind: str) -> None:
    folder = make(kind, 24)
    cfg = yaml.safe_load((folder / "cohort.yaml").read_text())
    assert cfg["name"] == f"synthetic-{kind}"
    assert cfg["modality"] == {"cxr": "CR", "ct": "CT"}[kind]
    assert cfg["spatial_dims"] == {"cxr": 2, "ct": 3}[kind]
    assert cfg["findings"] == FINDINGS[kind]
    assert cfg["covariates"] == ["age", "sex"] and cfg["survival"] == {"time": "time", "event": "event"}
    assert set(cfg["preprocess"]) == {"size", "spacing", "orientation", "intensity"}
    assert cfg["preprocess"]["size"] == ([128, 128] if kind == "cxr" else [64, 64, 32])
    m = pd.read_csv(folder / cfg["manifest"], dtype={"subject_id": str, "study_id": str})
    head, tail = ["subject_id", "study_id", "image", "report", "split"], ["age", "sex", "time", "event"]
    assert list(m.columns) == [*head, *FINDINGS[kind], *tail]
    assert len(m) == 24 and m.study_id.is_unique
    assert m.study_id.str.fullmatch(r"S\d{5}").all() and m.subject_id.str.fullmatch(r"P\d{4}").all()
    for f in FINDINGS[kind]:
        assert set(m[f].dropna().unique()) <= {1, 0, -1}
    assert m.report.str.contains("FINDINGS:\n").all() and m.report.str.contains("\n\nIMPRESSION:\n").all()
    assert set(m.split) <= {"train", "val", "test"} and (m.groupby("subject_id").split.nunique() == 1).all()
    assert set(m.sex) <= {0, 1} and set(m.event) <= {0, 1} and (m.time > 0).all() and m.age.between(18, 95).all()
    assert all((folder / p).exists() for p in m.image)
    info = json.loads((folder / "synthetic.json").read_text())
    assert info["kind"] == kind and info["n"] == 24 and info["true_hazard"] == TRUE_HAZARD[kind]
    assert {"baseline_hazard", "prevalence", "censoring"} <= info.keys()
    g = pd.read_csv(folder / cfg["grounding"])
    dims = ["x", "y", "w", "h", *(["z", "d"] if kind == "ct" else [])]
    assert list(g.columns) == ["study_id", "category_name", "label_text", *dims]
    size = dict(zip("xyz", IMAGE_SHAPE[kind], strict=False))
    for axis, width in (("x", "w"), ("y", "h"), ("z", "d")):
        if axis in g:
            assert (g[axis] >= 0).all() and (g[width] >= 1).all() and (g[axis] + g[width] <= size[axis]).all()
    boxed = set(zip(g.study_id, g.category_name, strict=True))
    wanted = {(s, f) for f in LOCALIZED[kind] for s in m.study_id[m[f] == 1]}
    assert wanted and boxed == wanted
    for _, box in g.iterrows():
        assert box.label_text in m.set_index("study_id").report[box.study_id]


def test_nodules_are_brighter_than_the_lung_around_them(make: Callable[..., Path]) -> None:
    folder = make("cxr", 24)
    g = pd.read_csv(folder / "grounding.csv")
    nodules = g[g.category_name == "lung_nodule"]
    assert len(nodules) >= 2
    for _, b in nodules.iterrows():
        img, _ = _read_2d(folder / "images" / f"{b.study_id}.dcm")
        inside = img[b.y : b.y + b.h, b.x : b.x + b.w]
        ring = img[max(b.y - 4, 0) : b.y + b.h + 4, max(b.x - 4, 0) : b.x + b.w + 4]
        around = (ring.sum() - inside.sum()) / (ring.size - inside.size)
        assert inside.mean() > around + 150, b.study_id


def test_ct_lesions_differ_from_their_organ(make: Callable[..., Path]) -> None:
    folder = make("ct", 24)
    g = pd.read_csv(folder / "grounding.csv")
    assert {"hepatic_lesion", "kidney_stone", "renal_mass"} <= set(g.category_name)
    for _, b in g.iterrows():
        vol, _ = _read_ct(folder / "images" / b.study_id)
        box = vol[b.z : b.z + b.d, b.y : b.y + b.h, b.x : b.x + b.w]
        k, j, i = b.z + b.d // 2, b.y + b.h // 2, b.x + b.w // 2
        core = vol[k, j - (b.h > 2) : j + 1 + (b.h > 2), i - (b.w > 2) : i + 1 + (b.w > 2)].mean()
        shell = vol[k, b.y - 1 : b.y + b.h + 1, b.x - 1 : b.x + b.w + 1].copy()
        shell[1:-1, 1:-1] = np.nan
        if b.category_name == "kidney_stone":
            assert box.max() >= 800, b.study_id
        elif b.category_name == "hepatic_lesion":  # hypodense in the liver (about 60 HU)
            assert core < 30 and np.nanmedian(shell) > 40, b.study_id
        else:  # enhancing renal mass, denser than the kidney (30-70 HU)
            assert core > 90, b.study_id


@pytest.mark.parametrize("kind", KINDS)
def test_reports_agree_with_labels(kind: str) -> None:
    df = sample_cases(kind, 400, seed=3)
    for _, row in df.iterrows():
        sentences = [s for s in re.split(r"(?<=[.;])\s+|\n+", row.report) if s.strip()]
        for f in FINDINGS[kind]:
            said = [s for s in sentences if re.search(KEYWORDS[f], s, re.I)]
            label = row[f]
            where = f"{row.study_id} {f}={label}: {said}"
            if pd.isna(label):
                assert not said, where
            elif label == 0:
                assert said and all(NEGATION.search(s) and not UNCERTAINTY.search(s) for s in said), where
            elif label == -1:
                assert said and all(UNCERTAINTY.search(s) for s in said), where
            else:
                assert said and not any(NEGATION.search(s) or UNCERTAINTY.search(s) for s in said), where


@pytest.mark.parametrize("kind", KINDS)
def test_labels_prevalence_and_normal_reports(kind: str) -> None:
    df = sample_cases(kind, 1000, seed=0)
    labels = df[FINDINGS[kind]]
    truly = labels.isin([1, -1]).mean()
    assert truly.between(0.2, 0.35).all(), truly
    assert 0.01 < labels.isna().to_numpy().mean() < 0.08
    assert 0.02 < labels.isin([-1]).to_numpy().mean() < 0.08
    normal = (labels.fillna(0) == 0).all(axis=1)
    assert 0.2 < normal.mean() < 0.4
    reports = df.report[normal]
    assert reports.value_counts().iloc[0] >= 0.1 * len(reports)  # normal reports come from a few templates
    assert reports.nunique() < 0.5 * len(reports)
    subjects = df.groupby("subject_id").size()
    assert 0.08 < (subjects == 2).mean() < 0.22
    assert df.drop_duplicates("subject_id").split.value_counts(normalize=True).between(0.1, 0.8).all()


@pytest.mark.parametrize(("kind", "n", "tol"), [("ct", 10000, 0.15), ("cxr", 3000, 0.2)])
def test_survival_recovers_true_hazard(kind: str, n: int, tol: float) -> None:
    # standard errors are about 0.03 (ct, 10000) and 0.06 (cxr, 3000): the tolerances are 3-5 of them
    from lifelines import CoxPHFitter

    df = sample_cases(kind, n, seed=0)
    assert 0.3 < df.event.mean() < 0.7
    x = pd.DataFrame({f: df[f].isin([1, -1]).astype(float) for f in FINDINGS[kind]})
    x["age"], x["sex"], x["time"], x["event"] = (df.age - 60) / 10, df.sex, df.time, df.event
    fitted = CoxPHFitter().fit(x, "time", "event").params_
    for name, beta in TRUE_HAZARD[kind].items():
        assert abs(fitted[name] - beta) < tol, (name, fitted[name], beta)


def test_cxr_dicom_headers_and_storage_variants(make: Callable[..., Path]) -> None:
    folder = make("cxr", 24)
    m = pd.read_csv(folder / "manifest.csv")
    seen: dict[str, set] = {"photometric": set(), "syntax": set(), "slope": set()}
    ids: dict[str, set] = {}
    for _, row in m.iterrows():
        img, ds = _read_2d(folder / row.image)
        assert ds.file_meta.MediaStorageSOPClassUID == "1.2.840.10008.5.1.4.1.1.1" and ds.Modality == "CR"
        assert (ds.Rows, ds.Columns, ds.BitsStored, ds.HighBit, ds.PixelRepresentation) == (256, 256, 12, 11, 0)
        assert [float(v) for v in ds.PixelSpacing] == [1.4, 1.4] == [float(v) for v in ds.ImagerPixelSpacing]
        assert img.shape == (256, 256) and img.min() >= 0 and img.max() <= 4095 and img.std() > 200
        _check_phi(ds, row)
        ids.setdefault(row.subject_id, set()).add(ds.PatientID)
        seen["photometric"].add(ds.PhotometricInterpretation)
        seen["syntax"].add(ds.file_meta.TransferSyntaxUID)
        seen["slope"].add(float(ds.RescaleSlope))
    assert seen["photometric"] == {"MONOCHROME1", "MONOCHROME2"}
    assert RLELossless in seen["syntax"] and pydicom.uid.ExplicitVRLittleEndian in seen["syntax"]
    assert seen["slope"] == {1.0, 2.0}
    assert all(len(v) == 1 for v in ids.values()) and len({next(iter(v)) for v in ids.values()}) == len(ids)
    assert (m.groupby("subject_id").size() == 2).any()


def test_ct_series_geometry_and_headers(make: Callable[..., Path]) -> None:
    folder = make("ct", 24)
    m = pd.read_csv(folder / "manifest.csv")
    orders, name_sorted = set(), []
    for _, row in m.iterrows():
        vol, slices = _read_ct(folder / row.image)
        assert vol.shape == (40, 96, 96) and len(list((folder / row.image).iterdir())) == 40
        z = np.array([float(d.ImagePositionPatient[2]) for d in slices])
        assert np.allclose(np.diff(z), 5.0)
        for d in slices:
            assert d.file_meta.MediaStorageSOPClassUID == "1.2.840.10008.5.1.4.1.1.2" and d.Modality == "CT"
            assert [float(v) for v in d.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
            assert [float(v) for v in d.PixelSpacing] == [4.0, 4.0] and float(d.SliceThickness) == 5.0
            assert (d.BitsStored, d.PixelRepresentation, float(d.RescaleIntercept)) == (16, 1, -1024.0)
        _check_phi(slices[0], row)
        assert len({d.SOPInstanceUID for d in slices}) == 40 and len({d.SeriesInstanceUID for d in slices}) == 1
        assert all(d.SOPInstanceUID == d.file_meta.MediaStorageSOPInstanceUID for d in slices)
        instance = [int(d.InstanceNumber) for d in slices]
        orders.add("ascending" if instance == sorted(instance) else "descending")
        by_name = sorted((folder / row.image).glob("*.dcm"))
        name_sorted.append([float(pydicom.dcmread(p).ImagePositionPatient[2]) for p in by_name] == sorted(z))
        assert -1010 < np.median(vol[:, :4, :4]) < -990  # air in the corner
        spine = vol[:, slices[0].Rows // 2 :, :].max(axis=(1, 2))
        assert (spine > 500).all()  # a vertebra on every slice
    assert orders == {"ascending", "descending"} and not any(name_sorted)


def _check_phi(ds: pydicom.Dataset, row: pd.Series) -> None:
    assert str(ds.PatientName).startswith("SYNTH^")
    assert re.fullmatch(r"MRN\d{7}", ds.PatientID) and ds.PatientID != row.subject_id
    assert re.fullmatch(r"ACC\d{8}", ds.AccessionNumber) and ds.AccessionNumber != row.study_id
    assert re.fullmatch(r"\d{8}", ds.PatientBirthDate) and re.fullmatch(r"\d{8}", ds.StudyDate)
    assert ds.InstitutionName and str(ds.ReferringPhysicianName)
    assert row.subject_id not in str(ds.PatientName) and row.study_id not in str(ds.PatientName)


# ------------------------------------------------------------------ hospital styles (--style)

STYLED_KEYWORDS = KEYWORDS | {
    "pleural_effusion": r"effusion|costophrenic|pleural fluid",
    "renal_mass": r"\bmass(es)?\b|renal lesion",
}
STYLED_UNCERTAINTY = re.compile(UNCERTAINTY.pattern + r"|suspected|equivocal|cannot exclude", re.I)


def _sections(report: str) -> tuple[str, str]:
    findings, impression = report.split("\n\nIMPRESSION:\n")
    return findings.removeprefix("FINDINGS:\n"), impression


def _canonical(kind: str, style: int) -> dict[str, str]:
    """This style's column name -> canonical name."""
    return {v: k for k, v in get_style(kind, style).columns.items()}


@pytest.mark.parametrize("kind", KINDS)
def test_style_is_deterministic_per_style_seed(make: Callable[..., Path], kind: str) -> None:
    assert get_style(kind, 1) == get_style(kind, 1) and get_style(kind, 1) != get_style(kind, 2)
    pd.testing.assert_frame_equal(sample_cases(kind, 30, seed=4, style=2), sample_cases(kind, 30, seed=4, style=2))
    a, b = _files(make(kind, 3, style=1)), _files(make(kind, 3, style=1, copy="b"))
    assert a.keys() == b.keys() and [k for k in a if a[k] != b[k]] == []
    # the style is the hospital, the seed the patients: another seed keeps the style's columns and spacing
    other = make(kind, 3, seed=1, style=1)
    assert (other / "cohort.yaml").read_bytes() == a["cohort.yaml"]
    assert _files(other)["manifest.csv"] != a["manifest.csv"]


@pytest.mark.parametrize("kind", KINDS)
def test_style_zero_is_the_built_in_cohort(make: Callable[..., Path], kind: str) -> None:
    assert get_style(kind, 0) is None and get_style(kind, None) is None
    pd.testing.assert_frame_equal(sample_cases(kind, 20, seed=2, style=0), sample_cases(kind, 20, seed=2))
    a, b = _files(make(kind, 3)), _files(make(kind, 3, style=0))
    assert a.keys() == b.keys() and [k for k in a if a[k] != b[k]] == []


@pytest.mark.parametrize("bad", [-1, 1.5, "1", True])
def test_bad_style_is_rejected(tmp_path: Path, bad: object) -> None:
    with pytest.raises(ValueError, match="style"):
        synthesize("cxr", 2, tmp_path, style=bad)  # type: ignore[arg-type]
    assert not (tmp_path / "cohort.yaml").exists()


@pytest.mark.parametrize("kind", KINDS)
def test_two_styles_differ_in_phrasing_sizes_and_columns(kind: str) -> None:
    a, b = get_style(kind, 1), get_style(kind, 3)
    ca, cb = sample_cases(kind, 300, seed=0, style=1), sample_cases(kind, 300, seed=0, style=3)
    sentences = [
        {s for r in df.report for s in re.split(r"(?<=[.;])\s+|\n+", r) if s and not s[0].isdigit()} for df in (ca, cb)
    ]
    shared = len(sentences[0] & sentences[1]) / len(sentences[0] | sentences[1])
    assert shared < 0.5, shared  # mostly different sentences (the normal ones may coincide)
    assert list(ca.columns[:13]) != list(cb.columns[:13])  # label, covariate and survival names
    assert a.image != b.image  # image size, spacing, lesion sizes, contrast
    lesion = "lung_nodule" if kind == "cxr" else "renal_mass"
    sizes = [df[f"{lesion}_diameter_mm"].dropna() for df in (ca, cb)]
    assert abs(sizes[0].median() - sizes[1].median()) > 1.0 or abs(sizes[0].min() - sizes[1].min()) > 1.0
    for style, df in ((a, ca), (b, cb)):  # labels follow the style's prevalences
        for f, p in style.prevalence.items():
            assert abs(df[style.columns[f]].isin([1, -1]).mean() - p) < 0.1, (f, p)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("style", [1, 2])
def test_styled_reports_agree_with_labels(kind: str, style: int) -> None:
    df = sample_cases(kind, 300, seed=3, style=style).rename(columns=_canonical(kind, style))
    only = {"findings": 0, "impression": 0}
    for _, row in df.iterrows():
        findings, impression = _sections(row.report)
        sentences = [s for s in re.split(r"(?<=[.;])\s+|\n+", row.report) if s.strip()]
        for f in FINDINGS[kind]:
            said = [s for s in sentences if re.search(STYLED_KEYWORDS[f], s, re.I)]
            label = row[f]
            where = f"{row.study_id} {f}={label}: {said}"
            if pd.isna(label):
                assert not said, where
            elif label == 0:
                assert said and all(NEGATION.search(s) and not STYLED_UNCERTAINTY.search(s) for s in said), where
            elif label == -1:
                assert said and all(STYLED_UNCERTAINTY.search(s) for s in said), where
            else:
                assert said and not any(NEGATION.search(s) or STYLED_UNCERTAINTY.search(s) for s in said), where
                in_f, in_i = (bool(re.search(STYLED_KEYWORDS[f], t, re.I)) for t in (findings, impression))
                only["findings"] += in_f and not in_i
                only["impression"] += in_i and not in_f
    s = get_style(kind, style)
    for section, p in (("findings", s.p_findings_only), ("impression", s.p_impression_only)):
        assert (only[section] > 0) == (p > 0), (section, only, p)


@pytest.mark.parametrize("kind", KINDS)
def test_bilateral_phrases_carry_two_boxes(kind: str) -> None:
    style = get_style(kind, 2)
    df = sample_cases(kind, 300, seed=0, style=2).rename(columns=_canonical(kind, 2))
    finding = "pleural_effusion" if kind == "cxr" else "kidney_stone"
    width = style.image["size"] if kind == "cxr" else style.image["n_xy"]
    n_bilateral = 0
    for _, row in df[df[finding] == 1].iterrows():
        boxes = [b for b in row.boxes if b["category_name"] == finding]
        bilateral = row[f"{finding}_side"] == "bilateral"
        assert len(boxes) == (2 if bilateral else 1), row.study_id
        assert all(b["label_text"] in row.report for b in boxes)
        if bilateral:
            n_bilateral += 1
            assert boxes[0]["label_text"] == boxes[1]["label_text"]
            assert re.search(r"bilateral|both", boxes[0]["label_text"], re.I)
            centres = sorted(b["x"] + b["w"] / 2 for b in boxes)
            assert centres[0] < width / 2 < centres[1], row.study_id  # one box on each side
    assert n_bilateral >= 5


@pytest.mark.parametrize("kind", KINDS)
def test_styled_cohort_validates_builds_and_matches_its_images(tmp_path: Path, kind: str) -> None:
    from typer.testing import CliRunner

    from medvlp.cli import app
    from medvlp.data.build import build_cohort
    from medvlp.data.cache import CachedCohort

    runner, folder = CliRunner(), tmp_path / "cohort"
    res = runner.invoke(app, ["cohort", "synth", "--kind", kind, "--n", "8", "--style", "2", "--out", str(folder)])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["cohort", "validate", str(folder / "cohort.yaml")])
    assert res.exit_code == 0 and "8 usable, 0 would be quarantined" in res.output, res.output
    style = get_style(kind, 2)
    cfg = yaml.safe_load((folder / "cohort.yaml").read_text())
    names = style.columns
    assert cfg["findings"] == [names[f] for f in FINDINGS[kind]] and cfg["covariates"] == [names["age"], names["sex"]]
    assert cfg["survival"] == {"time": names["time"], "event": names["event"]}
    m = pd.read_csv(folder / "manifest.csv")
    assert list(m.columns[5:]) == [names[c] for c in style.column_order]
    assert json.loads((folder / "synthetic.json").read_text())["style"]["columns"] == names
    g = pd.read_csv(folder / "grounding.csv")
    assert set(g.category_name) <= set(cfg["findings"])
    img = style.image
    if kind == "cxr":
        _, ds = _read_2d(folder / m.image[0])
        assert (ds.Rows, ds.Columns) == (img["size"],) * 2 and float(ds.PixelSpacing[0]) == img["pixel_mm"]
        shape = {"x": img["size"], "y": img["size"]}
    else:
        vol, slices = _read_ct(folder / m.image[0])
        assert vol.shape == (img["n_z"], img["n_xy"], img["n_xy"])
        assert (
            float(slices[0].SliceThickness) == img["slice_mm"] and float(slices[0].PixelSpacing[0]) == img["pixel_mm"]
        )
        assert np.allclose(np.diff([float(d.ImagePositionPatient[2]) for d in slices]), img["slice_mm"])
        shape = {"x": img["n_xy"], "y": img["n_xy"], "z": img["n_z"]}
    for axis, size in (("x", "w"), ("y", "h"), ("z", "d")):
        if axis in shape:
            assert (g[axis] >= 0).all() and (g[axis] + g[size] <= shape[axis]).all()
    summary = build_cohort(folder / "cohort.yaml", tmp_path / "cache")
    assert summary.ingested == 8 and summary.quarantined == 0
    records = CachedCohort.open(tmp_path / "cache").records
    assert {names["time"], names["event"], names["age"]} <= set(records.columns)


def test_styled_lesions_keep_their_contrast(make: Callable[..., Path]) -> None:
    """Styled lesions (other sizes, other contrast) are still visible where their boxes say."""
    folder = make("cxr", 24, style=3)
    contrast = get_style("cxr", 3).image["contrast"]
    g = pd.read_csv(folder / "grounding.csv")
    nodules = g[g.category_name == "pulmonary_nodule"]
    assert len(nodules) >= 2
    for _, b in nodules.iterrows():
        img, _ = _read_2d(folder / "images" / f"{b.study_id}.dcm")
        inside = img[b.y : b.y + b.h, b.x : b.x + b.w]
        ring = img[max(b.y - 4, 0) : b.y + b.h + 4, max(b.x - 4, 0) : b.x + b.w + 4]
        around = (ring.sum() - inside.sum()) / (ring.size - inside.size)
        assert inside.mean() > around + 150 * contrast, b.study_id
    folder = make("ct", 16, style=2)
    g = pd.read_csv(folder / "grounding.csv")
    assert {"kidney_stone", "hepatic_lesion"} <= set(g.category_name)
    for _, b in g.iterrows():
        vol, _ = _read_ct(folder / "images" / b.study_id)
        box = vol[b.z : b.z + b.d, b.y : b.y + b.h, b.x : b.x + b.w]
        if b.category_name == "kidney_stone":
            assert box.max() >= 400, b.study_id
        elif b.category_name == "hepatic_lesion":  # hypodense in the liver (about 60 HU)
            assert np.median(box) < 50, b.study_id
