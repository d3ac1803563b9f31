"""/v1/diagnose for a hospital: the SR stored back to a real Orthanc ("store": true) and FHIR answers."""

from __future__ import annotations

import io
from pathlib import Path

import httpx
import pydicom
import pytest

from medvlp.hospital.sr import sr_findings
from medvlp.serve.dicomweb import ACCEPT, parse_multipart_related
from medvlp.tasks.zeroshot import finding_text

from . import test_dicomweb as dicomweb_tests
from .conftest import TinyRun
from .helpers import PHI, PHI_UIDS, Server, assert_error, require_module, study_file, with_phi

orthanc = dicomweb_tests.orthanc  # the real Orthanc of the DICOMweb tests, started for this module


@pytest.mark.external
def test_store_the_sr_in_orthanc(
    orthanc: dicomweb_tests.Orthanc, server: Server, tiny_run: TinyRun, tmp_path: Path
) -> None:
    source = with_phi(study_file(tiny_run.cohort, "S00007"), tmp_path / "phi.dcm")
    dicomweb_tests._storescu(orthanc, source)
    study, series = PHI_UIDS["StudyInstanceUID"], PHI_UIDS["SeriesInstanceUID"]
    body = {"dicomweb": {"url": orthanc.dicomweb, "study": study, "series": series}, "store": True}
    with server.client() as c:
        resp = c.post("/v1/diagnose", json=body)
        plain = c.post("/v1/diagnose", json={**body, "store": False})
    assert resp.status_code == 200, resp.text
    answer = resp.json()
    stored = answer["stored"]
    assert "stored" not in plain.json() and plain.json()["predictions"] == answer["predictions"]
    assert all("peak" not in p for p in answer["predictions"])
    assert not [v for v in (*PHI.values(), study, series) if v in resp.text]

    # the PACS has it: query it, fetch it, read it back
    found = httpx.get(f"{orthanc.dicomweb}/studies/{study}/instances", params={"Modality": "SR"}, timeout=30).json()
    assert [i["00080018"]["Value"][0] for i in found] == [stored["sop_instance_uid"]]
    url = f"{orthanc.dicomweb}/studies/{study}/series/{stored['series_instance_uid']}"
    got = httpx.get(f"{url}/instances/{stored['sop_instance_uid']}", headers={"Accept": ACCEPT}, timeout=30)
    ((_, data),) = parse_multipart_related(got.content, got.headers["content-type"])
    sr = pydicom.dcmread(io.BytesIO(data))
    assert sr.PatientID == PHI["PatientID"] and sr.StudyInstanceUID == study  # filed beside the images
    back = sr_findings(sr)
    for pred in answer["predictions"]:
        entry = back[finding_text(pred["finding"])]
        assert entry["probability"] == pytest.approx(pred["probability"], abs=1e-6)
        assert entry["point"] is not None  # a radiograph: the grounding peak as a point
    log = server.log_text()
    assert not [v for v in (*PHI.values(), *PHI_UIDS.values()) if v in log]


def test_store_refusals(server: Server, tiny_run: TinyRun) -> None:
    radiograph = study_file(tiny_run.cohort, "S00008")
    with server.client() as c:
        elsewhere = {"url": "http://10.9.9.9/dicom-web", "study": "1.2"}
        far = c.post("/v1/diagnose", json={"dicomweb": elsewhere, "store": True})
        assert_error(far, 403, "dicomweb_not_allowed")
        upload = c.post("/v1/diagnose", files={"file": ("u", radiograph.read_bytes())}, data={"store": "true"})
        assert_error(upload, 422, "validation_error")  # an upload has no PACS to go back to


def test_fhir_diagnostic_report(server: Server, tiny_run: TinyRun, tmp_path: Path) -> None:
    r4b = require_module("fhir.resources.R4B.diagnosticreport")
    obs_model = require_module("fhir.resources.R4B.observation")
    radiograph = with_phi(study_file(tiny_run.cohort, "S00009"), tmp_path / "fhir-phi.dcm")
    with server.client() as c:
        plain = c.post("/v1/diagnose", files={"file": ("u", radiograph.read_bytes())})
        fhir = c.post("/v1/diagnose", params={"format": "fhir"}, files={"file": ("u", radiograph.read_bytes())})
        accept = c.post(
            "/v1/diagnose",
            headers={"Accept": "application/fhir+json"},
            files={"file": ("u", radiograph.read_bytes())},
        )
        bad = c.post("/v1/diagnose", params={"format": "hl7v2"}, files={"file": ("u", radiograph.read_bytes())})
    assert fhir.status_code == 200, fhir.text
    assert fhir.headers["content-type"].startswith("application/fhir+json")
    assert_error(bad, 422, "validation_error")
    report = r4b.DiagnosticReport.model_validate(fhir.json())
    assert report.status == "preliminary" and report.subject is None
    observations = {o.id: o for o in report.contained if o.get_resource_type() == "Observation"}
    devices = [d for d in report.contained if d.get_resource_type() == "Device"]
    assert len(devices) == 1 and devices[0].version[0].value
    assert [r.reference for r in report.result] == [f"#{k}" for k in observations]
    want = {finding_text(p["finding"]): p["probability"] for p in plain.json()["predictions"]}
    got = {}
    for o in observations.values():
        o = obs_model.Observation.model_validate(o.model_dump())
        assert o.device.reference == "#model" and o.valueQuantity.code == "1"
        got[o.code.text] = float(o.valueQuantity.value)
    assert got == pytest.approx(want, abs=1e-6)
    assert accept.json()["result"] == fhir.json()["result"]
    assert not [v for v in (*PHI.values(), *PHI_UIDS.values()) if v in fhir.text]
