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


# Values of technical DICOM attributes that may be echoed back (API answers, messages, the cache): the standard's
# own terms only. Anything else in these header fields (a Modality of "MRN-123456") is free text a sender put
# there and is reported as "other".
MODALITIES = frozenset(
    # PS3.3 C.7.3.1.1.1 defined terms, current and retired
    [
        "ANN",
        "AR",
        "ASMT",
        "AU",
        "BDUS",
        "BI",
        "BMD",
        "CFM",
        "CR",
        "CT",
        "CTPROTOCOL",
        "DG",
        "DMS",
        "DOC",
        "DX",
        "ECG",
        "EEG",
        "EMG",
        "EOG",
        "EPS",
        "ES",
        "FID",
        "GM",
        "HC",
        "HD",
        "IO",
        "IOL",
        "IVOCT",
        "IVUS",
        "KER",
        "KO",
        "LEN",
        "LS",
        "MG",
        "MR",
        "M3D",
        "NM",
        "OAM",
        "OCT",
        "OP",
        "OPM",
        "OPT",
        "OPTBSV",
        "OPTENF",
        "OPV",
        "OSS",
        "OT",
        "PA",
        "PLAN",
        "POS",
        "PR",
        "PT",
        "PX",
        "REG",
        "RESP",
        "RF",
        "RG",
        "RTDOSE",
        "RTIMAGE",
        "RTINTENT",
        "RTPLAN",
        "RTRAD",
        "RTRECORD",
        "RTSEGANN",
        "RTSTRUCT",
        "RWV",
        "SEG",
        "SM",
        "SMR",
        "SR",
        "SRF",
        "STAIN",
        "TEXTUREMAP",
        "TG",
        "US",
        "VA",
        "XA",
        "XAPROTOCOL",
        "XC",
        "CD",
        "CF",
        "CP",
        "CS",
        "DD",
        "DF",
        "DM",
        "DS",
        "EC",
        "FA",
        "FS",
        "LP",
        "MA",
        "MS",
        "OPR",
        "ST",
        "VF",
    ]
)
PHOTOMETRIC_INTERPRETATIONS = frozenset(
    # PS3.3 C.7.6.3.1.2, retired terms included
    "MONOCHROME1 MONOCHROME2 PALETTE COLOR RGB HSV ARGB CMYK YBR_FULL YBR_FULL_422 YBR_PARTIAL_422 YBR_PARTIAL_420 "
    "YBR_ICT YBR_RCT XYB".replace("PALETTE COLOR", "PALETTE_COLOR").split()
)


def standard_term(value: object, allowed: frozenset[str]) -> str:
    """``value`` when it is one of the standard's terms (surrounding blanks ignored), ``""`` when empty, else
    ``"other"``."""
    text = str(value if value is not None else "").strip()
    if not text:
        return ""
    if text == "PALETTE COLOR":
        return text
    return text if text in allowed else "other"
