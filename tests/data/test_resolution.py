"""Resolution from the cohort: hand-computed proposals, the lesion warning of `cohort validate`, summary.json."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from medvlp.data.build import build_cohort
from medvlp.data.cohort import load_cohort
from medvlp.data.resolution import output_axes, proposal_from_items, propose_resolution
from medvlp.data.validate import VISIBLE_CONTRAST, lesion_warnings, peak_contrast

# 96 x 96 x 40 voxels at 3 mm: a field of view of 288 x 288 x 120 mm
SPACING = [[3.0, 3.0, 3.0]] * 4
SHAPE = [[96, 96, 40]] * 4


def test_the_smallest_box_sets_the_spacing_when_it_fits() -> None:
    # smallest box 30 mm on every axis -> 30 / 3 = 10 mm spacing (coarser than the 3 mm source);
    # 288 / 10 = 28.8 -> 32 voxels (multiple of 8), 120 / 10 = 12 -> 16: 32 x 32 x 16 = 16384 <= 64 x 64 x 32
    p = propose_resolution(SPACING, SHAPE, [[30, 40, 30], [50, 30, 60]])
    assert p.spacing == (10.0, 10.0, 10.0) and p.size == (32, 32, 16) and p.voxels == 16384
    assert p.smallest_box_mm == (30.0, 30.0, 30.0) and p.smallest_box_voxels == pytest.approx(3.0)
    assert p.limited_by == "lesion" and p.fits and p.budget == 64 * 64 * 32
    assert p.extent_mm == (288.0, 288.0, 120.0) and p.source_spacing == (3.0, 3.0, 3.0)


def test_never_finer_than_the_source() -> None:
    # a 6 mm box wants 2 mm, the source has 3 mm: 3 mm, 96 x 96 x 40 = 368640 voxels (budget given as exactly that)
    p = propose_resolution(SPACING, SHAPE, [[6, 6, 6]], budget=96 * 96 * 40)
    assert p.spacing == (3.0, 3.0, 3.0) and p.size == (96, 96, 40)
    assert p.smallest_box_voxels == pytest.approx(2.0) and p.limited_by == "source" and not p.fits


def test_over_budget_coarsens_uniformly_to_the_first_size_that_fits() -> None:
    # 3 mm needs 96 x 96 x 40 > 131072. Uniform factors f where a size steps down (288 / (3 * 8 * k), 120 / (24 k)):
    # f = 1.333 -> 72 x 72 x 32 = 165888 (too many); f = 1.5 -> 4.5 mm: 64 x 64 x ceil(26.7 -> 32) = 131072 fits.
    p = propose_resolution(SPACING, SHAPE, [[6, 6, 6]])
    assert p.spacing == pytest.approx((4.5, 4.5, 4.5)) and p.size == (64, 64, 32) and p.voxels == 131072
    assert p.smallest_box_voxels == pytest.approx(6 / 4.5) and p.limited_by == "budget" and not p.fits


def test_per_axis_spacing_follows_the_smallest_extent_on_each_axis() -> None:
    # in-plane 0.8 mm, 5 mm slices, 200 x 200 x 30 voxels: 160 x 160 x 150 mm. Smallest box: 12 mm in-plane
    # (-> 4 mm), 15 mm along z (-> 5 mm = the source). 160 / 4 = 40 -> 40; 150 / 5 = 30 -> 32: 51200 voxels.
    p = propose_resolution([[0.8, 0.8, 5.0]], [[200, 200, 30]], [[12, 20, 15], [30, 12, 25]])
    assert p.spacing == pytest.approx((4.0, 4.0, 5.0)) and p.size == (40, 40, 32)
    assert p.limited_by == "lesion" and p.fits and p.smallest_box_voxels == pytest.approx(3.0)


def test_without_boxes_the_source_spacing_is_kept_within_budget() -> None:
    p = propose_resolution([[2.0, 2.0]], [[100, 60]], None, multiple=4)  # 200 x 120 mm: 100 x 60 at 2 mm
    assert p.spacing == (2.0, 2.0) and p.size == (100, 60) and p.budget == 128 * 128
    assert p.smallest_box_mm is None and p.smallest_box_voxels is None and p.fits and p.limited_by == "source"


def test_the_field_of_view_is_a_quantile_of_the_extents() -> None:
    shapes = [[40, 40, 10]] * 9 + [[400, 400, 100]]  # one outlier 10x larger
    p = propose_resolution([[10.0, 10.0, 10.0]] * 10, shapes, None, extent_quantile=0.5)
    assert p.extent_mm == (400.0, 400.0, 100.0) and p.size == (40, 40, 16)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"source_spacing": [[1.0, 1.0]], "source_shape": [[4, 4, 4]]}, "source_shape"),
        ({"source_spacing": [[0.0, 1.0, 1.0]]}, "positive"),
        ({"budget": 100}, "budget 100"),
        ({"min_voxels": 0}, "min_voxels"),
        ({"extent_quantile": 1.5}, "extent_quantile"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    args = {"source_spacing": [[1.0, 1.0, 1.0]], "source_shape": [[64, 64, 32]], **kwargs}
    with pytest.raises(ValueError, match=match):
        propose_resolution(**args)


def test_output_axes_follow_the_orientation() -> None:
    axial = np.diag([-4.0, -4.0, 5.0, 1.0])
    assert output_axes(axial, "RAS") == (0, 1, 2) and output_axes(axial, None) == (0, 1, 2)
    assert output_axes(np.eye(4), "RAS", dims=2) == (0, 1)
    coronal = np.array([[1.0, 0, 0, 0], [0, 0, 2.0, 0], [0, -3.0, 0, 0], [0, 0, 0, 1]])  # j runs I->S, k A->P
    assert output_axes(coronal, "RAS") == (0, 2, 1) and output_axes(coronal, "SAR") == (1, 2, 0)


def test_proposal_from_items_maps_stored_axes_and_box_sizes_to_mm() -> None:
    # stored (i, j, k) = (R, S, A) at (1, 2, 3) mm; output RAS takes axes (0, 2, 1): spacing (1, 3, 2)
    item = {"source_shape": [120, 60, 40], "source_spacing": [1.0, 2.0, 3.0], "source_axes": [0, 2, 1]}
    boxes = np.array([[0, 0, 0, 9, 6, 5]])  # 9 x 12 x 15 mm stored -> 9 x 15 x 12 mm in RAS (x, y=k, z=j)
    p = proposal_from_items([item], [boxes], budget=10**6)
    assert p.source_spacing == (1.0, 3.0, 2.0) and p.extent_mm == (120.0, 120.0, 120.0)
    assert p.smallest_box_mm == (9.0, 15.0, 12.0) and p.spacing == (3.0, 5.0, 4.0)
    assert proposal_from_items([], []) is None


def _set_preprocess(yaml_path: Path, **preprocess: object) -> None:
    spec = yaml.safe_load(yaml_path.read_text())
    spec["preprocess"] = {**spec["preprocess"], **preprocess}
    yaml_path.write_text(yaml.safe_dump(spec))


def test_validate_warns_when_preprocessing_erases_lesions(ct_cohort: Path) -> None:
    # the synthetic CT is 4 x 4 x 5 mm; its kidney stones are 1 voxel boxes: < 1 voxel at the default 6 x 6 x 8 mm
    grounding = pd.read_csv(ct_cohort.parent / "grounding.csv", dtype=str)
    stones = {i + 2 for i in grounding.index[grounding["category_name"] == "kidney_stone"]}
    assert stones, "the synthetic cohort has kidney stones"
    warnings = lesion_warnings(load_cohort(ct_cohort))
    rows = {int(w.split(" row ")[1].split(" ")[0]) for w in warnings}
    assert rows == stones
    assert all("kidney_stone" in w and "spacing [6.0, 6.0, 8.0]" in w for w in warnings)
    # a dense stone under a voxel still stands out at 6 mm (a partial-volume dot), so none is called erased ...
    assert all("survives as a partial-volume dot" in w and "erased" not in w for w in warnings)
    # ... while at 16 x 16 x 20 mm it is averaged into the kidney
    _set_preprocess(ct_cohort, spacing=[16.0, 16.0, 20.0], size=[24, 24, 12])
    coarse = lesion_warnings(load_cohort(ct_cohort))
    assert len(coarse) >= len(warnings) and all("the lesion is erased" in w for w in coarse)
    # at the source spacing every box keeps at least one voxel: no warning
    _set_preprocess(ct_cohort, spacing=[4.0, 4.0, 5.0], size=[96, 96, 40])
    assert lesion_warnings(load_cohort(ct_cohort)) == []


def test_cli_validate_prints_the_warning(ct_cohort: Path) -> None:
    env = os.environ | {"PYTHONWARNINGS": "ignore", "COLUMNS": "400"}
    cmd = [sys.executable, "-m", "medvlp", "cohort", "validate", str(ct_cohort)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    assert r.returncode == 0, r.stderr
    assert "warning: grounding.csv row" in r.stderr and "kidney_stone" in r.stderr


def test_summary_carries_the_proposal(ct_cohort: Path, tmp_path: Path) -> None:
    out = tmp_path / "cache"
    build_cohort(ct_cohort, out, workers=0)
    summary = json.loads((out / "summary.json").read_text())
    p = summary["resolution_proposal"]
    assert p["source_spacing"] == [4.0, 4.0, 5.0] and p["extent_mm"] == [384.0, 384.0, 200.0]
    # the stones (1 x 1 x 1 voxels = 4 x 4 x 5 mm) need spacing <= 4/3 mm: the source (4, 4, 5) mm is coarser,
    # and 96 x 96 x 40 voxels at the source spacing exceed 64 x 64 x 32: the budget coarsens it
    assert p["smallest_box_mm"] == [4.0, 4.0, 5.0] and p["limited_by"] == "budget" and not p["fits"]
    assert p["voxels"] <= 64 * 64 * 32 and p["voxels"] == int(np.prod(p["size"]))
    assert summary["preprocess"]["size"] == [64, 64, 32]  # the proposal is not used unless the YAML asks


def test_summary_carries_the_proposal_in_2d(cxr_cohort: Path, tmp_path: Path) -> None:
    out = tmp_path / "cache"
    build_cohort(cxr_cohort, out, workers=0)
    p = json.loads((out / "summary.json").read_text())["resolution_proposal"]
    assert len(p["spacing"]) == len(p["size"]) == 2 and p["budget"] == 128 * 128
    assert p["voxels"] <= p["budget"] and p["smallest_box_mm"] is not None


def test_size_auto_builds_at_the_proposed_resolution(ct_cohort: Path, tmp_path: Path) -> None:
    spec = yaml.safe_load(ct_cohort.read_text())
    spec["preprocess"] = {
        "size": "auto",
        "voxel_budget": 48 * 48 * 24,
        "orientation": "RAS",
        "intensity": {"mode": "window", "center": 40, "width": 400},
    }
    ct_cohort.write_text(yaml.safe_dump(spec))
    out = tmp_path / "cache"
    build_cohort(ct_cohort, out, workers=0)
    summary = json.loads((out / "summary.json").read_text())
    proposal, used = summary["resolution_proposal"], summary["preprocess"]
    assert used["size"] == proposal["size"] and used["spacing"] == pytest.approx(proposal["spacing"], abs=1e-4)
    assert used["fit"] == "crop_or_pad" and used["orientation"] == "RAS" and used["intensity"]["mode"] == "window"
    assert proposal["budget"] == 48 * 48 * 24 and proposal["voxels"] <= 48 * 48 * 24
    assert "voxel_budget" not in used  # the summary records the concrete spec only
    from medvlp.data.cache import CachedCohort

    cache = CachedCohort.open(out)
    assert cache.load_image(cache.records["study"][0]).shape == (1, *proposal["size"])


@pytest.mark.parametrize(
    ("preprocess", "match"),
    [
        ({"size": "auto", "spacing": [1.0, 1.0, 1.0]}, "size: auto chooses the spacing"),
        ({"size": [64, 64, 32], "voxel_budget": 1000}, "only apply with size: auto"),
        ({"size": "auto", "voxel_budget": 0}, "voxel_budget"),
    ],
)
def test_size_auto_options_are_checked(ct_cohort: Path, preprocess: dict, match: str) -> None:
    from medvlp.data.cohort import CohortError

    spec = yaml.safe_load(ct_cohort.read_text())
    spec["preprocess"] = preprocess
    ct_cohort.write_text(yaml.safe_dump(spec))
    with pytest.raises(CohortError, match=match):
        load_cohort(ct_cohort)


def test_body_shape_is_the_crop_of_crop_to_body() -> None:
    from monai.data import MetaTensor

    from medvlp.data.preprocess import FOREGROUND_MARGIN, body_shape, crop_to_body

    air = np.full((60, 50, 20), -1000.0, dtype=np.float32)
    air[10:30, 5:45, 3:12] = 40.0  # a 20 x 40 x 9 body
    expected = tuple(n + 2 * FOREGROUND_MARGIN for n in (20, 40, 9))
    assert body_shape(air) == expected
    assert tuple(crop_to_body(MetaTensor(torch.from_numpy(air)[None])).shape[1:]) == expected
    assert body_shape(np.zeros((8, 8, 4), np.float32)) == (8, 8, 4)  # a constant image is kept whole


def test_proposal_sizes_the_body_not_the_scan_with_crop_foreground(ct_cohort: Path) -> None:
    from medvlp.data.resolution import resolve_auto_preprocess

    _set_preprocess(ct_cohort, size="auto", spacing=None)
    scan = resolve_auto_preprocess(load_cohort(ct_cohort))
    _set_preprocess(ct_cohort, crop_foreground=True)
    body = resolve_auto_preprocess(load_cohort(ct_cohort))
    # the synthetic abdomen (at most 344 x 272 mm with its table) in a 384 x 384 mm field of view: the same voxel
    # budget buys a finer spacing once the air is not paid for
    assert body.crop_foreground and not scan.crop_foreground
    assert all(b < s for b, s in zip(body.spacing, scan.spacing, strict=True))
    assert np.prod(body.size) <= 64 * 64 * 32 and np.prod(scan.size) <= 64 * 64 * 32
    items = [{"source_shape": [96, 96, 40], "source_spacing": [4.0, 4.0, 5.0], "body_shape": [80, 60, 40]}]
    p = proposal_from_items(items, [np.zeros((0, 6))], budget=10**6)
    assert p.extent_mm == (320.0, 240.0, 200.0)  # the body's extent, not the 384 x 384 x 200 mm scan


def test_peak_contrast_tells_a_dense_dot_from_a_faint_one() -> None:
    rng = np.random.default_rng(0)
    volume = 0.5 + rng.normal(0, 0.02, (16, 16, 8)).astype(np.float32)
    box = np.array([7.6, 7.6, 3.6, 0.6, 0.6, 0.6])  # under a voxel wide, its edges within voxel 7
    dense, faint = volume.copy(), volume.copy()
    dense[8, 7, 3] = 1.0  # resampling put the dot's density into the neighbour: still found
    faint[7, 7, 3] = 0.52
    assert peak_contrast(dense, box) > 3 * VISIBLE_CONTRAST
    assert peak_contrast(faint, box) < VISIBLE_CONTRAST
    dark = volume.copy()
    dark[7, 7, 3] = 0.2  # hypodense stands out as well: the contrast is two-sided
    assert peak_contrast(dark, box) > VISIBLE_CONTRAST
    flat = np.full((16, 16, 8), 0.5, np.float32)
    flat[7, 7, 3] = 0.51  # a flat background: the spread is floored, not zero
    assert np.isfinite(peak_contrast(flat, box))
    assert np.isnan(peak_contrast(volume, np.array([40.0, 40.0, 40.0, 1.0, 1.0, 1.0])))  # outside the image
