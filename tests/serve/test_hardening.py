"""The attacks of issue 14, each replayed against a real server: bombs refused from their headers (peak RSS growth
of the server under 300 MB), no work before the key, bounded bodies and body time, DICOMweb inputs, echoes, logs.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path

import httpx
import numpy as np
import pytest

from . import bombs
from .conftest import TinyRun
from .helpers import API_KEY, Server, assert_error, start_server

RSS_BUDGET = 300 << 20
HARD_UPLOAD_MB = 8


def rss(pid: int) -> tuple[int, int]:
    """(current, peak) resident set of ``pid`` in bytes (Linux /proc)."""
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("Vm")
    )
    return int(fields["VmRSS"].split()[0]) << 10, int(fields["VmHWM"].split()[0]) << 10


def reset_peak(pid: int) -> int:
    """Reset the peak RSS of ``pid`` (``clear_refs`` 5) and return its current RSS."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    return rss(pid)[0]


@pytest.fixture(scope="module")
def hard(tiny_run: TinyRun, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The 2D model with the default decoded-size limit, an 8 MiB upload limit and a 3 s body deadline."""
    log = tmp_path_factory.mktemp("hard-log") / "server.log"
    srv = start_server(
        tiny_run.run,
        log,
        "--max-upload-mb",
        str(HARD_UPLOAD_MB),
        "--body-timeout",
        "3",
        "--dicomweb-allow",
        "http://127.0.0.1/dicom-web",
        "--dicomweb-timeout",
        "3",
        keys=API_KEY,
    )
    yield srv
    srv.stop()


BOMBS = {
    "rle_65535": bombs.rle_bomb,
    "deflate_16384": bombs.deflate_bomb,
    "png_13000": bombs.png_bomb,
    "nifti_gz_32000": bombs.nifti_bomb,
    "zip_series_56": bombs.series_zip_bomb,
}


@pytest.mark.parametrize("name", sorted(BOMBS))
def test_bombs_are_refused_from_their_headers(hard: Server, name: str) -> None:
    data = BOMBS[name]()
    assert len(data) < HARD_UPLOAD_MB << 20
    base = reset_peak(hard.proc.pid)
    with hard.client() as c:
        resp = c.post("/v1/diagnose", files={"file": ("upload", data)})
    growth = rss(hard.proc.pid)[1] - base
    # a series for a 2D model is refused for its dimensionality, before its 56 slices are decoded
    expected = (422, "wrong_dimensionality") if name == "zip_series_56" else (413, "image_too_large")
    err = assert_error(resp, *expected)
    assert "/tmp" not in err["message"]
    assert growth < RSS_BUDGET, f"{name}: the server's peak RSS grew by {growth >> 20} MiB"


def test_a_series_for_a_3d_model_is_refused_by_its_decoded_size(tmp_path: Path) -> None:
    import io

    from medvlp.data.image import ImageTooLargeError
    from medvlp.data.readers import check_decoded_size, probe_image
    from medvlp.serve.uploads import UploadLimits, save_upload

    folder = save_upload(io.BytesIO(bombs.series_zip_bomb(slices=56, side=2048)), tmp_path, UploadLimits())
    probe = probe_image(folder, 512 << 20)
    assert probe is not None and probe.shape == (2048, 2048, 56) and probe.decoded_bytes == 56 * 2048 * 2048 * 4
    with pytest.raises(ImageTooLargeError, match="896 MiB"):
        check_decoded_size(probe, 512 << 20)


def _raw(server: Server, head: bytes, body: bytes = b"", read: bool = True, timeout: float = 20.0) -> bytes:
    """Send raw bytes on a socket and read what comes back until the server closes or ``timeout``."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(head + body)
        if not read:
            return b""
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
                if b"\r\n\r\n" in out and b'"error"' in out:
                    break
        except (TimeoutError, ConnectionResetError):
            pass
        return out


def test_no_body_is_read_before_the_key_is_checked(hard: Server) -> None:
    size = 60 << 20
    base = reset_peak(hard.proc.pid)
    head = (
        f"POST /v1/retrieve HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {size}\r\n\r\n"
    ).encode()
    answer = _raw(hard, head, b'{"text": "' + b"a" * (1 << 20))  # a first megabyte; the rest never needs sending
    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
    # with a key, a JSON body is capped at kilobytes: 413 from its Content-Length, and while it streams without one
    auth = f"Authorization: Bearer {API_KEY}\r\n".encode()
    answer = _raw(hard, head.replace(b"Host: x\r\n", b"Host: x\r\n" + auth), b'{"text": "')
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    chunked = b"POST /v1/retrieve HTTP/1.1\r\nHost: x\r\n" + auth
    chunked += b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    body = b"".join(b"%x\r\n" % (64 << 10) + b"a" * (64 << 10) + b"\r\n" for _ in range(8))
    answer = _raw(hard, chunked, body)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert rss(hard.proc.pid)[1] - base < 32 << 20
    with hard.client() as c:
        assert c.get("/v1/health").status_code == 200


def test_a_trickling_body_gets_a_408(hard: Server) -> None:
    host, port = hard.url.removeprefix("http://").split(":")
    head = (
        f"POST /v1/embed HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
        "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
    ).encode()
    out = b""
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(head)
        s.setblocking(False)
        for k in range(30):  # one byte a second, for at most 30 s: the server's deadline is 3 s
            try:
                s.sendall(b"{"[: 1 if k == 0 else 0] or b" ")
            except OSError:
                break
            time.sleep(1.0)
            try:
                out += s.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                break
            if b'"error"' in out:
                break
    assert out.startswith(b"HTTP/1.1 408"), out[:300]
    assert b'"request_timeout"' in out


def test_a_disconnect_mid_upload_is_one_info_line(hard: Server) -> None:
    before = hard.log_text()
    head = (
        f"POST /v1/diagnose HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
        "Content-Type: multipart/form-data; boundary=xyz\r\nContent-Length: 3000000\r\n\r\n"
    ).encode()
    part = b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="u"\r\n\r\n' + b"\0" * 100_000
    _raw(hard, head, part, read=False)  # and the socket closes, 100 KB into a 3 MB upload
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and "client disconnected" not in hard.log_text()[len(before) :]:
        time.sleep(0.1)
    new = hard.log_text()[len(before) :]
    lines = [line for line in new.splitlines() if line.strip()]
    assert len(lines) == 1, new
    assert "INFO" in lines[0] and "/v1/diagnose 499" in lines[0] and "client disconnected" in lines[0], lines
    assert "Traceback" not in new and "ERROR" not in new


def test_an_unexpected_error_is_one_500_line_with_its_status(caplog: pytest.LogCaptureFixture) -> None:
    import asyncio

    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.routing import Route

    from medvlp.serve.middleware import RequestLog

    async def boom(request: object) -> None:
        raise RuntimeError("secret " + "^".join(["DOE", "JANE"]) + " in the message")  # not in the frames' source

    app = Starlette(routes=[Route("/v1/boom", boom)], middleware=[Middleware(RequestLog)])  # as create_app adds it

    async def call() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return await c.get("/v1/boom")

    with caplog.at_level("INFO"):
        resp = asyncio.run(call())
    assert_error(resp, 500, "internal_error")
    access = [r for r in caplog.records if r.name == "medvlp.serve.access"]
    assert len(access) == 1 and " 500 " in access[0].getMessage()
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "RuntimeError" in errors[0].getMessage()
    assert "DOE^JANE" not in caplog.text


@pytest.fixture()
def trickling_pacs() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), bombs.TricklingPacs)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/dicom-web"
    httpd.shutdown()
    httpd.server_close()


def test_dicomweb_inputs(hard: Server, trickling_pacs: str) -> None:
    def pull(url: str, study: str = "1.2.3", series: str | None = None) -> httpx.Response:
        body = {"dicomweb": {"url": url, "study": study, **({"series": series} if series else {})}}
        return c.post("/v1/diagnose", json=body)

    with hard.client(timeout=60) as c:
        assert_error(pull(trickling_pacs, study="1.2.3\n"), 422, "validation_error")
        assert_error(pull(trickling_pacs, series="1.2.3\n"), 422, "validation_error")
        assert_error(pull(trickling_pacs + "\n"), 403, "dicomweb_not_allowed")
        assert_error(pull("http://127.0.0.1:1/dicom-web/%2e%2e/admin"), 403, "dicomweb_not_allowed")
        assert_error(pull("http://127.0.0.1:1/dicom-web/%252e%252e/admin"), 403, "dicomweb_not_allowed")
        assert_error(pull("http://[::1"), 403, "dicomweb_not_allowed")
        # one deadline (3 s) for the whole pull: a PACS trickling a byte every 0.5 s is cut off, not waited for
        err = assert_error(pull(trickling_pacs), 424, "dicomweb_unreachable")
        assert "within 3 s" in err["message"]
    log = hard.log_text()
    assert "Traceback" not in log and " 500 " not in log


def test_only_standard_terms_are_echoed(hard: Server) -> None:
    with hard.client() as c:
        ok = c.post("/v1/diagnose", files={"file": ("u", bombs.dicom_with(modality="MRN-123456"))})
        assert ok.status_code == 200, ok.text
        assert ok.json()["image"]["modality"] == "other"
        ok = c.post("/v1/diagnose", files={"file": ("u", bombs.dicom_with(modality="CR"))})
        assert (
            ok.json()["image"]["modality"] == "CR" and ok.json()["image"]["photometric_interpretation"] == "MONOCHROME2"
        )
        bad = c.post("/v1/diagnose", files={"file": ("u", bombs.dicom_with(photometric="DOE^JANE"))})
    if bad.status_code == 200:
        assert bad.json()["image"]["photometric_interpretation"] == "other"
    else:
        err = assert_error(bad, 422)
        assert "DOE" not in err["message"] and "JANE" not in err["message"]
    assert "MRN-123456" not in hard.log_text() and "DOE^JANE" not in hard.log_text()


def test_a_prepared_job_holds_the_model_size_only(tiny_run: TinyRun, tmp_path: Path) -> None:
    import io

    from medvlp.serve.server import load_service
    from medvlp.serve.service import ImageJob
    from medvlp.serve.uploads import UploadLimits, save_upload

    from .helpers import png_bytes

    service = load_service(tiny_run.run, device="cpu", corpus=False)
    path = save_upload(io.BytesIO(png_bytes((1500, 1200))), tmp_path, UploadLimits())
    job = ImageJob(path, tmp_path)
    job.prepared = service.prepare(job)
    assert job.prepared.pre.array.shape == (1, *service.size)
    assert job.prepared.info["shape"] == [1200, 1500]  # the source's facts, not its pixels
    held = sum(v.nbytes for v in vars(job.prepared.pre).values() if isinstance(v, np.ndarray))
    assert held < 4 * int(np.prod(service.size)) * 4 + 1024
    assert service.run_images([job])[0]["image"]["shape"] == [1200, 1500]
