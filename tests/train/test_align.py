"""Stage 2 in the loop: the temperature's post-step clamp, validation on `val`, best-checkpoint selection."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from medvlp.config import AlignStageConfig
from medvlp.data.build import build_cohort
from medvlp.data.cache import CachedCohort
from medvlp.models import ModelConfig
from medvlp.train.loop import run_stage
from medvlp.train.runtime import Runtime
from medvlp.train.stages.align import MAX_LOG_SCALE, AlignStage

CPU = Runtime(torch.device("cpu"))
SECTIONS = ["findings", "impression"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> CachedCohort:
    from medvlp.data.synthetic import synthesize

    root = tmp_path_factory.mktemp("align")
    build_cohort(synthesize("cxr", 40, root / "src", seed=6), root / "cache", workers=0)
    return CachedCohort.open(root / "cache")


def _model_config(cache: CachedCohort, **kw) -> ModelConfig:
    return ModelConfig(
        image_encoder="tiny_resnet",
        spatial_dims=2,
        image_size=tuple(cache.summary["preprocess"]["size"]),
        text_num_layers=1,
        text_max_length=32,
        embed_dim=32,
        **kw,
    )


def _stage(cache: CachedCohort, model_kw: dict | None = None, **cfg) -> AlignStage:
    base = {"steps": 4, "batch_size": 4, "lr": 1e-3, "warmup_steps": 0, "log_every": 1, "checkpoint_every": 2}
    return AlignStage(
        AlignStageConfig(**(base | cfg)), cache, _model_config(cache, **(model_kw or {})), SECTIONS, seed=0
    )


def test_logit_scale_is_clamped_after_the_optimizer_step_not_in_the_forward(
    cache: CachedCohort, tmp_path: Path
) -> None:
    stage = _stage(cache, {"init_logit_scale": 5.0}, steps=1)
    batch = stage.collate([stage.dataset()[i] for i in range(4)])
    stage.training_forward(stage.module(), batch, 0)
    assert stage.model.logit_scale.item() == 5.0, "the forward must not change a parameter"

    run_stage(stage, tmp_path / "high", CPU, seed=0)
    assert stage.model.logit_scale.item() == pytest.approx(MAX_LOG_SCALE), "clamped after the step"
    saved = torch.load(tmp_path / "high" / "checkpoint.pt", weights_only=False)["module"]["model.logit_scale"]
    assert float(saved) == pytest.approx(math.log(100.0))

    low = _stage(cache, {"init_logit_scale": -1.0}, steps=1)
    run_stage(low, tmp_path / "low", CPU, seed=0)
    assert low.model.logit_scale.item() == 0.0, "the lower bound is ln 1"


def test_the_loop_calls_after_step_once_per_optimizer_step(cache: CachedCohort, tmp_path: Path) -> None:
    stage = _stage(cache, steps=3, grad_accum=2)
    seen: list[float] = []
    before = stage.model.logit_scale.item()
    stage.after_step = lambda: seen.append(stage.model.logit_scale.item())  # type: ignore[method-assign]
    run_stage(stage, tmp_path, CPU, seed=0)
    assert len(seen) == 3, "once per optimizer step, not per micro-batch"
    assert seen[0] != before, "after the optimizer has updated the parameters"
