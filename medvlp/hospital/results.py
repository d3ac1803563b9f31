"""What ``/v1/diagnose`` adds for a hospital: ``"store": true`` (the SR STOWed to the PACS the series came from)
and ``?format=fhir`` / ``Accept: application/fhir+json`` (a FHIR DiagnosticReport instead of the JSON answer).

The route calls :func:`answer_format` before the work and :func:`finish` after it; everything else is here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from medvlp.hospital.fhir import FHIR_MEDIA_TYPE, diagnostic_report
from medvlp.hospital.sr import algorithm_of, build_sr, read_source_headers
from medvlp.hospital.stow import stow_instances
from medvlp.serve.dicomweb import DicomWebConfig
from medvlp.serve.errors import ApiError

__all__ = ["FORMATS", "answer_format", "finish", "sources_for_store"]

FORMATS = ("json", "fhir")


def answer_format(request: Request) -> str:
    """``fhir`` when ``?format=fhir`` or ``Accept: application/fhir+json``, else ``json``.

    Raises:
        ApiError: 422 for an unknown ``format``.
    """
    fmt = request.query_params.get("format")
    if fmt is not None and fmt not in FORMATS:
        raise ApiError(422, "validation_error", f"format: one of {', '.join(FORMATS)}, got {fmt[:20]!r}")
    if fmt is None and FHIR_MEDIA_TYPE in request.headers.get("accept", "").lower():
        fmt = "fhir"
    return fmt or "json"


async def sources_for_store(opts: Any, path: Path) -> list[Any] | None:
    """The DICOM headers an SR will reference, read before the work folder is cleaned (None: nothing to store)."""
    if not getattr(opts, "store", False):
        return None
    sources = await run_in_threadpool(read_source_headers, path)
    if not sources:
        raise ApiError(422, "unreadable_image", "store: the DICOMweb answer holds no DICOM image an SR can reference")
    return sources


async def finish(
    answer: dict[str, Any], opts: Any, sources: list[Any] | None, fmt: str, service: Any, config: DicomWebConfig
) -> dict[str, Any] | JSONResponse:
    """Store the SR when asked, then answer JSON (with ``stored``) or FHIR; the peaks used for the SR never leave."""
    algorithm = algorithm_of(service.model, service.context.cohort) if sources is not None or fmt == "fhir" else None
    if sources is not None:
        assert algorithm is not None
        sr = await run_in_threadpool(build_sr, sources, answer["predictions"], algorithm)
        await stow_instances(opts.dicomweb.url, str(sr.StudyInstanceUID), [sr], config)
        uids = {"sop_instance_uid": str(sr.SOPInstanceUID), "series_instance_uid": str(sr.SeriesInstanceUID)}
        answer["stored"] = uids
    for pred in answer["predictions"]:
        pred.pop("peak", None)
    if fmt == "fhir":
        assert algorithm is not None
        report = diagnostic_report(answer["predictions"], algorithm)
        return JSONResponse(report, media_type=FHIR_MEDIA_TYPE)
    return answer
