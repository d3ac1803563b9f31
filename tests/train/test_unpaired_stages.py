"""Unpaired studies in training: stage1-image sees every image, stage1-text every report, stage 2 the pairs only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from medvlp.config import load_config
from medvlp.data.build import build_cohort
from medvlp.data.cache import CachedCohort
from medvlp.data.synthetic import synthesize
from medvlp.models import load_model
from medvlp.train.run import STAGES, _stage

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = {"cxr": ROOT / "configs" / "tiny-2d.yaml", "ct": ROOT / "configs" / "tiny-3d.yaml"}


@pytest.fixture(scope="module")
def cxr_unpaired(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthesize("cxr", 48, tmp_path_factory.mktemp("unpaired-cxr"), seed=3, unpaired=16)


def _studies(cache: CachedCohort, split: str, has_image: bool | None, has_report: bool | None) -> set[str]:
    r = cache.records[cache.records["split"] == split]
    if has_image is not None:
        r = r[r["has_image"] == has_image]
    if has_report is not None:
        r = r[r["has_report"] == has_report]
    return set(r["study"])


@pytest.mark.parametrize("kind", ["cxr", "ct"])
def test_each_stage_trains_on_what_it_can_use(
    kind: str, cxr_unpaired: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    cohort = cxr_unpaired if kind == "cxr" else synthesize("ct", 10, tmp_path_factory.mktemp("unpaired-ct"), 0, None, 3)
    out = tmp_path_factory.mktemp(f"unpaired-cache-{kind}")
    build_cohort(cohort, out, workers=0)
    cache = CachedCohort.open(out)
    image_only = _studies(cache, "train", True, False)
    report_only = _studies(cache, "train", False, True)
    pairs = _studies(cache, "train", True, True)
    n = 16 if kind == "cxr" else 3
    assert len(image_only) == len(report_only) == n and pairs
    cfg = load_config(CONFIGS[kind])
    run = tmp_path_factory.mktemp(f"unpaired-run-{kind}")

    image = _stage("stage1-image", cfg, cache, run, list(STAGES)).dataset()
    assert set(image.records["study"]) == pairs | image_only
    i = list(image.records["study"]).index(sorted(image_only)[0])
    item = image[i]  # an image-only study: its image, no text
    assert item["text"] == "" and item["image"].shape[1:] == tuple(cache.summary["preprocess"]["size"])

    text = _stage("stage1-text", cfg, cache, run, list(STAGES)).dataset()
    assert set(text.studies) == pairs | report_only
    assert len(text) == len(text.studies) > len(pairs | report_only)  # several sections per report

    align = _stage("stage2-align", cfg, cache, run, ["stage2-align"])
    assert set(align.dataset().records["study"]) == pairs
    assert align.val_data is not None and set(align.val_data.records["study"]) == _studies(cache, "val", None, None)


def test_medvlp_train_end_to_end_on_an_unpaired_cohort(cxr_unpaired: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    build_cohort(cxr_unpaired, cache, workers=0)
    n_pairs = len(CachedCohort.open(cache).split("train"))
    run = tmp_path / "run"
    overrides = [
        "stages.stage1-text.steps=3",
        "stages.stage1-image.steps=2",
        # a batch larger than the train pairs: only the image-only studies make it possible
        f"stages.stage1-image.batch_size={n_pairs + 2}",
        "stages.stage2-align.steps=4",
    ]
    cmd = [sys.executable, "-m", "medvlp", "train", "--config", str(CONFIGS["cxr"]), "--cohort", str(cxr_unpaired)]
    cmd += ["--out", str(run), "--cache", str(cache), *[a for o in overrides for a in ("--set", o)]]
    r = subprocess.run(cmd, capture_output=True, text=True, env=os.environ | {"PYTHONWARNINGS": "ignore"}, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    for stage in STAGES:
        log = [json.loads(ln) for ln in (run / stage / "log.jsonl").read_text().splitlines() if ln.strip()]
        assert log and all(rec["loss"] == rec["loss"] for rec in log if "loss" in rec), stage
    model = load_model(run)
    with torch.no_grad():
        emb = model.encode_image(torch.rand(1, 1, 128, 128))
    assert emb.shape == (1, 64) and torch.isfinite(emb).all()
