"""Per-record checks that need no decoding, shared by `medvlp cohort validate` and the build."""

from __future__ import annotations

from typing import Any

from medvlp.data.cohort import Cohort, CohortSpec


def resolve_report(spec: CohortSpec, value: str) -> str:
    """The report column holds the text itself or the path of a ``.txt`` file (relative to the YAML).

    Raises:
        FileNotFoundError: when the column names a ``.txt`` file that does not exist.
    """
    value = value or ""
    stripped = value.strip()
    if stripped.lower().endswith(".txt") and "\n" not in stripped:
        path = spec.resolve(stripped)
        if not path.is_file():
            raise FileNotFoundError("report file not found")  # no file name: it may carry an identifier
        return path.read_text(errors="replace").strip()
    return stripped


def precheck(spec: CohortSpec, row: Any) -> tuple[str | None, str | None]:
    """``(report, None)`` for a record worth decoding, else ``(None, reason)`` to quarantine it."""
    try:
        report = resolve_report(spec, row.report)
    except OSError as exc:
        return None, str(exc)
    if not report:
        return None, "empty report"
    if not spec.resolve(row.image).exists():
        return None, "image file not found"
    return report, None


def record_problems(cohort: Cohort) -> list[tuple[str, str]]:
    """``(study_id, reason)`` for every record a build would quarantine without even decoding it."""
    out = []
    for row in cohort.manifest.itertuples(index=False):
        _, reason = precheck(cohort.spec, row)
        if reason is not None:
            out.append((row.study_id, reason))
    return out
