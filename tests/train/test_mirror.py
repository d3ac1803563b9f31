"""Mirrored training pairs: the image flipped across the left-right axis, every side of its report swapped."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from medvlp.config import AlignStageConfig
from medvlp.data.cache import CachedCohort
from medvlp.data.perturb import mirror_sides
from medvlp.train.data import CachedImages
from tests.train.test_align import _stage, cache  # noqa: F401  (the module-scoped cohort fixture)


def test_mirror_sides_swaps_every_side_word() -> None:
    text = "Small left pleural effusion. The right lung is clear. LEFT-sided pneumothorax."
    assert mirror_sides(text) == "Small right pleural effusion. The left lung is clear. RIGHT-sided pneumothorax."
    assert mirror_sides(mirror_sides(text)) == text
    assert mirror_sides("Leftover contrast. Bilateral effusions.") == "Leftover contrast. Bilateral effusions."


def _without_affine(data: CachedImages) -> CachedImages:
    from monai.transforms import Compose

    data._aug = Compose([])  # the mirror alone, so the two datasets can be compared voxel by voxel
    return data


def test_a_mirrored_pair_is_flipped_with_its_sides_swapped(cache: CachedCohort) -> None:  # noqa: F811
    plain = _without_affine(CachedImages(cache, "train", views=1, seed=0, boxes=True))
    mirrored = _without_affine(CachedImages(cache, "train", views=1, seed=0, boxes=True, mirror=1.0))
    sided = 0
    for i in range(len(plain)):
        a, b = plain[(i, 2)], mirrored[(i, 2)]
        assert torch.equal(b["image"], a["image"].flip(1)), "flipped along the first spatial axis"
        assert b["text"] == mirror_sides(a["text"])
        sided += b["text"] != a["text"]
        if a["box_phrase"] is not None:  # the same phrase drawn, its side and its boxes moved together
            assert b["box_phrase"] == mirror_sides(a["box_phrase"])
            assert torch.equal(b["box_mask"], a["box_mask"].flip(0))
    assert sided > 0, "the fixture's reports name sides"


def test_which_pairs_are_mirrored_is_seeded(cache: CachedCohort) -> None:  # noqa: F811
    half = CachedImages(cache, "train", views=1, seed=0, mirror=0.5)
    again = CachedImages(cache, "train", views=1, seed=0, mirror=0.5)
    other = CachedImages(cache, "train", views=1, seed=1, mirror=0.5)
    draws = [half._mirrored(i, e) for i in range(len(half)) for e in range(4)]
    assert draws == [again._mirrored(i, e) for i in range(len(half)) for e in range(4)]
    assert draws != [other._mirrored(i, e) for i in range(len(half)) for e in range(4)]
    assert 0.3 < sum(draws) / len(draws) < 0.7
    for bad in ({"mirror": 1.5}, {"mirror": 0.5, "views": 2}, {"mirror": 0.5, "views": 0}):
        with pytest.raises(ValueError, match="mirror"):
            CachedImages(cache, "train", **({"views": 1} | bad))


def test_the_align_stage_trains_on_mirrored_pairs(cache: CachedCohort) -> None:  # noqa: F811
    stage = _stage(cache, mirror=1.0)
    data = stage.dataset()
    plain = CachedImages(cache, "train", stage.sections, views=1, seed=0)
    assert [data[(i, 0)]["text"] for i in range(6)] == [mirror_sides(plain[(i, 0)]["text"]) for i in range(6)]
    with pytest.raises(ValidationError, match="mirror"):
        AlignStageConfig(mirror=2.0)


def test_the_mirror_axis_is_the_patients_left_right(cache: CachedCohort, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    from medvlp.train.data import left_right_axis

    assert cache.spatial_dims == 2 and left_right_axis(cache) == 0  # radiographs: the columns
    volume = {**cache.summary, "preprocess": {**cache.summary["preprocess"], "orientation": "SRA"}}
    monkeypatch.setattr(type(cache), "spatial_dims", property(lambda self: 3))
    monkeypatch.setattr(cache, "summary", volume)
    assert left_right_axis(cache) == 1  # the axis coded R
    monkeypatch.setattr(cache, "summary", {**volume, "preprocess": {**volume["preprocess"], "orientation": None}})
    with pytest.raises(ValueError, match="no left-right axis"):
        left_right_axis(cache)


def test_findings_that_name_a_side_refuse_the_mirror(cache: CachedCohort, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    monkeypatch.setattr(type(cache), "findings", property(lambda self: ["left_effusion", "cardiomegaly"]))
    with pytest.raises(ValueError, match="name a side"):
        CachedImages(cache, "train", views=1, seed=0, mirror=0.5)
