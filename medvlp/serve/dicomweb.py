"""Pull a series from a DICOMweb server with WADO-RS (``multipart/related; type="application/dicom"``).

Only servers on the allow-list are contacted (``--dicomweb-allow``): the URL comes from the client, and a server
that fetched any URL it was given would let a client reach hosts it cannot reach itself. An allow-list entry is a
base URL; a request URL is allowed when its scheme and host equal the entry's, its port too when the entry names
one, and its path starts with the entry's path. A URL with user info (``http://a@b/``) is never allowed, nor one whose
path, percent-decoded (repeatedly), holds a ``.`` or ``..`` segment, a backslash or a control character: a server
that decodes ``%2e%2e`` itself would otherwise be led outside the allowed path.

The whole pull (connect, answer, every byte of the body) runs under one deadline, ``timeout`` seconds.
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

import httpx

from medvlp.serve.errors import ApiError
from medvlp.serve.uploads import UploadLimits

logger = logging.getLogger(__name__)

__all__ = ["DicomWebConfig", "fetch_series", "is_allowed", "parse_multipart_related"]

UID = re.compile(r"[0-9]+(\.[0-9]+)*")  # used with fullmatch: `$` would accept a trailing newline
ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
_DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True)
class DicomWebConfig:
    """Allowed DICOMweb servers and how long to wait for them (seconds)."""

    allow: tuple[str, ...] = ()
    timeout: float = 30.0


def _port(url: httpx.URL) -> int | None:
    return url.port or _DEFAULT_PORTS.get(url.scheme)


def _clean_path(raw: str) -> str | None:
    """The path percent-decoded until stable, or None when it holds dot segments, backslashes or control chars."""
    path = raw
    for _ in range(5):
        decoded = unquote(path)
        if decoded == path:
            break
        path = decoded
    else:
        return None  # still encoded after five rounds: no honest client does that
    if "\\" in path or any(ord(c) < 32 or ord(c) == 127 for c in path):
        return None
    if any(seg in (".", "..") for seg in path.split("/")):
        return None
    return path


def is_allowed(url: str, allow: tuple[str, ...]) -> bool:
    """Whether ``url`` falls under one of the allow-list's base URLs (see the module docstring)."""
    if not isinstance(url, str) or any(ord(c) < 32 or ord(c) == 127 for c in url):
        return False
    try:
        u = httpx.URL(url)
    except (httpx.InvalidURL, TypeError, ValueError):
        return False
    if u.scheme not in ("http", "https") or not u.host or u.userinfo:
        return False
    path = _clean_path(u.raw_path.decode("ascii", "replace").split("?", 1)[0])
    if path is None or u.query or u.fragment:
        return False
    for entry in allow:
        e = httpx.URL(entry)
        if e.scheme != u.scheme or e.host != u.host:
            continue
        if e.port is not None and _port(e) != _port(u):
            continue
        base = e.path.rstrip("/")
        if path == base or path.startswith(base + "/") or not base:
            return True
    return False


def _boundary(content_type: str) -> bytes:
    m = re.search(r'boundary=(?:"([^"]+)"|([^;\s]+))', content_type, re.IGNORECASE)
    if not m:
        raise ValueError("multipart answer without a boundary")
    return (m.group(1) or m.group(2)).encode("latin-1")


def parse_multipart_related(body: bytes, content_type: str) -> list[tuple[dict[str, str], bytes]]:
    """Split a ``multipart/related`` body (RFC 2387 / RFC 2046) into its parts.

    Returns:
        ``(headers, content)`` per part, header names lower-cased.

    Raises:
        ValueError: not multipart, no boundary, or no closing delimiter.
    """
    if not content_type.lower().startswith("multipart/"):
        raise ValueError(f"expected a multipart answer, got {content_type.split(';')[0]!r}")
    delim = b"--" + _boundary(content_type)
    parts: list[tuple[dict[str, str], bytes]] = []
    pos = body.find(delim)
    if pos < 0:
        raise ValueError("multipart answer without its boundary")
    while True:
        pos += len(delim)
        if body[pos : pos + 2] == b"--":  # the closing delimiter
            return parts
        nxt = body.find(b"\r\n" + delim, pos)
        if nxt < 0:
            raise ValueError("multipart answer is truncated (no closing boundary)")
        part = body[pos:nxt].lstrip(b" \t")  # transport padding may follow a delimiter
        if not part.startswith(b"\r\n"):
            raise ValueError("malformed multipart delimiter line")
        part = part[2:]
        if part.startswith(b"\r\n"):  # a part without headers
            head, content = b"", part[2:]
        else:
            head, sep, content = part.partition(b"\r\n\r\n")
            if not sep:
                raise ValueError("multipart part without the blank line after its headers")
        headers = {}
        for line in head.decode("latin-1").split("\r\n"):
            name, colon, value = line.partition(":")
            if colon:
                headers[name.strip().lower()] = value.strip()
        parts.append((headers, content))
        pos = nxt + 2


async def _pull(target: str, limits: UploadLimits) -> tuple[bytearray, str]:
    """GET ``target`` into memory (at most ``limits.max_bytes``); the body and its content type."""
    body = bytearray()
    async with (
        httpx.AsyncClient(timeout=None, follow_redirects=False) as client,  # the caller's deadline covers it all
        client.stream("GET", target, headers={"Accept": ACCEPT}) as resp,
    ):
        if resp.status_code == 404:
            raise ApiError(404, "dicomweb_not_found", "the DICOMweb server has no such study or series")
        if resp.status_code >= 300:
            raise ApiError(424, "dicomweb_failed", f"the DICOMweb server answered HTTP {resp.status_code}")
        ctype = resp.headers.get("content-type", "")
        async for chunk in resp.aiter_bytes():
            body += chunk
            if len(body) > limits.max_bytes:
                raise ApiError(
                    413, "payload_too_large", f"the series is larger than the limit of {limits.max_bytes >> 20} MiB"
                )
    return body, ctype


async def fetch_series(
    url: str, study: str, series: str | None, dest: Path, config: DicomWebConfig, limits: UploadLimits
) -> Path:
    """Retrieve a series (or a whole study when ``series`` is None) into ``dest``, one file per instance.

    Raises:
        ApiError: 403 not allowed, 422 bad UID, 404 unknown study/series, 413 too large, 424 unreachable or a
            malformed answer.
    """
    if not is_allowed(url, config.allow):
        hint = "no DICOMweb server is allowed" if not config.allow else "the server is not on the allow-list"
        raise ApiError(403, "dicomweb_not_allowed", f"{hint} (start the server with --dicomweb-allow URL)")
    for name, uid in (("study", study), ("series", series)):
        if uid is not None and (len(uid) > 64 or not UID.fullmatch(uid)):
            raise ApiError(422, "validation_error", f"dicomweb.{name}: not a DICOM UID (digits and dots, <= 64)")
    target = f"{url.rstrip('/')}/studies/{study}" + (f"/series/{series}" if series else "")
    try:
        async with asyncio.timeout(config.timeout):  # one deadline for the whole pull, not per read
            body, ctype = await _pull(target, limits)
    except TimeoutError as exc:
        raise ApiError(
            424, "dicomweb_unreachable", f"the DICOMweb server did not answer within {config.timeout:g} s"
        ) from exc
    except httpx.InvalidURL as exc:
        raise ApiError(422, "validation_error", "dicomweb.url: not a valid URL") from exc
    except httpx.HTTPError as exc:
        raise ApiError(424, "dicomweb_unreachable", f"cannot reach the DICOMweb server ({type(exc).__name__})") from exc
    try:
        parts = parse_multipart_related(bytes(body), ctype)
    except ValueError as exc:
        raise ApiError(424, "dicomweb_failed", f"the DICOMweb answer is not valid WADO-RS: {exc}") from exc
    instances = [c for h, c in parts if h.get("content-type", "application/dicom").startswith("application/dicom")]
    if not instances:
        raise ApiError(404, "dicomweb_not_found", "the DICOMweb server returned no DICOM instance")
    if len(instances) > limits.max_members:
        raise ApiError(
            413, "payload_too_large", f"the series has {len(instances)} instances (limit {limits.max_members})"
        )
    dest.mkdir(parents=True, exist_ok=True)
    for k, data in enumerate(instances):
        (dest / f"{k:06d}").write_bytes(data)
    logger.info("dicomweb: %d instance(s), %d bytes", len(instances), len(body))
    return dest
