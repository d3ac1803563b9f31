"""Files the server tests upload: real pydicom test files, synthetic studies, DICOM with identifiers, zips."""

from __future__ import annotations

import importlib
import io
import os
import shutil
import socket
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

API_KEY = "medvlp-test-key-7f3a9c2e41b8d605"
OTHER_KEY = "medvlp-other-key-19e0c4b7aa53f2d8"
MAX_UPLOAD_MB = 4
ROOT = Path(__file__).resolve().parents[2]

# Identifying values written into a DICOM header; none may come back in an answer or reach the log.
PHI = {
    "PatientName": "Doe^Janet^Q",
    "PatientID": "MRN-99887766",
    "PatientBirthDate": "19450317",
    "AccessionNumber": "ACC-55512345",
    "InstitutionName": "Saint Hypothetical Hospital",
    "ReferringPhysicianName": "Strange^Stephen",
    "StudyDate": "20230914",
    "StudyID": "STUDY-4242",
}
PHI_UIDS = {
    "StudyInstanceUID": "1.2.826.0.1.3680043.8.498.77001",
    "SeriesInstanceUID": "1.2.826.0.1.3680043.8.498.77002",
    "SOPInstanceUID": "1.2.826.0.1.3680043.8.498.77003",
}


def pydicom_file(name: str) -> Path:
    path = get_testdata_file(name, download=False)
    assert path is not None, f"{name} not found: install pydicom-data (pip install pydicom-data)"
    return Path(path)


def study_file(cohort_yaml: Path, study: str = "S00001") -> Path:
    """A synthetic radiograph of the training cohort (a real DICOM file)."""
    return cohort_yaml.parent / "images" / f"{study}.dcm"


def with_phi(src: Path, dst: Path) -> Path:
    """A copy of ``src`` carrying the identifiers of :data:`PHI` and :data:`PHI_UIDS`."""
    ds = pydicom.dcmread(src)
    for keyword, value in {**PHI, **PHI_UIDS}.items():
        setattr(ds, keyword, value)
    ds.file_meta.MediaStorageSOPInstanceUID = PHI_UIDS["SOPInstanceUID"]
    ds.save_as(dst)
    return dst


def reseries(src: Path, dst: Path, series_uid: str | None = None) -> Path:
    """A copy of ``src`` moved into another series (a new SeriesInstanceUID, or the one given)."""
    ds = pydicom.dcmread(src)
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(dst)
    return dst


def zip_bytes(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


def png_bytes(shape: tuple[int, int] = (96, 80), seed: int = 0) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = (rng.random(shape) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def nifti_bytes(shape: tuple[int, ...], path: Path) -> bytes:
    import nibabel as nib

    data = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.diag([0.8, 0.8, 2.0, 1.0])), path)
    return path.read_bytes()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def client(self, key: str | None = API_KEY, timeout: float = 60.0) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def server_env(keys: str | None = API_KEY) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MEDVLP_API_KEYS"}
    env |= {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    if keys is not None:
        env["MEDVLP_API_KEYS"] = keys
    return env


def start_server(model: Path, log: Path, *args: str, keys: str | None = API_KEY, timeout: float = 120.0) -> Server:
    """``python -m medvlp serve --model MODEL --port FREE ARGS``, returned once ``/v1/health`` answers."""
    port = free_port()
    cmd = [sys.executable, "-m", "medvlp", "serve", "--model", str(model), "--port", str(port), *args]
    fh = log.open("wb")
    proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=server_env(keys), cwd=ROOT)
    fh.close()
    server = Server(f"http://127.0.0.1:{port}", proc, log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}:\n{server.log_text()}")
        try:
            if httpx.get(f"{server.url}/v1/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    server.stop()
    raise RuntimeError(f"the server did not come up in {timeout} s:\n{server.log_text()}")


def require_tool(name: str, *candidates: str) -> str:
    """The path of a Debian tool; skipped when it is missing, except under CI (CI=true), where that fails."""
    for c in (name, *candidates):
        found = shutil.which(c) or (c if os.path.isabs(c) and os.access(c, os.X_OK) else None)
        if found:
            return found
    message = f"{name} is not installed (bash .ci/system-deps.sh installs it)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def require_module(name: str) -> Any:
    """Import a test dependency; skipped when it is missing, except under CI (CI=true), where that fails."""
    try:
        return importlib.import_module(name)
    except ImportError:
        message = f"{name} is not installed (pip install -e '.[dev]')"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def assert_error(resp: httpx.Response, status: int, code: str | None = None) -> dict:
    """A 4xx in the API's one error shape."""
    assert resp.status_code == status, (resp.status_code, resp.text[:500])
    body = resp.json()
    assert set(body) == {"error"}, body
    assert isinstance(body["error"]["code"], str) and isinstance(body["error"]["message"], str), body
    if code is not None:
        assert body["error"]["code"] == code, body
    return body["error"]
