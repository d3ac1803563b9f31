"""Bad input never gives a 5xx: each case is a 4xx in the one error shape ``{"error": {"code", "message"}}``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from .conftest import TinyRun
from .helpers import (
    MAX_UPLOAD_MB,
    Server,
    assert_error,
    free_port,
    pydicom_file,
    reseries,
    study_file,
    zip_bytes,
)


def _upload(c: httpx.Client, data: bytes, path: str = "/v1/diagnose", **fields: str) -> httpx.Response:
    return c.post(path, files={"file": ("upload", data)}, data=fields)


@pytest.mark.parametrize(
    ("name", "status", "code", "fragment"),
    [
        ("MR_truncated.dcm", 422, "unreadable_image", "truncated"),
        # 10 frames: refused for its dimensionality from the headers, before its (truncated) pixels are decoded
        ("emri_small_jpeg_2k_lossless_too_short.dcm", 422, "wrong_dimensionality", "3D image"),
        ("README.txt", 422, "unreadable_image", "not a DICOM file"),
        ("test-SR.dcm", 422, "unreadable_image", "not an image"),
        ("DICOMDIR", 422, "unreadable_image", "DICOMDIR"),
        ("emri_small.dcm", 422, "wrong_dimensionality", "3D image"),  # 10 frames: a volume for a 2D model
    ],
)
def test_bad_real_files(server: Server, name: str, status: int, code: str, fragment: str) -> None:
    with server.client() as c:
        err = assert_error(_upload(c, pydicom_file(name).read_bytes()), status, code)
    assert fragment in err["message"]
    assert "/tmp" not in err["message"]  # the server's paths stay inside


def test_empty_and_oversized_uploads(server: Server) -> None:
    big = b"\0" * ((MAX_UPLOAD_MB << 20) + (2 << 20))
    with server.client() as c:
        assert_error(_upload(c, b""), 400, "empty_upload")
        assert_error(_upload(c, big), 413, "payload_too_large")  # refused from Content-Length

        def chunks() -> Iterator[bytes]:  # no Content-Length: refused while it streams in
            yield b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="u"\r\n\r\n'
            for _ in range(MAX_UPLOAD_MB + 2):
                yield b"\0" * (1 << 20)
            yield b"\r\n--xyz--\r\n"

        headers = {"Content-Type": "multipart/form-data; boundary=xyz"}
        try:
            resp = c.post("/v1/diagnose", content=chunks(), headers=headers)
        except (httpx.WriteError, httpx.RemoteProtocolError, httpx.ReadError):
            pass  # the server may close the socket before the client is done sending: refused all the same
        else:
            assert_error(resp, 413, "payload_too_large")
        assert c.get("/v1/health").status_code == 200


def test_zips(server: Server, tiny_run: TinyRun, tmp_path: Path) -> None:
    one = study_file(tiny_run.cohort, "S00001")
    other = reseries(study_file(tiny_run.cohort, "S00002"), tmp_path / "b.dcm")
    series = tmp_path / "ct"
    from medvlp.data.synthetic import synthesize

    ct = synthesize("ct", 1, series, seed=3).parent / "images"
    ct_files = {f"ct/{p.name}": p.read_bytes() for p in next(ct.iterdir()).iterdir()}
    with server.client() as c:
        assert _upload(c, zip_bytes({"study/a.dcm": one.read_bytes()})).status_code == 200
        err = assert_error(_upload(c, zip_bytes({"a.dcm": one.read_bytes(), "b.dcm": other.read_bytes()})), 422)
        assert err["code"] == "multiple_series" and "2 DICOM series" in err["message"]
        assert_error(_upload(c, zip_bytes(ct_files)), 422, "wrong_dimensionality")  # a CT series for a 2D model
        assert_error(_upload(c, zip_bytes({})), 422, "unreadable_image")
        assert_error(_upload(c, b"PK\x03\x04 this is no zip"), 422, "unreadable_image")
        assert_error(_upload(c, zip_bytes({"../../etc/x.dcm": b"not dicom"})), 422, "unreadable_image")


def test_bad_requests(server: Server, tiny_run: TinyRun) -> None:
    good = study_file(tiny_run.cohort).read_bytes()
    with server.client() as c:
        no_file = c.post("/v1/diagnose", files={"findings": (None, "x")})  # multipart without the file
        assert_error(no_file, 422, "validation_error")
        assert_error(c.post("/v1/diagnose", data={"findings": "x"}), 415, "unsupported_media_type")
        assert_error(c.post("/v1/diagnose", files={"other": ("u", good)}), 422, "validation_error")
        assert_error(c.post("/v1/diagnose", content=b"raw", headers={"Content-Type": "image/png"}), 415)
        assert_error(_upload(c, good, top_k="many"), 422, "validation_error")
        assert_error(_upload(c, good, top_k="51"), 422, "validation_error")
        assert_error(_upload(c, good, heatmaps="perhaps"), 422, "validation_error")
        assert_error(_upload(c, good, findings=",".join(f"f{i}" for i in range(40))), 422, "validation_error")
        assert_error(_upload(c, good, findings="x" * 500), 422, "validation_error")
        assert_error(_upload(c, good, findings="bad\x01name"), 422, "validation_error")
        assert_error(_upload(c, good, colour="blue"), 422, "validation_error")
        assert_error(_upload(c, good, path="/v1/embed", findings="a"), 422, "validation_error")
        assert_error(c.post("/v1/diagnose", content=b"{not json", headers={"Content-Type": "application/json"}), 422)
        assert_error(c.post("/v1/diagnose", json={"findings": ["a"]}), 422, "validation_error")  # no source
        assert_error(c.post("/v1/embed", json={"texts": []}), 422, "validation_error")
        assert_error(c.post("/v1/embed", json={"texts": ["  "]}), 422, "validation_error")
        assert_error(c.post("/v1/retrieve", json={"text": "x", "k": 0}), 422, "validation_error")
        assert_error(c.post("/v1/retrieve", json={"text": "x", "against": "pixels"}), 422, "validation_error")
        assert_error(c.post("/v1/retrieve", content=b"[]", headers={"Content-Type": "application/json"}), 422)
        assert_error(c.get("/v1/nothing-here"), 404, "not_found")
        assert_error(c.get("/v1/diagnose"), 405, "method_not_allowed")
        assert_error(c.get("/static/absent.js"), 404, "not_found")


def test_dicomweb_refusals_without_a_pacs(server: Server) -> None:
    closed = f"http://127.0.0.1:{free_port()}/dicom-web"  # allowed host, nothing listening: an unreachable PACS
    study = "1.2.3.4"
    with server.client() as c:
        assert_error(c.post("/v1/diagnose", json={"dicomweb": {"url": closed, "study": study}}), 424)
        for url in ("http://pacs.invalid/dicom-web", "http://127.0.0.1@pacs.invalid/", "file:///etc/passwd"):
            resp = c.post("/v1/diagnose", json={"dicomweb": {"url": url, "study": study}})
            assert_error(resp, 403, "dicomweb_not_allowed")
        resp = c.post("/v1/diagnose", json={"dicomweb": {"url": closed, "study": "1.2/../../x"}})
        assert_error(resp, 422, "validation_error")
