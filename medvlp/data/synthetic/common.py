"""Machinery shared by the synthetic cohorts: seeding, subjects, fake PHI, survival, DICOM and manifest writing.

Every random quantity of study ``i`` comes from a generator seeded with ``(seed, kind, stream, i)``, so a
study does not depend on how many studies are generated, and the tabular part, the report, the survival
outcome and the image noise each use their own stream.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import yaml
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

if TYPE_CHECKING:
    from medvlp.data.synthetic.style import Style

log = logging.getLogger(__name__)

KIND_CODES = {"cxr": 1, "ct": 2}
STREAM_SUBJECT, STREAM_STUDY, STREAM_REPORT, STREAM_SURVIVAL, STREAM_IMAGE, STREAM_BLOCK = 1, 2, 3, 4, 5, 6

STATES = ("present", "uncertain", "absent", "unmentioned")
LABELS: dict[str, int | None] = {"present": 1, "uncertain": -1, "absent": 0, "unmentioned": None}
P_UNCERTAIN = 0.15  # of truly present findings, the share the report only hedges on
P_UNMENTIONED = 0.05  # of truly absent findings, the share the report does not mention

MANIFEST_HEAD = ["subject_id", "study_id", "image", "report", "split"]
MANIFEST_TAIL = ["age", "sex", "time", "event"]

WEIBULL_SHAPE = 1.3
WEIBULL_SCALE = 85.0  # months; with the cohorts' covariates the median event time is about 36 months
ADMIN_CENSOR_MONTHS = 60.0
DROPOUT_MEAN_MONTHS = 60.0

_BASE_DATE = dt.date(2012, 1, 2)
_SYLLABLES = ("al", "bar", "cor", "dan", "el", "fen", "gar", "hol", "is", "kel", "lor", "mar", "nor", "per", "ros")
_GIVEN = ["ALEX", "ROBIN", "SAM", "JORDAN", "KIM", "TAYLOR", "CASEY", "JAMIE", "MORGAN", "RILEY", "AVERY", "QUINN"]
_INSTITUTIONS = (
    "SYNTHETIC GENERAL HOSPITAL",
    "ST. NOWHERE MEDICAL CENTER",
    "FICTIVE UNIVERSITY CLINIC",
    "IMAGINARY VALLEY HOSPITAL",
)


def check_seed(seed: int) -> int:
    """Returns ``seed`` as an int after checking that it can seed the generators (a non-negative integer)."""
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def rng_for(seed: int, kind: str, stream: int, index: int) -> np.random.Generator:
    """The generator of one stream of one subject, study or block."""
    return np.random.default_rng([seed, KIND_CODES[kind], stream, index])


def uid(*parts: object) -> UID:
    """A deterministic DICOM UID derived from ``parts``."""
    return generate_uid(entropy_srcs=["medvlp-synthetic", *(str(p) for p in parts)])


def hex_name(*parts: object, length: int = 16) -> str:
    """A random-looking but deterministic file name stem."""
    return hashlib.sha256("/".join(str(p) for p in parts).encode()).hexdigest()[:length]


def pick(rng: np.random.Generator, options: Sequence[Any]) -> Any:
    """One element of ``options`` chosen uniformly."""
    return options[int(rng.integers(len(options)))]


@dataclass(frozen=True)
class Subject:
    """A synthetic patient: covariates, split and the fake PHI written into the DICOM headers."""

    index: int
    subject_id: str
    n_studies: int
    age: int
    sex: int  # 1 = male, 0 = female
    split: str
    patient_name: str
    patient_id: str
    birth_date: dt.date
    first_study: dt.date
    followup_days: int
    institution: str
    referring: str


def make_subject(kind: str, seed: int, k: int) -> Subject:
    """Draws subject ``k``."""
    rng = rng_for(seed, kind, STREAM_SUBJECT, k)
    n_studies = 2 if rng.random() < 0.15 else 1
    age = int(np.clip(round(rng.normal(60.0, 12.0)), 18, 95))
    sex = int(rng.random() < 0.5)
    u = rng.random()
    split = "train" if u < 0.70 else ("val" if u < 0.85 else "test")
    surname = "".join(pick(rng, _SYLLABLES) for _ in range(int(rng.integers(2, 4)))).upper()
    mrn = "MRN" + "".join(str(d) for d in rng.integers(0, 10, 7))
    first = _BASE_DATE + dt.timedelta(days=int(rng.integers(0, 3650)))
    birth = first - dt.timedelta(days=int(age * 365.25 + rng.integers(0, 365)))
    referring = "DR^" + "".join(pick(rng, _SYLLABLES) for _ in range(2)).upper()
    return Subject(
        index=k,
        subject_id=f"P{k:04d}",
        n_studies=n_studies,
        age=age,
        sex=sex,
        split=split,
        patient_name=f"SYNTH^{surname}^{pick(rng, _GIVEN)}",
        patient_id=mrn,
        birth_date=birth,
        first_study=first,
        followup_days=int(rng.integers(90, 730)),
        institution=pick(rng, _INSTITUTIONS),
        referring=referring,
    )


def plan_studies(kind: str, n: int, seed: int) -> list[tuple[Subject, int]]:
    """(subject, visit) of studies ``0..n-1``; the plan of ``n`` is the prefix of the plan of any larger ``n``."""
    plan: list[tuple[Subject, int]] = []
    k = 0
    while len(plan) < n:
        subject = make_subject(kind, seed, k)
        plan.extend((subject, visit) for visit in range(subject.n_studies))
        k += 1
    return plan[:n]


def study_phi(kind: str, seed: int, index: int, subject: Subject, visit: int) -> dict[str, Any]:
    """The fake identifying header values of one study (never the manifest's ids)."""
    rng = rng_for(seed, kind, STREAM_STUDY, 10_000_000 + index)
    date = subject.first_study + dt.timedelta(days=subject.followup_days * visit)
    seconds = int(rng.integers(7 * 3600, 19 * 3600))
    return {
        "PatientName": subject.patient_name,
        "PatientID": subject.patient_id,
        "PatientBirthDate": subject.birth_date.strftime("%Y%m%d"),
        "PatientSex": "M" if subject.sex == 1 else "F",
        "AccessionNumber": "ACC" + "".join(str(d) for d in rng.integers(0, 10, 8)),
        "StudyDate": date.strftime("%Y%m%d"),
        "StudyTime": f"{seconds // 3600:02d}{seconds // 60 % 60:02d}{seconds % 60:02d}",
        "StudyID": str(int(rng.integers(1000, 99999))),
        "InstitutionName": subject.institution,
        "ReferringPhysicianName": subject.referring,
    }


def study_age(subject: Subject, visit: int) -> int:
    """Age in whole years at the given visit."""
    return int(min(95, subject.age + (subject.followup_days * visit) // 365))


def sample_states(rng: np.random.Generator, prevalence: Mapping[str, float]) -> dict[str, str]:
    """Per finding, one of ``present``, ``uncertain`` (truly present, hedged), ``absent``, ``unmentioned``."""
    states = {}
    for finding, p in prevalence.items():
        truly = rng.random() < p
        u = rng.random()
        if truly:
            states[finding] = "uncertain" if u < P_UNCERTAIN else "present"
        else:
            states[finding] = "unmentioned" if u < P_UNMENTIONED else "absent"
    return states


def linear_predictor(hazard: Mapping[str, float], states: Mapping[str, str], age: float, sex: int) -> float:
    """log hazard ratio: findings truly present (label 1 or -1), ``(age - 60) / 10`` and sex (1 = male)."""
    lp = 0.0
    for name, beta in hazard.items():
        if name == "age":
            lp += beta * (age - 60.0) / 10.0
        elif name == "sex":
            lp += beta * sex
        else:
            lp += beta * float(states[name] in ("present", "uncertain"))
    return lp


def sample_survival(rng: np.random.Generator, lp: float) -> tuple[float, int]:
    """Weibull proportional-hazards event time, censored by dropout and at 60 months; time in months."""
    t_event = WEIBULL_SCALE * (rng.exponential() / math.exp(lp)) ** (1.0 / WEIBULL_SHAPE)
    t_censor = min(ADMIN_CENSOR_MONTHS, rng.exponential(DROPOUT_MEAN_MONTHS))
    event = int(t_event <= t_censor)
    return max(0.03, round(min(t_event, t_censor), 2)), event


def generative_model(mod: ModuleType) -> dict[str, Any]:
    """The known generative model of a kind, as written to ``synthetic.json``."""
    return {
        "true_hazard": dict(mod.TRUE_HAZARD),
        "covariate_coding": {
            "findings": "1 if the finding is truly present (label 1 or -1), else 0 (label 0 or blank)",
            "age": "(age - 60) / 10",
            "sex": "1 = male, 0 = female",
        },
        "baseline_hazard": {
            "family": "weibull",
            "shape": WEIBULL_SHAPE,
            "scale_months": WEIBULL_SCALE,
            "reference": "all findings absent, age 60, female (linear predictor 0)",
            "median_months_at_reference": round(WEIBULL_SCALE * math.log(2.0) ** (1.0 / WEIBULL_SHAPE), 2),
            "median_months_over_cohort": "about 36 (latent event time before censoring, over the covariate mix)",
            "cumulative_hazard": "H0(t) = (t / scale) ** shape",
        },
        "censoring": {
            "administrative_months": ADMIN_CENSOR_MONTHS,
            "dropout": "exponential",
            "dropout_mean_months": DROPOUT_MEAN_MONTHS,
        },
        "prevalence": dict(mod.PREVALENCE),
        "p_uncertain_given_present": P_UNCERTAIN,
        "p_unmentioned_given_absent": P_UNMENTIONED,
        "localized_findings": list(mod.LOCALIZED),
    }


# ---------------------------------------------------------------- DICOM


def new_dicom(
    sop_class: str, sop_instance: str, phi: Mapping[str, Any], study_uid: str, series_uid: str, modality: str
) -> Dataset:
    """A dataset with file meta, the identifiers and the fake PHI; the caller adds image attributes."""
    ds = Dataset()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_instance
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.Modality = modality
    ds.Manufacturer = "MEDVLP"
    for key, value in phi.items():
        setattr(ds, key, value)
    ds.SeriesDate = ds.StudyDate
    ds.ContentDate = ds.StudyDate
    ds.SeriesTime = ds.StudyTime
    ds.SeriesNumber = 1
    return ds


def save_dicom(ds: Dataset, path: Path) -> None:
    """Writes a DICOM Part 10 file."""
    ds.save_as(path, enforce_file_format=True)


# ---------------------------------------------------------------- cohort


def _rows(mod: ModuleType, n: int, seed: int, style: Style | None = None) -> list[dict[str, Any]]:
    plan = enumerate(plan_studies(mod.KIND, n, seed))
    if style is None:
        return [mod.sample_study(seed, i, subject, visit) for i, (subject, visit) in plan]
    return [mod.sample_study(seed, i, subject, visit, style) for i, (subject, visit) in plan]


UNPAIRED_BASE = 900_000  # subject and study indices of unpaired studies: apart from every paired study's


def unpaired_rows(mod: ModuleType, k: int, seed: int, style: Style | None = None) -> list[dict[str, Any]]:
    """``k`` image-only then ``k`` report-only studies, each of its own subject, all in ``train``.

    They are drawn like the paired ones (same generators, indices from ``UNPAIRED_BASE``), then the report (with the
    labels read from it and the boxes its phrases name) or the image (and its boxes) is dropped. Their subjects are
    new ones, so the paired studies, their splits and their files are the same whatever ``k`` is.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"unpaired must be a non-negative integer, got {k!r}")
    rows = []
    for j in range(2 * k):
        index = UNPAIRED_BASE + j
        subject = replace(make_subject(mod.KIND, seed, index), subject_id=f"U{j:05d}", split="train", n_studies=1)
        args = (seed, index, subject, 0) if style is None else (seed, index, subject, 0, style)
        row = mod.sample_study(*args)
        row["boxes"] = []
        if j < k:  # image-only: no report, so no labels read from it either
            row["report"] = ""
            row.update(dict.fromkeys(mod.FINDINGS))
        else:  # report-only: no image file is written
            row["image"] = ""
        rows.append(row)
    return rows


def manifest_columns(mod: ModuleType, style: Style | None = None) -> list[str]:
    """The manifest's columns in order, with the style's names (canonical names without a style)."""
    if style is None:
        return [*MANIFEST_HEAD, *mod.FINDINGS, *MANIFEST_TAIL]
    return [*MANIFEST_HEAD, *(style.columns[c] for c in style.column_order)]


def restyle(df: pd.DataFrame, style: Style | None) -> pd.DataFrame:
    """The cases with the style's column names and survival time unit (unchanged without a style)."""
    if style is None:
        return df
    df = df.copy()
    df["time"] = [style.months_to_time(float(t)) for t in df["time"]]
    if style.time_unit == "days":
        df["time"] = df["time"].astype("int64")
    return df.rename(columns=style.columns)


def cases_frame(mod: ModuleType, rows: list[dict[str, Any]]) -> pd.DataFrame:
    """The public columns of the sampled studies: manifest columns first, then details and boxes."""
    columns = [*MANIFEST_HEAD, *mod.FINDINGS, *MANIFEST_TAIL]
    extra = [k for k in rows[0] if k not in columns and not k.startswith("_")] if rows else []
    df = pd.DataFrame([{k: r[k] for k in (*columns, *extra)} for r in rows], columns=[*columns, *extra])
    for finding in mod.FINDINGS:
        df[finding] = df[finding].astype("Int64")
    for col in extra:  # stable dtypes whatever values a prefix happens to hold
        if col.endswith(("_mm", "_ratio")):
            df[col] = df[col].astype(float)
    return df


def sample_cases(mod: ModuleType, n: int, seed: int, style: Style | None = None, unpaired: int = 0) -> pd.DataFrame:
    """Tabular part of a cohort without images (with the style's column names and time unit)."""
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    rows = _rows(mod, n, seed, style) + unpaired_rows(mod, unpaired, seed, style)
    return restyle(cases_frame(mod, rows), style)


def _write_chunk(args: tuple[str, list[dict[str, Any]], str, int]) -> None:
    module_name, rows, out, seed = args
    import importlib

    mod = importlib.import_module(module_name)
    for row in rows:
        mod.write_study(row, Path(out), seed)


def _workers(n: int) -> int:
    env = os.environ.get("MEDVLP_SYNTH_WORKERS")
    if env:
        return max(1, int(env))
    return 1 if n < 48 else max(1, min(4, os.cpu_count() or 1))


def write_cohort(
    mod: ModuleType, n: int, out: str | Path, seed: int, style: Style | None = None, unpaired: int = 0
) -> Path:
    """Samples ``n`` studies (+ ``unpaired`` image-only and as many report-only ones), writes their images,
    manifest, grounding, cohort.yaml and synthetic.json."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows = _rows(mod, n, seed, style)
    extra = unpaired_rows(mod, unpaired, seed, style)
    imaged = rows + [r for r in extra if r["image"]]
    workers = _workers(len(imaged))
    if workers == 1:
        for row in imaged:
            mod.write_study(row, out, seed)
    else:  # each study has its own generators, so the files do not depend on the split into chunks
        chunks = [(mod.__name__, imaged[w::workers], str(out), seed) for w in range(workers)]
        with ProcessPoolExecutor(max_workers=workers) as pool:
            list(pool.map(_write_chunk, chunks))
    df = cases_frame(mod, rows)  # the pairs: what synthetic.json's realized counts describe
    manifest = restyle(cases_frame(mod, rows + extra), style)[manifest_columns(mod, style)]
    manifest.to_csv(out / "manifest.csv", index=False, lineterminator="\n")
    box_cols = [
        "study_id",
        "category_name",
        "label_text",
        "x",
        "y",
        "w",
        "h",
        *(["z", "d"] if mod.SPATIAL_DIMS == 3 else []),
    ]
    boxes = [{"study_id": r["study_id"], **b} for r in rows for b in r["boxes"]]
    names = style.columns if style is not None else {c: c for c in [*mod.FINDINGS, *MANIFEST_TAIL]}
    for box in boxes:
        box["category_name"] = names[box["category_name"]]
    pd.DataFrame(boxes, columns=box_cols).to_csv(out / "grounding.csv", index=False, lineterminator="\n")
    cohort = {
        "name": f"synthetic-{mod.KIND}" + (f"-style{style.seed}" if style is not None else ""),
        "modality": mod.MODALITY,
        "spatial_dims": mod.SPATIAL_DIMS,
        "manifest": "manifest.csv",
        "grounding": "grounding.csv",
        "findings": [names[f] for f in mod.FINDINGS],
        "covariates": [names["age"], names["sex"]],
        "survival": {"time": names["time"], "event": names["event"]},
        "preprocess": mod.PREPROCESS,
    }
    text = yaml.safe_dump(cohort, sort_keys=False, default_flow_style=None)
    (out / "cohort.yaml").write_text(text)
    realized = {
        f: {str(v): int((df[f] == v).sum()) for v in (1, 0, -1)} | {"blank": int(df[f].isna().sum())}
        for f in mod.FINDINGS
    }
    info = {
        "kind": mod.KIND,
        "n": n,
        "seed": seed,
        **generative_model(mod),
        **({"prevalence": dict(style.prevalence), "style": style.describe()} if style is not None else {}),
        **({"unpaired": {"image_only": unpaired, "report_only": unpaired, "split": "train"}} if unpaired else {}),
        "realized": {
            "label_counts": realized,
            "event_rate": round(float(df["event"].mean()), 4),
            "n_subjects": int(df["subject_id"].nunique()),
        },
    }
    (out / "synthetic.json").write_text(json.dumps(info, indent=2) + "\n")
    log.info("wrote synthetic %s cohort of %d studies to %s", mod.KIND, n, out)
    return out / "cohort.yaml"
