"""Built-in synthetic cohorts (chest radiographs, abdominal CT) in the user format that medvlp reads.

``synthesize(kind, n, out, seed)`` writes DICOM images, ``manifest.csv``, ``grounding.csv``, ``cohort.yaml`` and
``synthetic.json`` (the known generative model); ``sample_cases`` returns the tabular part only.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pandas as pd

from medvlp.data.synthetic import common, ct, cxr

KINDS: dict[str, ModuleType] = {"cxr": cxr, "ct": ct}
TRUE_HAZARD: dict[str, dict[str, float]] = {kind: dict(mod.TRUE_HAZARD) for kind, mod in KINDS.items()}
FINDINGS: dict[str, list[str]] = {kind: list(mod.FINDINGS) for kind, mod in KINDS.items()}
LOCALIZED: dict[str, list[str]] = {kind: list(mod.LOCALIZED) for kind, mod in KINDS.items()}

__all__ = ["FINDINGS", "KINDS", "LOCALIZED", "TRUE_HAZARD", "sample_cases", "synthesize"]


def _module(kind: str) -> ModuleType:
    if kind not in KINDS:
        raise ValueError(f"unknown synthetic cohort kind {kind!r}; known kinds: {', '.join(sorted(KINDS))}")
    return KINDS[kind]


def synthesize(kind: str, n: int, out: str | Path, seed: int = 0) -> Path:
    """Writes a synthetic cohort in the user format to ``out`` and returns the path of ``out/cohort.yaml``.

    Args:
        kind: ``"cxr"`` (2D chest radiographs) or ``"ct"`` (3D abdominal CT).
        n: number of studies; study ``i`` is the same whatever ``n`` is.
        out: output folder, created if missing.
        seed: non-negative integer; the same ``(kind, n, seed)`` gives byte-identical files, whatever the
            number of worker processes (up to 4 when ``n >= 48``; the environment variable
            ``MEDVLP_SYNTH_WORKERS`` overrides it).

    Returns:
        The path of the written ``cohort.yaml``.

    Raises:
        ValueError: for an unknown kind, a negative seed or ``n < 1``.
    """
    mod = _module(kind)
    return common.write_cohort(mod, int(n), out, common.check_seed(seed))


def sample_cases(kind: str, n: int, seed: int = 0) -> pd.DataFrame:
    """The tabular part of a cohort without images: what ``synthesize`` would write, fast.

    Args:
        kind: ``"cxr"`` or ``"ct"``.
        n: number of studies.
        seed: non-negative integer.

    Returns:
        One row per study: the manifest columns (``subject_id, study_id, image, report, split, <findings>,
        age, sex, time, event``; findings as nullable ints 1/0/-1/NA), the finding details (side, size,
        location, diameter...) and ``boxes``, a list of the study's grounding boxes as dicts.

    Raises:
        ValueError: for an unknown kind or a negative seed.
    """
    mod = _module(kind)
    return common.sample_cases(mod, int(n), common.check_seed(seed))
