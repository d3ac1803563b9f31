"""Replay the attack set of issue 14 against a live `medvlp serve` and measure what each attack costs the server.

    python benchmarks/bench_attack.py [--model RUN] [--disconnects 50] [--out benchmarks/results/attack.json]

One real `medvlp serve` process (uvicorn) on a free loopback port (127.0.0.1 only), with an 8 MiB upload limit,
the default 512 MiB decoded-size limit, a 3 s body deadline and a 3 s DICOMweb deadline. Without `--model` it
serves the demo's 2D architecture untrained (as `bench_serve.py` does: the same cost as trained weights). Each case
runs once (the disconnect case `--disconnects` times, bounded); before it the server's peak RSS is reset
(`/proc/PID/clear_refs`), after it the peak growth is read (`VmHWM` - `VmRSS` before). The hostile inputs are
built here before the clock starts, small on the wire (`tests/serve/bombs.py`); a case's time is what the client
waits for the server's answer. A trickling DICOMweb server runs in this process, on
loopback. Prints a table (case, status, RSS growth, time) and writes JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from bench_serve import KEY, _demo_model, _start  # noqa: E402

from tests.serve import bombs  # noqa: E402

LIMITS = ["--max-upload-mb", "8", "--body-timeout", "3", "--dicomweb-timeout", "3"]


def _rss(pid: int) -> tuple[int, int]:
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("Vm")
    )
    return int(fields["VmRSS"].split()[0]) << 10, int(fields["VmHWM"].split()[0]) << 10


def _raw(port: int, data: bytes, wait: float = 15.0, trickle: bytes = b"", close_early: bool = False) -> bytes:
    """Send ``data`` (then ``trickle`` a byte a second) on a socket; the answer's first bytes."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as s:
        with contextlib.suppress(OSError):
            s.sendall(data)
        if close_early:
            return b""
        out = b""
        deadline = time.monotonic() + wait
        s.settimeout(1.0)
        for byte in [trickle[i : i + 1] for i in range(len(trickle))] or [b""]:
            if byte:
                try:
                    s.sendall(byte)
                except OSError:
                    break
            with contextlib.suppress(TimeoutError, OSError):
                out += s.recv(65536)
            if b"\r\n\r\n" in out or time.monotonic() > deadline:
                break
        while b"\r\n\r\n" not in out and time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            if not chunk:
                break
            out += chunk
        return out


def _status(answer: bytes) -> int:
    try:
        return int(answer.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return 0


def _cases(port: int, pacs: str, disconnects: int) -> dict[str, Callable[[], Any]]:
    import httpx

    base = f"http://127.0.0.1:{port}"
    auth = {"Authorization": f"Bearer {KEY}"}

    def upload(data: bytes) -> int:
        return httpx.post(f"{base}/v1/diagnose", headers=auth, files={"file": ("u", data)}, timeout=60).status_code

    def json_head(size: int, key: bool) -> bytes:
        a = f"Authorization: Bearer {KEY}\r\n" if key else ""
        return (
            f"POST /v1/retrieve HTTP/1.1\r\nHost: x\r\n{a}Content-Type: application/json\r\n"
            f"Content-Length: {size}\r\n\r\n"
        ).encode()

    def pull(url: str, study: str = "1.2.3") -> int:
        body = {"dicomweb": {"url": url, "study": study}}
        return httpx.post(f"{base}/v1/diagnose", headers=auth, json=body, timeout=60).status_code

    def chunked_json() -> int:
        head = f"POST /v1/retrieve HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n".encode()
        head += b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        body = b"".join(b"%x\r\n" % (64 << 10) + b"a" * (64 << 10) + b"\r\n" for _ in range(16))
        return _status(_raw(port, head + body))

    def disconnect() -> int:
        head = (
            f"POST /v1/diagnose HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            "Content-Type: multipart/form-data; boundary=xyz\r\nContent-Length: 3000000\r\n\r\n"
        ).encode()
        part = b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="u"\r\n\r\n' + bytes(100_000)
        for _ in range(disconnects):
            _raw(port, head + part, close_early=True)
        time.sleep(1.0)
        return 499

    def trickle() -> int:
        head = (
            f"POST /v1/embed HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"
        ).encode()
        return _status(_raw(port, head, wait=20, trickle=b" " * 20))

    def echo() -> str:
        r = httpx.post(f"{base}/v1/diagnose", headers=auth, files={"file": ("u", bombs.dicom_with("MRN-123456"))})
        return f"{r.status_code} modality={r.json()['image']['modality']}"

    def photometric() -> str:
        r = httpx.post(f"{base}/v1/diagnose", headers=auth, files={"file": ("u", bombs.dicom_with(None, "DOE^JANE"))})
        return f"{r.status_code} {'echoed' if 'DOE' in r.text else 'not echoed'}"

    built = {  # built before the clock starts: a case's time is the server's answer alone
        "rle": bombs.rle_bomb(),
        "deflate": bombs.deflate_bomb(),
        "png": bombs.png_bomb(),
        "nifti": bombs.nifti_bomb(),
        "zip": bombs.series_zip_bomb(),
    }
    return {
        "60 MB JSON, no key": lambda: _status(_raw(port, json_head(60 << 20, False) + b'{"text": "' + bytes(1 << 20))),
        "60 MB JSON (Content-Length), key": lambda: _status(_raw(port, json_head(60 << 20, True) + b"{")),
        "1 MB JSON chunked, key": chunked_json,
        "RLE DICOM 65535^2 (1.9 KB)": lambda: upload(built["rle"]),
        "Deflate DICOM 16384^2 (0.5 MB)": lambda: upload(built["deflate"]),
        "PNG 13000^2 (0.7 MB)": lambda: upload(built["png"]),
        "NIfTI.gz 32000^2 (1 KB)": lambda: upload(built["nifti"]),
        "zip: 56-slice series, 896 MiB decoded": lambda: upload(built["zip"]),
        "body at 1 byte/s": trickle,
        f"{disconnects} disconnects mid-upload": disconnect,
        "DICOMweb UID + newline": lambda: pull(pacs, "1.2.3\n"),
        "DICOMweb URL %2e%2e": lambda: pull("http://127.0.0.1:1/dicom-web/%2e%2e/admin"),
        "DICOMweb PACS trickling 2 B/s": lambda: pull(pacs),
        "Modality 'MRN-123456'": echo,
        "PhotometricInterpretation 'DOE^JANE'": photometric,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--disconnects", type=int, default=50)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "attack.json")
    args = parser.parse_args()
    import httpx

    tmp = Path(tempfile.mkdtemp(prefix="bench-attack-"))
    model = args.model or _demo_model(tmp / "model")
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), bombs.TricklingPacs)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    pacs = f"http://127.0.0.1:{httpd.server_address[1]}/dicom-web"
    log = tmp / "server.log"
    proc, url = _start(model, log, [*LIMITS, "--dicomweb-allow", pacs])
    port = int(url.rsplit(":", 1)[1])
    rows: list[dict[str, Any]] = []
    try:
        for name, case in _cases(port, pacs, args.disconnects).items():
            Path(f"/proc/{proc.pid}/clear_refs").write_text("5")
            before = _rss(proc.pid)[0]
            log_before = log.stat().st_size
            t0 = time.perf_counter()
            status = case()
            seconds = time.perf_counter() - t0
            t1 = time.perf_counter()
            health = httpx.get(f"{url}/v1/health", timeout=30).status_code
            rows.append(
                {
                    "case": name,
                    "status": status,
                    "rss_growth_mb": round((_rss(proc.pid)[1] - before) / (1 << 20), 1),
                    "seconds": round(seconds, 2),
                    "health_after_ms": round((time.perf_counter() - t1) * 1000, 1) if health == 200 else None,
                    "log_bytes": log.stat().st_size - log_before,
                }
            )
            r = rows[-1]
            print(f"{name:42s} {r['status']!s:>26s} {r['rss_growth_mb']:8.1f} MB {r['seconds']:7.2f} s", flush=True)
        text = log.read_text(errors="replace")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        httpd.shutdown()
    header = "| case | status | server peak RSS growth | time | log bytes |\n|---|---|---|---|---|"
    print("\n" + header)
    for r in rows:
        print(f"| {r['case']} | {r['status']} | {r['rss_growth_mb']} MB | {r['seconds']} s | {r['log_bytes']} |")
    out = {
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "server_flags": LIMITS,
        "model": "given" if args.model else "demo-2d architecture, untrained",
        "rows": rows,
        "log_tracebacks": text.count("Traceback"),
        "log_status_0": text.count(" 0 "),
        "max_rss_growth_mb": max(r["rss_growth_mb"] for r in rows),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nmax RSS growth {out['max_rss_growth_mb']} MB; tracebacks in the log: {out['log_tracebacks']}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
