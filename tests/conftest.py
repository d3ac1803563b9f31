"""Shared fixtures: one seeding fixture, small synthetic cohorts made once per session."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def seed_everything() -> None:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def cxr_cohort_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A pristine 24-study synthetic radiograph cohort; copy it before changing anything."""
    from medvlp.data.synthetic import synthesize

    return synthesize("cxr", 24, tmp_path_factory.mktemp("cxr-src"), seed=1)


@pytest.fixture(scope="session")
def ct_cohort_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A pristine 10-study synthetic CT cohort; copy it before changing anything."""
    from medvlp.data.synthetic import synthesize

    return synthesize("ct", 10, tmp_path_factory.mktemp("ct-src"), seed=2)


def copy_cohort(src_yaml: Path, dst: Path) -> Path:
    shutil.copytree(src_yaml.parent, dst)
    return dst / src_yaml.name


@pytest.fixture()
def cxr_cohort(cxr_cohort_src: Path, tmp_path: Path) -> Path:
    return copy_cohort(cxr_cohort_src, tmp_path / "cxr")


@pytest.fixture()
def ct_cohort(ct_cohort_src: Path, tmp_path: Path) -> Path:
    return copy_cohort(ct_cohort_src, tmp_path / "ct")
