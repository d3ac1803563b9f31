"""Hospital styles of the synthetic cohorts: what real sites vary, drawn deterministically from a style seed.

A style is one hospital: its report phrasing (which of several ways to say each finding, each negation and each
hedge it uses, and whether findings are written in FINDINGS, in IMPRESSION or both), how often findings are
bilateral, lesion sizes and contrast, image size and pixel spacing (CT: slice thickness), prevalences and the
names of the manifest's label, covariate and survival columns. Style ``0`` (or none) is the built-in cohort,
unchanged; any other seed gives the same style every time, whatever the cohort's own ``seed``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medvlp.data.synthetic.common import KIND_CODES

STREAM_STYLE = 97

# canonical manifest column -> names other hospitals use (the first is the built-in one); findings keep a
# medically equivalent name, since prompts are built from it
COLUMN_NAMES: dict[str, dict[str, Sequence[str]]] = {
    "cxr": {
        "cardiomegaly": ("cardiomegaly", "enlarged_heart"),
        "pleural_effusion": ("pleural_effusion", "effusion"),
        "lung_nodule": ("lung_nodule", "pulmonary_nodule"),
        "pneumothorax": ("pneumothorax",),
    },
    "ct": {
        "renal_mass": ("renal_mass", "kidney_mass"),
        "kidney_stone": ("kidney_stone", "nephrolithiasis", "renal_calculus"),
        "hepatic_lesion": ("hepatic_lesion", "liver_lesion"),
        "ascites": ("ascites",),
    },
}
COVARIATE_NAMES = {"age": ("age", "age_years", "patient_age"), "sex": ("sex", "male")}
# survival time column -> its unit; the generator's time is in months
TIME_COLUMNS = {"time": "months", "followup_days": "days", "followup_months": "months", "survival_years": "years"}
EVENT_COLUMNS = ("event", "deceased", "death")
MONTHS_PER = {"months": 1.0, "days": 1.0 / 30.4375, "years": 12.0}


@dataclass(frozen=True)
class Style:
    """One hospital's conventions. Built by :func:`make_style`; never by hand outside tests.

    Attributes:
        kind: ``"cxr"`` or ``"ct"``.
        seed: the style seed (positive).
        prevalence: per finding, the probability that it is truly present.
        columns: canonical manifest column -> this hospital's column name (findings, age, sex, time, event).
        time_unit: unit of the survival time column (``months``, ``days`` or ``years``).
        column_order: order of the label, covariate and survival columns in the manifest (canonical names).
        phrasing: per finding, the indices of the phrasings this hospital uses, per bank (``present``,
            ``impression``, ``negation``); see :mod:`medvlp.data.synthetic.phrasing`.
        hedges: indices of the uncertainty templates this hospital uses.
        p_findings_only: share of positive findings written only in FINDINGS (IMPRESSION leaves them out).
        p_impression_only: share written only in IMPRESSION.
        p_bilateral: share of lateral findings that can be bilateral (CXR effusions, CT stones) that are.
        image: kind-specific image parameters (sizes, spacings, lesion diameters in mm, contrast factor).
    """

    kind: str
    seed: int
    prevalence: dict[str, float]
    columns: dict[str, str]
    time_unit: str
    column_order: list[str]
    phrasing: dict[str, dict[str, list[int]]]
    hedges: list[int]
    p_findings_only: float
    p_impression_only: float
    p_bilateral: float
    image: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        """The style as written to ``synthetic.json``."""
        return {
            "seed": self.seed,
            "prevalence": dict(self.prevalence),
            "columns": dict(self.columns),
            "time_unit": self.time_unit,
            "phrasing": self.phrasing,
            "hedges": list(self.hedges),
            "p_findings_only": self.p_findings_only,
            "p_impression_only": self.p_impression_only,
            "p_bilateral": self.p_bilateral,
            "image": dict(self.image),
        }

    def months_to_time(self, months: float) -> float:
        """A survival time in months expressed in this style's unit (days as whole days)."""
        value = months / MONTHS_PER[self.time_unit]
        return float(max(1, round(value))) if self.time_unit == "days" else round(value, 2)


def _subset(rng: np.random.Generator, n: int, lo: int, hi: int) -> list[int]:
    """A sorted random subset of ``range(n)`` with between ``lo`` and ``hi`` elements (at most ``n``)."""
    k = int(rng.integers(min(lo, n), min(hi, n) + 1))
    return sorted(int(i) for i in rng.choice(n, size=k, replace=False))


def _image(kind: str, rng: np.random.Generator) -> dict[str, Any]:
    if kind == "cxr":
        pixel = float(rng.choice([1.0, 1.2, 1.4, 1.6]))
        fov = float(rng.uniform(1.0, 1.15))
        lo = float(rng.choice([5.0, 6.0, 8.0]))
        return {
            "pixel_mm": pixel,
            "size": round(256 * 1.4 / pixel * fov / 8) * 8,
            "nodule_mm": [lo, float(rng.choice([20.0, 25.0, 34.0]))],
            "contrast": round(float(rng.uniform(0.55, 1.05)), 3),
        }
    pixel = float(rng.choice([3.2, 3.6, 4.0]))
    slice_mm = float(rng.choice([3.0, 4.0, 5.0]))
    return {
        "pixel_mm": pixel,
        "n_xy": round(384 / pixel / 4) * 4,
        "slice_mm": slice_mm,
        "n_z": round(200 / slice_mm),
        "renal_mass_mm": [float(rng.choice([5.0, 8.0, 10.0])), float(rng.choice([30.0, 40.0, 50.0]))],
        "kidney_stone_mm": [float(rng.choice([3.0, 4.0])), float(rng.choice([6.0, 8.0, 10.0]))],
        "hepatic_lesion_mm": [float(rng.choice([5.0, 7.0, 10.0])), float(rng.choice([25.0, 40.0]))],
        "contrast": round(float(rng.uniform(0.6, 1.0)), 3),
    }


def make_style(kind: str, seed: int, banks: Mapping[str, Mapping[str, Sequence[Any]]], n_hedges: int) -> Style:
    """The style of ``seed`` for ``kind``: the same ``(kind, seed)`` always gives the same style.

    Args:
        kind: ``"cxr"`` or ``"ct"``.
        seed: a positive integer (``0`` is the built-in cohort and has no style object).
        banks: per finding, per bank name, the phrasings to choose from (their count is what matters).
        n_hedges: number of uncertainty templates to choose from.

    Raises:
        ValueError: for an unknown kind or a seed that is not a positive integer.
    """
    if kind not in COLUMN_NAMES:
        raise ValueError(f"unknown synthetic cohort kind {kind!r}; known kinds: {', '.join(sorted(COLUMN_NAMES))}")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 1:
        raise ValueError(f"style must be a positive integer (0 or none is the built-in style), got {seed!r}")
    rng = np.random.default_rng([int(seed), KIND_CODES[kind], STREAM_STYLE])
    findings = list(COLUMN_NAMES[kind])
    prevalence = {f: round(float(rng.uniform(0.12, 0.40)), 2) for f in findings}
    columns = {f: str(rng.choice(names)) for f, names in COLUMN_NAMES[kind].items()}
    columns |= {c: str(rng.choice(names)) for c, names in COVARIATE_NAMES.items()}
    time_col = str(rng.choice(list(TIME_COLUMNS)))
    columns |= {"time": time_col, "event": str(rng.choice(EVENT_COLUMNS))}
    order = [*findings, "age", "sex", "time", "event"]
    order = [order[i] for i in rng.permutation(len(order))]
    phrasing = {f: {bank: _subset(rng, len(options), 2, 3) for bank, options in banks[f].items()} for f in findings}
    hedges = _subset(rng, n_hedges, 2, 3)
    p_findings_only = round(float(rng.uniform(0.0, 0.3)), 2)
    p_impression_only = round(float(rng.uniform(0.0, 0.3)), 2)
    p_bilateral = round(float(rng.uniform(0.25, 0.6)), 2)
    return Style(
        kind=kind,
        seed=int(seed),
        prevalence=prevalence,
        columns=columns,
        time_unit=TIME_COLUMNS[time_col],
        column_order=order,
        phrasing=phrasing,
        hedges=hedges,
        p_findings_only=p_findings_only,
        p_impression_only=p_impression_only,
        p_bilateral=p_bilateral,
        image=_image(kind, rng),
    )
