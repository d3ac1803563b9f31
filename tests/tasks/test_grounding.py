"""Grounding: box masks, CNR and IoU against hand values, similarity maps in 2D/3D, and the model-level metrics."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from medvlp.data.cache import CachedCohort
from medvlp.models import MedVLP, ModelConfig
from medvlp.tasks.grounding import (
    box_mask,
    boxes_from_frame,
    cnr,
    control_studies,
    grounding_metrics,
    grounding_pairs,
    grounding_scores,
    grounding_summary,
    iou,
    similarity_map,
)
from tests.train.test_align import _stage, cache  # noqa: F401  (the module-scoped cohort fixture)


def test_box_mask_voxel_centres() -> None:
    mask = box_mask((2, 3, 4, 2), (10, 8))
    assert mask.shape == (10, 8) and mask.sum() == 8
    assert mask[2:6, 3:5].all() and not mask[6].any() and not mask[:, 5].any()
    # fractional: centres 1.5 and 2.5 lie in [1.4, 2.6), 0.5 in [0.2, 0.7)
    frac = box_mask((1.4, 0.2, 1.2, 0.5), (4, 3))
    assert np.argwhere(frac).tolist() == [[1, 0], [2, 0]]
    union = box_mask([(0, 0, 1, 1), (3, 2, 1, 1)], (4, 3))
    assert np.argwhere(union).tolist() == [[0, 0], [3, 2]]
    cube = box_mask((1, 2, 3, 2, 2, 1), (6, 6, 6))
    assert cube.sum() == 4 and cube[1:3, 2:4, 3].all()
    with pytest.raises(ValueError):
        box_mask((1, 2, 3), (4, 4))


def test_box_mask_sub_voxel_box_keeps_its_centre_voxel() -> None:
    # a 4 mm stone on 6 x 6 x 8 mm voxels: 0.67 x 0.67 x 0.5 voxels, between the centres 10.5 / 11.5 and 4.5 / 5.5
    stone = box_mask((10.6, 3.7, 4.6, 0.67, 0.67, 0.5), (16, 16, 8))
    assert np.argwhere(stone).tolist() == [[10, 4, 4]]
    # a box that holds a voxel centre is unchanged by the rule, and one outside the grid covers nothing
    assert np.argwhere(box_mask((1.4, 0.2, 1.2, 0.5), (4, 3))).tolist() == [[1, 0], [2, 0]]
    assert not box_mask((5.1, 1.0, 0.5, 0.5), (4, 3)).any()
    # with a union, each box gets its own voxel
    two = box_mask([(0.6, 0.6, 0.3, 0.3), (2.1, 1.1, 0.5, 0.5)], (4, 3))
    assert np.argwhere(two).tolist() == [[0, 0], [2, 1]]


def test_grounding_scores_a_sub_voxel_box() -> None:
    # the CNR of a one-voxel stone is finite, not NaN left out of the mean
    sim = np.random.default_rng(0).normal(0.0, 0.05, (8, 8, 4))
    sim[3, 5, 2] = 1.0
    mask = box_mask((3.6, 5.6, 2.6, 0.6, 0.6, 0.3), sim.shape)  # holds no voxel centre
    assert mask.sum() == 1 and mask[3, 5, 2]
    assert np.isfinite(cnr(sim, mask)) and cnr(sim, mask) > 10


def test_iou_box_on_background() -> None:
    size = (16, 12)
    mask = box_mask((2, 2, 4, 4), size)
    assert iou(mask.astype(float) * 0.3 + 0.1, mask) == 1.0
    shifted = box_mask((3, 2, 4, 4), size).astype(float)  # overlap 3 x 4 = 12, union 20
    assert math.isclose(iou(shifted, mask), 12 / 20)
    assert iou(torch.from_numpy(shifted), mask, threshold=0.5) == iou(shifted, mask)
    assert iou(np.zeros(size), mask) == 0.0  # a constant map predicts nothing
    # threshold on the min-max rescaled map: values 0, 0.4, 1 -> only 1 survives 0.5
    ramp = np.zeros(size)
    ramp[mask] = 1.0
    ramp[8:10, :] = 0.4
    assert iou(ramp, mask) == 1.0 and math.isclose(iou(ramp, mask, threshold=0.3), 16 / (16 + 24))


def test_cnr_hand_values() -> None:
    values = np.array([[1.0, 3.0], [0.0, 2.0]])
    mask = np.array([[True, True], [False, False]])
    assert math.isclose(cnr(values, mask), 1 / math.sqrt(2))  # |2 - 1| / sqrt(1 + 1)
    rng = np.random.default_rng(0)
    noisy = rng.normal(size=(20, 30))
    box = box_mask((5, 5, 6, 10), (20, 30))
    noisy[box] += 2.0
    inside, outside = noisy[box], noisy[~box]
    expected = abs(inside.mean() - outside.mean()) / math.sqrt(inside.var() + outside.var())
    assert math.isclose(cnr(torch.from_numpy(noisy), box), expected, rel_tol=1e-6)
    assert cnr(box.astype(float), box) == math.inf and cnr(np.ones((4, 4)), box_mask((0, 0, 2, 2), (4, 4))) == 0.0
    assert math.isnan(cnr(np.ones((4, 4)), np.zeros((4, 4), bool)))


def test_metrics_3d() -> None:
    size = (12, 10, 8)
    mask = box_mask((2, 3, 1, 4, 3, 5), size)
    bright = np.where(mask, 1.0, 0.0)
    assert iou(bright, mask) == 1.0
    shifted = np.where(box_mask((2, 3, 2, 4, 3, 5), size), 1.0, 0.0)  # z 2..6 vs 1..5: overlap 4 of 5 slices
    assert math.isclose(iou(shifted, mask), 48 / 72)
    rng = np.random.default_rng(1)
    vol = rng.random(size) + 0.5 * mask
    inside, outside = vol[mask], vol[~mask]
    expected = abs(inside.mean() - outside.mean()) / math.sqrt(inside.var() + outside.var())
    assert math.isclose(cnr(vol, mask), expected)


def test_similarity_map_interpolation_hand_values() -> None:
    # grid (2, 2) -> (4, 4), align_corners=False: output centres sample the grid at -0.25, 0.25, 0.75, 1.25
    # (clamped), so a 0 -> 1 step along X becomes 0, 0.25, 0.75, 1
    phrase = torch.tensor([1.0, 0.0])
    tokens = torch.tensor([[0.0, 1.0], [0.0, 1.0], [2.0, 0.0], [2.0, 0.0]])  # row-major: (x=0, y=0..1), (x=1, ...)
    sim = similarity_map(tokens, (2, 2), phrase, (4, 4))
    expected = torch.tensor([0.0, 0.25, 0.75, 1.0])[:, None].expand(4, 4)
    torch.testing.assert_close(sim, expected)
    volume = similarity_map(tokens.repeat_interleave(2, dim=0), (2, 2, 2), phrase, (4, 4, 4))  # constant along Z
    torch.testing.assert_close(volume, expected[..., None].expand(4, 4, 4))


@pytest.mark.parametrize(("grid", "size", "cell"), [((4, 6), (32, 48), (1, 4)), ((2, 3, 4), (8, 12, 20), (1, 2, 3))])
def test_similarity_map_peak(grid: tuple[int, ...], size: tuple[int, ...], cell: tuple[int, ...]) -> None:
    e = 32
    n = int(np.prod(grid))
    phrase = F.normalize(torch.randn(e), dim=0)
    tokens = torch.randn(n, e)
    tokens -= (tokens @ phrase)[:, None] * phrase  # orthogonal to the phrase: cosine 0
    flat = int(np.ravel_multi_index(cell, grid))  # row-major over (X, Y[, Z])
    tokens[flat] = 3 * phrase
    sim = similarity_map(tokens, grid, phrase, size)
    assert sim.shape == size
    peak = np.unravel_index(int(sim.argmax()), size)
    scale = [s // g for s, g in zip(size, grid, strict=True)]
    for p, c, k in zip(peak, cell, scale, strict=True):
        assert c * k <= p < (c + 1) * k
    raw = similarity_map(tokens, grid, phrase, grid)  # no resampling: exact cosines
    expected = torch.zeros(grid)
    expected[cell] = 1.0
    torch.testing.assert_close(raw, expected, atol=1e-5, rtol=0)
    batched = similarity_map(torch.stack([tokens, -tokens]), grid, torch.stack([phrase, phrase]), size)
    assert batched.shape == (2, *size)
    torch.testing.assert_close(batched[0], sim)
    torch.testing.assert_close(batched[1], -sim)
    with pytest.raises(ValueError):
        similarity_map(tokens[:-1], grid, phrase, size)


@pytest.mark.parametrize(
    ("dims", "size", "boxes"),
    [(2, (64, 64), [(8, 8, 16, 20), [(0, 0, 8, 8), (40, 40, 10, 10)]]), (3, (32, 32, 16), [(4, 4, 2, 8, 8, 6)] * 2)],
)
def test_grounding_metrics_model(dims: int, size: tuple[int, ...], boxes: list) -> None:  # type: ignore[type-arg]
    torch.manual_seed(0)
    config = ModelConfig(image_encoder="tiny_vit", spatial_dims=dims, image_size=size, text_num_layers=1, embed_dim=16)
    model = MedVLP(config)
    images = torch.rand(2, 1, *size)
    frame = grounding_metrics(
        model,
        images,
        ["Right pleural effusion.", "Left pneumothorax."],
        boxes,
        ["effusion", "pneumothorax"],
        batch_size=1,
    )
    assert isinstance(frame, pd.DataFrame) and list(frame.columns) == ["phrase", "category", "cnr", "iou", "miou"]
    assert frame["category"].tolist() == ["effusion", "pneumothorax"]
    assert np.isfinite(frame["cnr"]).all() and (frame["cnr"] >= 0).all()
    assert ((frame["iou"] >= 0) & (frame["iou"] <= 1)).all()
    assert model.training  # mode restored
    # the same numbers by hand from the model outputs
    model.eval()
    with torch.no_grad():
        out = model.forward_image(images[:1])
        text = model.encode_text(["Right pleural effusion."])
    sim = similarity_map(out.tokens, out.grid, text, size)[0]
    assert math.isclose(frame["cnr"][0], cnr(sim, box_mask(boxes[0], size)), rel_tol=1e-5)
    assert math.isclose(frame["iou"][0], iou(sim, box_mask(boxes[0], size)), rel_tol=1e-5)


def test_boxes_from_frame() -> None:
    frame = pd.DataFrame({"study": ["a"], "x": [1.0], "y": [2.0], "z": [3.0], "w": [4.0], "h": [5.0], "d": [6.0]})
    assert boxes_from_frame(frame, 3) == [(1.0, 2.0, 3.0, 4.0, 5.0, 6.0)]
    assert boxes_from_frame(frame, 2) == [(1.0, 2.0, 4.0, 5.0)]


def test_a_phrase_with_two_boxes_is_scored_once_against_their_union() -> None:
    from types import SimpleNamespace

    from medvlp.tasks.grounding import grounding_pairs, grounding_summary, miou

    left, right = (4.0, 10.0, 6.0, 8.0), (22.0, 10.0, 6.0, 8.0)  # a bilateral effusion: one phrase, two boxes
    rows = [("st-1", "pleural_effusion", "Bilateral effusions.", *b) for b in (left, right)]
    rows.append(("st-1", "cardiomegaly", "The heart is enlarged.", 12.0, 4.0, 8.0, 8.0))
    rows.append(("st-2", "pleural_effusion", "Bilateral effusions.", *left))  # another study, same words
    frame = pd.DataFrame(rows, columns=["study", "category_name", "label_text", "x", "y", "w", "h"])
    frame_cache = SimpleNamespace(
        grounding=frame,
        spatial_dims=2,
        split=lambda _: pd.DataFrame({"study": ["st-1", "st-2"]}),
    )
    pairs = grounding_pairs(frame_cache, "test")
    assert len(pairs) == 3
    both = pairs[(pairs["study"] == "st-1") & (pairs["finding"] == "pleural_effusion")].iloc[0]
    assert both["boxes"] == [list(left), list(right)]
    sim = np.zeros((32, 32))
    for x, y, w, h in (left, right):  # high in both boxes
        sim[int(x) : int(x + w), int(y) : int(y + h)] = 1.0
    union, one = box_mask(both["boxes"], (32, 32)), box_mask(left, (32, 32))
    assert iou(sim, union) == 1.0 and iou(sim, one) == 0.5  # per box, the other side counted as outside
    assert cnr(sim, union) > cnr(sim, one)
    assert miou(sim, union) == 1.0 and math.isclose(miou(sim, one), 0.5)
    assert miou(np.full((32, 32), 0.25), union) == pytest.approx(2 / 5 * union.sum() / union.size)
    scores = pairs.assign(cnr=[1.0, 2.0, np.inf], iou=[0.5, 0.5, 0.5], miou=[0.2, 0.4, 0.6])
    summary = grounding_summary(scores)
    assert summary["n"] == 3 and summary["n_unscored"] == 1 and summary["mean_cnr"] == 1.5
    assert summary["per_category"]["pleural_effusion"]["n"] == 2


def test_the_control_image_is_one_without_the_finding(cache: CachedCohort) -> None:  # noqa: F811
    pairs = grounding_pairs(cache, "test")
    assert len(pairs), "the fixture cohort has phrase boxes on test"
    controls = control_studies(cache, pairs)
    assert controls == control_studies(cache, pairs), "no seed: the same controls every time"
    test = cache.split("test").set_index("study")
    for (study, finding), control in zip(pairs[["study", "finding"]].itertuples(index=False), controls, strict=True):
        if control is not None:
            assert control != study and test.at[control, finding] == 0
        else:
            assert finding not in test.columns or not (test[finding] == 0).any()


def test_the_control_cnr_is_the_cnr_of_the_same_phrase_on_the_control_image(
    cache: CachedCohort,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from medvlp.tasks import grounding as g

    model = _stage(cache).model
    pairs = grounding_pairs(cache, "test").head(6)
    scores = grounding_scores(model, cache, pairs)
    assert np.isfinite(scores["cnr_control"]).any()
    summary = grounding_summary(scores)
    assert summary["mean_cnr_control"] == pytest.approx(np.nanmean(scores["cnr_control"]))
    # with each pair's own image as its control, the control is the CNR itself
    monkeypatch.setattr(g, "control_studies", lambda cache, pairs, split="test": list(pairs["study"]))
    same = grounding_scores(model, cache, pairs)
    assert np.allclose(same["cnr_control"], same["cnr"], equal_nan=True)
