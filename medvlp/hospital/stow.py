"""Store DICOM instances on a DICOMweb server with STOW-RS (PS3.18 10.5): one ``multipart/related`` POST.

Only servers on the serving allow-list are written to (:func:`medvlp.serve.dicomweb.is_allowed`), for the same
reason they are the only ones read from.
"""

from __future__ import annotations

import io
import logging
import secrets

import httpx
from pydicom.dataset import Dataset

from medvlp.serve.dicomweb import DicomWebConfig, is_allowed
from medvlp.serve.errors import ApiError

logger = logging.getLogger(__name__)

__all__ = ["dicom_bytes", "stow_instances"]


def dicom_bytes(ds: Dataset) -> bytes:
    """A dataset as a DICOM Part 10 file (with its file meta)."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _body(instances: list[bytes]) -> tuple[bytes, str]:
    boundary = f"medvlp-{secrets.token_hex(16)}"
    parts = [f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + data + b"\r\n" for data in instances]
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, f'multipart/related; type="application/dicom"; boundary="{boundary}"'


async def stow_instances(url: str, study: str, instances: list[Dataset], config: DicomWebConfig) -> None:
    """POST ``instances`` to ``{url}/studies/{study}``.

    Raises:
        ApiError: 403 not allowed, 424 unreachable or refused (HTTP status, or a failed SOP in the answer).
    """
    if not is_allowed(url, config.allow):
        raise ApiError(403, "dicomweb_not_allowed", "the server is not on the allow-list (--dicomweb-allow URL)")
    body, ctype = _body([dicom_bytes(ds) for ds in instances])
    target = f"{url.rstrip('/')}/studies/{study}"
    try:
        async with httpx.AsyncClient(timeout=config.timeout, follow_redirects=False) as client:
            resp = await client.post(
                target, content=body, headers={"Content-Type": ctype, "Accept": "application/dicom+json"}
            )
    except httpx.TimeoutException as exc:
        raise ApiError(424, "dicomweb_unreachable", "the DICOMweb server did not answer the store in time") from exc
    except httpx.HTTPError as exc:
        raise ApiError(424, "dicomweb_unreachable", f"cannot reach the DICOMweb server ({type(exc).__name__})") from exc
    failed = False
    if resp.status_code < 300:
        try:
            answer = resp.json()
            failed = bool(answer.get("00081198", {}).get("Value")) if isinstance(answer, dict) else False
        except ValueError:
            failed = False
    if resp.status_code >= 300 or failed:
        raise ApiError(424, "dicomweb_store_failed", f"the DICOMweb server refused the SR (HTTP {resp.status_code})")
    logger.info("dicomweb: stored %d instance(s)", len(instances))
