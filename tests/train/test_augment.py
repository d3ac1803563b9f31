"""The training augmentation's resampling (`data.augment_interpolation`): what it does to a one-voxel lesion."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from monai.transforms import RandAffine

from medvlp.config import ConfigError, load_config
from medvlp.data.cache import CachedCohort
from medvlp.train.data import augmentation
from medvlp.train.run import _stage
from tests.train.test_align import cache  # noqa: F401  (the module-scoped cohort fixture)

ROOT = Path(__file__).resolve().parents[2]


def _dimmed(interpolation: str, draws: int = 20) -> int:
    """How many of ``draws`` augmented volumes keep a one-voxel dot (0.6 on 0) at less than 0.4."""
    dimmed = 0
    for seed in range(draws):
        volume = torch.zeros(1, 16, 16, 8)
        volume[0, 2, 13, 6] = 0.6  # off the centre, where rotation and scaling move it by a fraction of a voxel
        aug = augmentation(3, interpolation=interpolation)
        aug.set_random_state(seed=seed)
        dimmed += int(torch.as_tensor(aug(volume)).max() < 0.4)
    return dimmed


def test_nearest_resampling_keeps_a_one_voxel_dot_that_trilinear_dims() -> None:
    # the affine runs in about half the draws; trilinear then spreads the dot over its neighbours
    assert _dimmed("bilinear") >= 6
    # nearest moves the voxel whole (a scaling may still drop one now and then)
    assert _dimmed("nearest") <= 2
    with pytest.raises(ValueError, match="interpolation 'cubic'"):
        augmentation(3, interpolation="cubic")


def _affine_mode(data) -> str:
    (affine,) = [t for t in data._aug.transforms if isinstance(t, RandAffine)]
    return str(affine.mode)


def test_the_switch_reaches_both_stages_datasets(cache: CachedCohort, tmp_path: Path) -> None:  # noqa: F811
    over = ["data.augment_interpolation=nearest", "stages.stage1-image.enabled=true"]
    cfg = load_config(ROOT / "configs" / "tiny-2d.yaml", over)
    for name in ("stage1-image", "stage2-align"):
        assert _affine_mode(_stage(name, cfg, cache, tmp_path, [name]).dataset()) == "nearest"
    default = load_config(ROOT / "configs" / "tiny-2d.yaml")
    assert default.data.augment_interpolation == "bilinear"  # configs written before the switch train as before
    assert _affine_mode(_stage("stage2-align", default, cache, tmp_path, ["stage2-align"]).dataset()) == "bilinear"
    with pytest.raises(ConfigError, match="augment_interpolation"):
        load_config(ROOT / "configs" / "tiny-2d.yaml", ["data.augment_interpolation=cubic"])
