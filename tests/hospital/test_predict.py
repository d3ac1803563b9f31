"""`medvlp predict`: every kind of study, the server's own probabilities, quarantine without identifiers, resume."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from serve.helpers import PHI, PHI_UIDS, nifti_bytes, png_bytes, study_file, with_phi

from medvlp.data.cohort import load_cohort
from medvlp.data.privacy import load_or_create_key, pseudonym
from medvlp.predict import find_studies, predict, read_predictions
from medvlp.serve.service import DiagnosisService, ImageJob
from medvlp.train.run import default_cache_dir

from .conftest import TinyModel

ROOT = Path(__file__).resolve().parents[2]
NAMED = f"{PHI['PatientName'].replace('^', '_')}_{PHI['PatientID']}.dcm"  # a file name that identifies a patient


def _folder(model: TinyModel, root: Path) -> Path:
    """Two radiographs (one named after its patient, with identifiers inside), a PNG, a broken file, a 3D NIfTI."""
    images = root / "studies"
    images.mkdir()
    shutil.copy(study_file(model.cohort, "S00001"), images / "a.dcm")
    with_phi(study_file(model.cohort, "S00002"), images / NAMED)
    (images / "c.png").write_bytes(png_bytes((90, 110)))
    (images / f"broken-{PHI['AccessionNumber']}.dcm").write_bytes(b"not a dicom file at all")
    nifti_bytes((40, 40, 12), images / "volume.nii.gz")
    return images


def _leaks(folder: Path) -> list[str]:
    secrets = [*PHI.values(), *PHI_UIDS.values(), NAMED, PHI["PatientID"], PHI["AccessionNumber"]]
    found = []
    for f in folder.rglob("*"):
        if f.is_file() and f.suffix in (".csv", ".json", ".parquet"):
            text = f.read_bytes().decode("latin-1")
            found += [f"{f.name}: {s}" for s in secrets if s in text]
    return found


def test_predict_a_folder(model_2d: TinyModel, service_2d: DiagnosisService, tmp_path: Path) -> None:
    images, out = _folder(model_2d, tmp_path), tmp_path / "out"
    studies = find_studies(images=images, out=out)
    assert len(studies) == 5 and all(s.study.startswith("st-") for s in studies)
    summary = predict(service_2d, studies, out, progress=False)
    assert (summary.scored, summary.reused, summary.quarantined) == (3, 0, 2)

    table = read_predictions(out)
    assert list(table.columns) == ["study", "finding", "probability"]
    assert pd.read_csv(out / "predictions.csv").equals(table)
    findings = service_2d.findings
    assert len(table) == 3 * len(findings) and set(table["finding"]) == set(findings)
    assert table["probability"].between(0, 1).all()
    # the same numbers as the server's own code for the same files
    by_name = {s.path.name: s.study for s in studies}
    direct = service_2d.run_images([ImageJob(images / n, tmp_path) for n in ("a.dcm", NAMED, "c.png")])
    for name, answer in zip(("a.dcm", NAMED, "c.png"), direct, strict=True):
        got = table[table["study"] == by_name[name]].set_index("finding")["probability"]
        want = {p["finding"]: p["probability"] for p in answer["predictions"]}
        np.testing.assert_array_equal(got[list(want)].to_numpy(), np.array(list(want.values())))

    quarantine = pd.read_csv(out / "quarantine.csv")
    assert set(quarantine["study"]) == {by_name[f"broken-{PHI['AccessionNumber']}.dcm"], by_name["volume.nii.gz"]}
    reasons = " ".join(quarantine["reason"])
    assert "not a DICOM file" in reasons and "3D image" in reasons
    assert str(tmp_path) not in reasons
    assert _leaks(out) == []


def test_predict_resumes(model_2d: TinyModel, service_2d: DiagnosisService, tmp_path: Path) -> None:
    images, out = _folder(model_2d, tmp_path), tmp_path / "out"
    studies = find_studies(images=images, out=out)
    first = predict(service_2d, studies, out, progress=False)
    table = read_predictions(out)
    again = predict(service_2d, find_studies(images=images, out=out), out, progress=False)
    assert (again.scored, again.reused, again.quarantined) == (0, first.scored, first.quarantined)
    pd.testing.assert_frame_equal(read_predictions(out), table)
    by_name = {s.path.name: s.study for s in studies}
    (out / "studies" / f"{by_name['a.dcm']}.json").unlink()  # an interrupted run: one study left to do
    (images / "c.png").write_bytes(png_bytes((64, 64), seed=5))  # a finished study is not rescored even if changed
    third = predict(service_2d, find_studies(images=images, out=out), out, progress=False)
    assert (third.scored, third.reused) == (1, first.scored - 1)
    pd.testing.assert_frame_equal(read_predictions(out), table)


def test_predict_bad_arguments(model_2d: TinyModel, service_2d: DiagnosisService, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        find_studies(out=tmp_path)
    with pytest.raises(ValueError, match="'holdout'"):
        find_studies(cohort=model_2d.cohort, split="holdout", out=tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no study"):
        find_studies(images=tmp_path / "empty", out=tmp_path)
    with pytest.raises(ValueError, match="batch_size"):
        predict(service_2d, [], tmp_path, batch_size=0)


def test_predict_cli_on_a_3d_cohort(model_3d: TinyModel, ct_cohort: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "medvlp", "predict", "--model", str(model_3d.model), "--cohort", str(ct_cohort)]
    r = subprocess.run([*cmd, "--split", "all", "--out", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    table = read_predictions(out)
    manifest = load_cohort(ct_cohort).manifest
    key = load_or_create_key(default_cache_dir(ct_cohort))  # the cohort cache's pseudonyms
    assert set(table["study"]) == {pseudonym(key, "st", str(s)) for s in manifest["study_id"]}
    assert len(table) == len(manifest) * len(load_cohort(ct_cohort).findings)
    assert json.loads(next((out / "studies").glob("*.json")).read_text())["predictions"]
    assert not any(str(s) in r.stderr + r.stdout for s in manifest["study_id"])
