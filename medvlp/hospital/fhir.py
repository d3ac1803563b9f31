"""A diagnosis as a FHIR R4 DiagnosticReport: one Observation per finding, the model as a Device, all contained.

The probability is an Observation's ``valueQuantity`` (UCUM unit ``1``); each Observation names the model as its
``device`` and the report lists the Observations as its ``result``. The report is ``preliminary``: an unverified
machine result. No identifier goes in: no subject (the EHR links the report to its patient when it files it), no
DICOM UID, no file name. Only elements that R4 and R4B define alike are used (the tests validate with
``fhir.resources``' R4B models).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from medvlp.hospital.sr import Algorithm
from medvlp.tasks.zeroshot import finding_text

__all__ = ["FHIR_MEDIA_TYPE", "FINDING_SYSTEM", "diagnostic_report"]

FHIR_MEDIA_TYPE = "application/fhir+json"
FINDING_SYSTEM = "urn:medvlp:finding"  # finding names as codes (free text findings included)
UCUM = "http://unitsofmeasure.org"
_RAD = {"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "RAD", "display": "Radiology"}
_IMAGING = {
    "system": "http://terminology.hl7.org/CodeSystem/observation-category",
    "code": "imaging",
    "display": "Imaging",
}


def _finding_id(finding: str) -> str:
    return hashlib.sha256(finding.encode()).hexdigest()[:16]


def diagnostic_report(
    predictions: Sequence[Mapping[str, Any]], algorithm: Algorithm, issued: datetime | None = None
) -> dict[str, Any]:
    """The DiagnosticReport of one diagnosis, as JSON.

    Args:
        predictions: ``{"finding", "probability"}`` per finding, as the server answers them.
        algorithm: the model's name and version (the Device).
        issued: when the report was made (default: now, UTC).

    Raises:
        ValueError: no prediction, or a probability outside [0, 1].
    """
    if not predictions:
        raise ValueError("a DiagnosticReport needs at least one prediction")
    when = (issued or datetime.now(UTC)).isoformat(timespec="seconds")
    device = {
        "resourceType": "Device",
        "id": "model",
        "manufacturer": algorithm.manufacturer,
        "deviceName": [{"name": algorithm.name, "type": "model-name"}],
        "version": [{"value": algorithm.version}],
    }
    observations = []
    for k, pred in enumerate(predictions):
        p = float(pred["probability"])
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"probability of {pred['finding']!r} must lie in [0, 1], got {p}")
        name = str(pred["finding"])
        observations.append(
            {
                "resourceType": "Observation",
                "id": f"finding-{k + 1}",
                "status": "preliminary",
                "category": [{"coding": [_IMAGING]}],
                "code": {
                    "coding": [{"system": FINDING_SYSTEM, "code": _finding_id(name), "display": finding_text(name)}],
                    "text": finding_text(name),
                },
                "issued": when,
                "valueQuantity": {"value": round(p, 6), "unit": "probability", "system": UCUM, "code": "1"},
                "device": {"reference": "#model"},
                "method": {"text": "zero-shot vision-language classification (positive vs negative prompts)"},
            }
        )
    return {
        "resourceType": "DiagnosticReport",
        "contained": [device, *observations],
        "status": "preliminary",
        "category": [{"coding": [_RAD]}],
        "code": {"text": f"AI findings: {algorithm.name}"},
        "issued": when,
        "result": [{"reference": f"#{o['id']}", "display": o["code"]["text"]} for o in observations],
        "conclusion": "; ".join(f"{o['code']['text']}: {o['valueQuantity']['value']:.3f}" for o in observations),
    }
