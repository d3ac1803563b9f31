"""Pulling a series over DICOMweb (WADO-RS) from a real Orthanc with its DICOMweb plugin, loaded with storescu."""

from __future__ import annotations

import io
import json
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pydicom
import pytest

from medvlp.serve.dicomweb import ACCEPT, parse_multipart_related

from .conftest import TinyRun
from .helpers import Server, assert_error, free_port, require_tool, reseries, study_file

PLUGIN_DIRS = ("/usr/share/orthanc/plugins", "/usr/lib/orthanc")


@dataclass
class Orthanc:
    http: str  # REST root
    dicomweb: str  # DICOMweb root
    dicom_port: int
    proc: subprocess.Popen[bytes]


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    """Orthanc on free loopback ports with its own storage, started from its own config (no system service)."""
    exe = require_tool("Orthanc", "/usr/sbin/Orthanc")
    plugin = next((d for d in PLUGIN_DIRS if Path(d, "libOrthancDicomWeb.so").exists()), None)
    if plugin is None:
        require_tool("libOrthancDicomWeb.so (orthanc-dicomweb)", "/nonexistent")
    root = tmp_path_factory.mktemp("orthanc")
    http_port, dicom_port = free_port(), free_port()
    config = {
        "Name": "medvlp-test",
        "StorageDirectory": str(root / "db"),
        "IndexDirectory": str(root / "db"),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": "ORTHANC",
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomCheckCalledAet": False,
        "DicomAlwaysAllowStore": True,
        "Plugins": [plugin],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "Host": "127.0.0.1"},
    }
    (root / "config.json").write_text(json.dumps(config))
    log = (root / "orthanc.log").open("wb")
    proc = subprocess.Popen([exe, str(root / "config.json")], stdout=log, stderr=subprocess.STDOUT, cwd=root)
    http = f"http://127.0.0.1:{http_port}"
    deadline = time.monotonic() + 60
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"Orthanc did not start:\n{(root / 'orthanc.log').read_text(errors='replace')}")
        try:
            if httpx.get(f"{http}/system", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.2)
    yield Orthanc(http, f"{http}/dicom-web", dicom_port, proc)
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def _uids(path: Path) -> tuple[str, str]:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)


def _storescu(orthanc: Orthanc, *files: Path) -> None:
    exe = require_tool("storescu")
    cmd = [
        exe,
        "--propose-rle",  # some synthetic radiographs are RLE-compressed: sent as they are
        "-aec",
        "ORTHANC",
        "-aet",
        "MEDVLPTEST",
        "127.0.0.1",
        str(orthanc.dicom_port),
        *map(str, files),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


@pytest.mark.external
def test_diagnose_a_series_pulled_over_dicomweb(orthanc: Orthanc, server: Server, tiny_run: TinyRun) -> None:
    radiograph = study_file(tiny_run.cohort, "S00004")
    _storescu(orthanc, radiograph)
    study, series = _uids(radiograph)
    with server.client() as c:
        pulled = c.post("/v1/diagnose", json={"dicomweb": {"url": orthanc.dicomweb, "study": study, "series": series}})
        whole_study = c.post(
            "/v1/diagnose", json={"dicomweb": {"url": orthanc.dicomweb, "study": study}, "findings": "pneumothorax"}
        )
        uploaded = c.post("/v1/diagnose", files={"file": ("u", radiograph.read_bytes())})
        texts = ["Small left pleural effusion.", "No pleural effusion."]
        scored = c.post("/v1/score", json={"dicomweb": {"url": orthanc.dicomweb, "study": study}, "texts": texts})
        scored_upload = c.post(
            "/v1/score", files={"file": ("u", radiograph.read_bytes())}, data={"texts": json.dumps(texts)}
        )
    assert pulled.status_code == 200, pulled.text
    assert pulled.json()["predictions"] == uploaded.json()["predictions"]  # the same pixels, the same answer
    assert scored.status_code == 200, scored.text
    assert scored.json()["scores"] == scored_upload.json()["scores"] and study not in scored.text
    assert whole_study.status_code == 200, whole_study.text
    assert [p["finding"] for p in whole_study.json()["predictions"]] == ["pneumothorax"]
    assert study not in pulled.text and series not in pulled.text  # UIDs are identifiers: never answered


@pytest.mark.external
def test_dicomweb_failures_are_4xx(orthanc: Orthanc, server: Server, tiny_run: TinyRun, tmp_path: Path) -> None:
    a = study_file(tiny_run.cohort, "S00005")
    b = reseries(a, tmp_path / "second-series.dcm")  # the same study, a second series
    _storescu(orthanc, a, b)
    study, _ = _uids(a)
    with server.client() as c:
        two = c.post("/v1/diagnose", json={"dicomweb": {"url": orthanc.dicomweb, "study": study}})
        assert_error(two, 422, "multiple_series")
        unknown = c.post("/v1/diagnose", json={"dicomweb": {"url": orthanc.dicomweb, "study": "1.2.3.999"}})
        assert_error(unknown, 404, "dicomweb_not_found")
        not_dicomweb = c.post("/v1/diagnose", json={"dicomweb": {"url": f"{orthanc.http}/nothing", "study": study}})
        assert not_dicomweb.status_code in (404, 424)
        assert_error(not_dicomweb, not_dicomweb.status_code)


@pytest.mark.external
def test_multipart_related_parser_on_orthancs_answer(orthanc: Orthanc, tiny_run: TinyRun) -> None:
    radiograph = study_file(tiny_run.cohort, "S00006")
    _storescu(orthanc, radiograph)
    study, series = _uids(radiograph)
    resp = httpx.get(f"{orthanc.dicomweb}/studies/{study}/series/{series}", headers={"Accept": ACCEPT}, timeout=30)
    assert resp.status_code == 200
    parts = parse_multipart_related(resp.content, resp.headers["content-type"])
    assert len(parts) == 1 and parts[0][0]["content-type"].startswith("application/dicom")
    returned, sent = pydicom.dcmread(io.BytesIO(parts[0][1])), pydicom.dcmread(radiograph)
    assert returned.SOPInstanceUID == sent.SOPInstanceUID
    assert returned.PixelData == sent.PixelData  # the instance as stored (Orthanc rewrites only the file meta)


def test_multipart_related_parser_rules() -> None:
    body = (
        b"preamble\r\n--b1\r\nContent-Type: application/dicom\r\n\r\nAAA\r\n--b1 \r\n"
        b"Content-Type: application/dicom\r\n\r\nB\r\n--B\r\n--b1--\r\nepilogue"
    )
    parts = parse_multipart_related(body, 'multipart/related; type="application/dicom"; boundary="b1"')
    assert [c for _, c in parts] == [b"AAA", b"B\r\n--B"]
    with pytest.raises(ValueError, match="truncated"):
        parse_multipart_related(body[:40], "multipart/related; boundary=b1")
    with pytest.raises(ValueError, match="boundary"):
        parse_multipart_related(body, "multipart/related")
    with pytest.raises(ValueError, match="multipart"):
        parse_multipart_related(body, "application/dicom")
