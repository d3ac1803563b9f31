"""Pseudonyms for studies and subjects, so no identifier from the hospital reaches the cache.

A pseudonym is an HMAC-SHA256 of the identifier under a random secret key kept in the cache's
``secret/`` folder (which stays inside the hospital): without the key, a pseudonym cannot be turned
back into a study or subject ID, even when IDs are guessable (accession numbers, MRNs).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

KEY_FILE = Path("secret") / "pseudonym.key"

# DICOM keywords that identify a patient or a visit (PS3.15 Annex E basic profile, the common ones).
# Nothing from these tags is ever copied out of a header; the list also drives the privacy tests.
PHI_KEYWORDS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientBirthTime",
    "OtherPatientIDs",
    "OtherPatientNames",
    "PatientAddress",
    "PatientTelephoneNumbers",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "SeriesDate",
    "AcquisitionDate",
    "ContentDate",
    "StudyTime",
    "InstitutionName",
    "InstitutionAddress",
    "ReferringPhysicianName",
    "PerformingPhysicianName",
    "OperatorsName",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
)


def load_or_create_key(cache_dir: Path) -> bytes:
    """The cache's secret key, created (readable by the owner only) on first use."""
    path = cache_dir / KEY_FILE
    if path.is_file():
        return bytes.fromhex(path.read_text().strip())
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_bytes(32)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(key.hex())
    os.replace(tmp, path)
    return key


def pseudonym(key: bytes, kind: str, identifier: str) -> str:
    """A stable, non-reversible name such as ``st-3f9a0c1b2d4e5f60`` for ``kind`` 'st' (study) or 'sb' (subject)."""
    digest = hmac.new(key, f"{kind}:{identifier}".encode(), hashlib.sha256).hexdigest()
    return f"{kind}-{digest[:16]}"
