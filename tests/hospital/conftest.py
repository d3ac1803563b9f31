"""Tiny untrained 2D and 3D model folders with their cohort records: enough for the hospital outputs, no training.

Each model folder is what ``medvlp train`` leaves (``config.json``, weights, tokenizer, ``cohort.json``), so
:func:`medvlp.serve.server.load_service` loads it as it loads a trained run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from medvlp.data.cohort import load_spec
from medvlp.models.config import ModelConfig
from medvlp.models.vlm import MedVLP
from medvlp.serve.service import DiagnosisService


@dataclass(frozen=True)
class TinyModel:
    model: Path  # the model folder
    cohort: Path  # the cohort YAML the record was taken from
    spatial_dims: int


def make_model(cohort_yaml: Path, folder: Path) -> TinyModel:
    spec = load_spec(cohort_yaml)
    torch.manual_seed(3)
    cfg = ModelConfig(
        image_encoder="tiny_resnet",
        spatial_dims=spec.spatial_dims,
        image_size=tuple(spec.preprocessing.size),
        text_num_layers=1,
        text_max_length=64,
        embed_dim=64,
    )
    MedVLP(cfg).save_pretrained(folder)
    record = {
        "cohort": spec.name,
        "modality": spec.modality,
        "spatial_dims": spec.spatial_dims,
        "findings": list(spec.findings),
        "preprocess": spec.preprocessing.model_dump(mode="json"),
    }
    (folder / "cohort.json").write_text(json.dumps(record))
    return TinyModel(folder, cohort_yaml, spec.spatial_dims)


CALIBRATION_2D = {"fitted_on": "val", "findings": {"cardiomegaly": {"a": 0.5, "b": -0.3, "n": 40}}}


@pytest.fixture(scope="session")
def model_2d(cxr_cohort_src: Path, tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    """The 2D model carries a calibration (as training leaves one), so every output is checked calibrated."""
    from medvlp.tasks.calibration import save_calibration

    made = make_model(cxr_cohort_src, tmp_path_factory.mktemp("hospital-2d") / "model")
    save_calibration(made.model, CALIBRATION_2D)
    return made


@pytest.fixture(scope="session")
def model_3d(ct_cohort_src: Path, tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    return make_model(ct_cohort_src, tmp_path_factory.mktemp("hospital-3d") / "model")


@pytest.fixture(scope="session")
def service_2d(model_2d: TinyModel) -> DiagnosisService:
    from medvlp.serve.server import load_service

    return load_service(model_2d.model, device="cpu", corpus=False)


@pytest.fixture(scope="session")
def service_3d(model_3d: TinyModel) -> DiagnosisService:
    from medvlp.serve.server import load_service

    return load_service(model_3d.model, device="cpu", corpus=False)
