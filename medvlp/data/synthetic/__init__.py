"""Built-in synthetic cohorts (chest radiographs, abdominal CT) in the user format that medvlp reads.

``synthesize(kind, n, out, seed)`` writes DICOM images, ``manifest.csv``, ``grounding.csv``, ``cohort.yaml`` and
``synthetic.json`` (the known generative model); ``sample_cases`` returns the tabular part only. ``style=K``
(a positive integer) makes the cohort look like it came from another hospital (:mod:`.style`).
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pandas as pd

from medvlp.data.synthetic import common, ct, cxr
from medvlp.data.synthetic.phrasing import BANKS, HEDGES
from medvlp.data.synthetic.style import Style, make_style

KINDS: dict[str, ModuleType] = {"cxr": cxr, "ct": ct}
TRUE_HAZARD: dict[str, dict[str, float]] = {kind: dict(mod.TRUE_HAZARD) for kind, mod in KINDS.items()}
FINDINGS: dict[str, list[str]] = {kind: list(mod.FINDINGS) for kind, mod in KINDS.items()}
LOCALIZED: dict[str, list[str]] = {kind: list(mod.LOCALIZED) for kind, mod in KINDS.items()}

__all__ = ["FINDINGS", "KINDS", "LOCALIZED", "TRUE_HAZARD", "Style", "get_style", "sample_cases", "synthesize"]


def _module(kind: str) -> ModuleType:
    if kind not in KINDS:
        raise ValueError(f"unknown synthetic cohort kind {kind!r}; known kinds: {', '.join(sorted(KINDS))}")
    return KINDS[kind]


def get_style(kind: str, style: int | None) -> Style | None:
    """The hospital style ``style`` of ``kind``: ``None`` for ``0`` or ``None`` (the built-in cohort).

    Raises:
        ValueError: for an unknown kind or a style that is not a non-negative integer.
    """
    _module(kind)
    if style is None or (not isinstance(style, bool) and isinstance(style, int) and style == 0):
        return None
    if isinstance(style, bool) or not isinstance(style, int) or style < 0:
        raise ValueError(f"style must be a non-negative integer (0 = built-in), got {style!r}")
    return make_style(kind, style, BANKS[kind], len(HEDGES))


def synthesize(kind: str, n: int, out: str | Path, seed: int = 0, style: int | None = None, unpaired: int = 0) -> Path:
    """Writes a synthetic cohort in the user format to ``out`` and returns the path of ``out/cohort.yaml``.

    Args:
        kind: ``"cxr"`` (2D chest radiographs) or ``"ct"`` (3D abdominal CT).
        n: number of studies; study ``i`` is the same whatever ``n`` is.
        out: output folder, created if missing.
        seed: non-negative integer; the same ``(kind, n, seed)`` gives byte-identical files, whatever the
            number of worker processes (up to 4 when ``n >= 48``; the environment variable
            ``MEDVLP_SYNTH_WORKERS`` overrides it).
        style: hospital style seed; ``None`` or ``0`` is the built-in cohort (byte-identical to having no
            style). Another value varies phrasing, sections, bilateral findings, lesion sizes and contrast,
            image size and spacing, prevalences and column names, the same way for every ``seed``.
        unpaired: adds this many image-only studies (empty ``report``, blank labels) and as many report-only ones
            (empty ``image``), all in ``train``, each of a subject of its own; the ``n`` paired studies, their
            splits and files are the same whatever ``unpaired`` is.

    Returns:
        The path of the written ``cohort.yaml``.

    Raises:
        ValueError: for an unknown kind, a negative seed, style or unpaired, or ``n < 1``.
    """
    mod = _module(kind)
    seed = common.check_seed(seed)
    return common.write_cohort(mod, int(n), out, seed, get_style(kind, style), unpaired)


def sample_cases(kind: str, n: int, seed: int = 0, style: int | None = None, unpaired: int = 0) -> pd.DataFrame:
    """The tabular part of a cohort without images: what ``synthesize`` would write, fast.

    Args:
        kind: ``"cxr"`` or ``"ct"``.
        n: number of studies.
        seed: non-negative integer.
        style: hospital style seed (``None`` or ``0``: built-in); the columns then carry the style's names.
        unpaired: image-only and report-only studies appended, as :func:`synthesize` writes them.

    Returns:
        One row per study: the manifest columns (``subject_id, study_id, image, report, split, <findings>,
        age, sex, time, event``; findings as nullable ints 1/0/-1/NA), the finding details (side, size,
        location, diameter...) and ``boxes``, a list of the study's grounding boxes as dicts.

    Raises:
        ValueError: for an unknown kind or a negative seed.
    """
    mod = _module(kind)
    return common.sample_cases(mod, int(n), common.check_seed(seed), get_style(kind, style), unpaired)
