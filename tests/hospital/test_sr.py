"""The DICOM SR of a diagnosis: valid for dciodvfy, the probabilities and peaks read back, identifiers copied from
the source (and nowhere else), the peak mapped to the stored image."""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from serve.helpers import PHI, PHI_UIDS, require_tool, study_file, with_phi

from medvlp.hospital.peaks import grounding_peaks
from medvlp.hospital.sr import Algorithm, algorithm_of, build_sr, read_source_headers, sr_findings
from medvlp.predict import find_studies, predict, read_predictions
from medvlp.serve.service import DiagnosisService, ImageJob
from medvlp.tasks.zeroshot import finding_text

from .conftest import TinyModel


def dciodvfy_errors(path: Path) -> list[str]:
    exe = require_tool("dciodvfy")
    r = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (r.stdout + r.stderr).splitlines() if line.startswith("Error")]


@pytest.mark.external
def test_sr_of_a_radiograph(
    model_2d: TinyModel, service_2d: DiagnosisService, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    images = tmp_path / "in"
    images.mkdir()
    source = with_phi(study_file(model_2d.cohort, "S00003"), images / "x.dcm")
    out = tmp_path / "out"
    with caplog.at_level(logging.DEBUG):
        predict(service_2d, find_studies(images=images, out=out), out, sr=True, progress=False)
    (sr_path,) = (out / "sr").glob("*.dcm")
    assert dciodvfy_errors(sr_path) == []
    sr, src = pydicom.dcmread(sr_path), pydicom.dcmread(source)
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber", "StudyInstanceUID"):
        assert str(sr[keyword].value) == str(src[keyword].value), keyword  # the one output that carries them
    assert sr.SeriesInstanceUID != src.SeriesInstanceUID and sr.SOPInstanceUID != src.SOPInstanceUID
    (evidence,) = sr.CurrentRequestedProcedureEvidenceSequence
    assert evidence.ReferencedSeriesSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID

    table = read_predictions(out)
    back = sr_findings(sr)
    assert set(back) == {finding_text(f) for f in service_2d.findings}
    for row in table.itertuples():
        assert back[finding_text(row.finding)]["probability"] == pytest.approx(row.probability, abs=1e-6)
    (answer,) = service_2d.run_images([ImageJob(source, tmp_path, peaks=True)])
    for pred in answer["predictions"]:
        point = back[finding_text(pred["finding"])]["point"]
        assert point == pytest.approx([pred["peak"][0] + 0.5, pred["peak"][1] + 0.5], abs=1e-3)
        assert 0 <= point[0] <= src.Columns and 0 <= point[1] <= src.Rows
    algo = algorithm_of(service_2d.model, service_2d.context.cohort)  # the algorithm identification
    assert sr_path.read_bytes().count(algo.version.encode()) >= len(back)
    logged = caplog.text
    assert not [v for v in (*PHI.values(), *PHI_UIDS.values()) if v in logged]


@pytest.mark.external
def test_sr_of_a_ct_series(model_3d: TinyModel, service_3d: DiagnosisService, tmp_path: Path) -> None:
    series = model_3d.cohort.parent / "images" / "S00001"
    (answer,) = service_3d.run_images([ImageJob(series, tmp_path, peaks=True)])
    sources = read_source_headers(series)
    sr = build_sr(sources, answer["predictions"], algorithm_of(service_3d.model, service_3d.context.cohort))
    sr.save_as(tmp_path / "sr.dcm")
    assert dciodvfy_errors(tmp_path / "sr.dcm") == []
    back = sr_findings(pydicom.dcmread(tmp_path / "sr.dcm"))
    for pred in answer["predictions"]:
        assert back[finding_text(pred["finding"])] == {"probability": pred["probability"], "point": None}
    refs = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence
    assert len(refs) == len(sources) == len(list(series.iterdir()))


def test_grounding_peak_is_mapped_to_the_stored_image() -> None:
    grid, size, dim = (4, 4), (64, 64), 16
    tokens = torch.randn(16, dim) * 0.01
    phrase = torch.zeros(dim)
    phrase[0] = 1.0
    tokens[2 * 4 + 1] = phrase  # grid cell (2, 1): model voxels [32, 48) x [16, 32)
    s2o = np.diag([0.5, 0.25, 1.0, 1.0])  # the stored image is 128 x 256
    ((i, j),) = grounding_peaks(tokens, grid, phrase[None], size, s2o)
    assert 2 * 32 <= i <= 2 * 48 and 4 * 16 <= j <= 4 * 32


def test_build_sr_refuses_bad_input(model_2d: TinyModel, tmp_path: Path) -> None:
    algo = Algorithm("m", "1")
    a = read_source_headers(study_file(model_2d.cohort, "S00001"))
    b = read_source_headers(study_file(model_2d.cohort, "S00002"))  # another study
    pred = [{"finding": "cardiomegaly", "probability": 0.4}]
    with pytest.raises(ValueError, match="source instances"):
        build_sr([], pred, algo)
    with pytest.raises(ValueError, match="2 studies"):
        build_sr(a + b, pred, algo)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        build_sr(a, [{"finding": "x", "probability": 1.5}], algo)
    with pytest.raises(ValueError, match="at least one"):
        build_sr(a, [], algo)
    png = tmp_path / "x.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n")
    assert read_source_headers(png) == []
