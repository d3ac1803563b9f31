"""The phrase-box term: the loss, the boxes that ride along the augmentation, and a training run that uses them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medvlp.data.cache import CachedCohort
from medvlp.losses import box_grounding_loss
from medvlp.losses.terms import box_cells
from medvlp.tasks.grounding import box_mask, grounding_pairs, similarity_map
from medvlp.train.data import CachedImages
from medvlp.train.loop import run_stage
from tests.train.test_align import CPU, _stage, cache  # noqa: F401  (the module-scoped cohort fixture)


def _unit(*shape: int, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_box_cells_follow_the_similarity_maps_token_order() -> None:
    # a token lit alone in the similarity map upsamples onto the cell box_cells gives a box in that corner
    grid, size = (4, 4, 2), (16, 16, 8)
    mask = torch.from_numpy(box_mask((12.2, 1.0, 5.0, 2.0, 2.0, 2.0), size))[None]
    cells = box_cells(mask, grid)[0]
    assert cells.sum() == 1
    tokens = torch.zeros(1, 32, 2)
    tokens[0, cells.nonzero()[0, 0], 0] = 1.0
    upsampled = similarity_map(tokens, grid, torch.tensor([[1.0, 0.0]]), size)[0]
    assert upsampled[mask[0]].mean() > 0.5 > upsampled[~mask[0]].mean()


def test_the_loss_falls_when_the_phrase_matches_the_tokens_in_its_box() -> None:
    grid, size = (4, 4), (8, 8)
    tokens, phrase = _unit(3, 16, 8), _unit(3, 8, seed=1)
    masks = torch.from_numpy(
        np.stack([box_mask((0, 0, 2, 2), size), box_mask((4, 6, 2, 2), size), box_mask((2, 2, 4, 2), size)])
    )
    base = box_grounding_loss(tokens, phrase, masks, grid, 10.0)
    aligned = tokens.clone()
    inside = box_cells(masks, grid)
    aligned[inside] = phrase[inside.nonzero()[:, 0]]  # every token in a phrase's box now equals the phrase
    assert box_grounding_loss(aligned, phrase, masks, grid, 10.0).item() < base.item() - 0.5
    # softmax over the grid: with uniform similarities the loss is log(N / tokens in the box)
    flat = torch.zeros(3, 16, 8)
    flat[..., 0] = 1.0
    got = box_grounding_loss(F.normalize(flat, dim=-1), F.normalize(flat[:, 0], dim=-1), masks, grid, 10.0)
    expected = np.mean([np.log(16 / 1), np.log(16 / 1), np.log(16 / 2)])
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_a_phrase_without_a_covered_token_does_not_count() -> None:
    tokens, phrase = _unit(2, 16, 8), _unit(2, 8, seed=1)
    masks = torch.zeros(2, 8, 8, dtype=torch.bool)
    masks[0, :2, :2] = True  # row 1 has lost its boxes (moved off the image by the augmentation)
    one = box_grounding_loss(tokens[:1], phrase[:1], masks[:1], (4, 4), 10.0)
    assert box_grounding_loss(tokens, phrase, masks, (4, 4), 10.0).item() == pytest.approx(one.item(), rel=1e-6)
    none = box_grounding_loss(tokens, phrase, torch.zeros_like(masks), (4, 4), 10.0)
    assert none.item() == 0.0
    with pytest.raises(ValueError, match="one row per phrase"):
        box_grounding_loss(tokens, phrase[:1], masks, (4, 4), 10.0)


def test_boxes_ride_along_the_augmentation(cache: CachedCohort) -> None:  # noqa: F811
    plain = CachedImages(cache, "train", boxes=True, views=0, seed=0)
    moved = CachedImages(cache, "train", boxes=True, views=1, seed=0)
    annotated = [i for i in range(len(plain)) if plain.records.at[i, "study"] in (plain.phrases or {})]
    assert annotated, "the fixture cohort has grounding boxes on train"
    ious = []
    for i in annotated[:8]:
        item = plain[(i, 0)]
        pairs = grounding_pairs(cache, "train")
        own = pairs[(pairs.study == plain.records.at[i, "study"]) & (pairs.phrase == item["box_phrase"])]
        expected = box_mask(own.iloc[0]["boxes"], item["image"].shape[1:])
        assert torch.equal(item["box_mask"], torch.from_numpy(expected)), "without augmentation: the boxes as they are"
        assert item["image"].shape[0] == 1, "the box channel leaves the image"
        # with the box mask as the image itself, the augmented image and the augmented mask must coincide
        moved.image = lambda k, m=item["box_mask"]: m[None].float()  # type: ignore[method-assign]
        out = moved[(i, 3)]
        same, union = (out["image"][0] > 0.5) & out["box_mask"], (out["image"][0] > 0.5) | out["box_mask"]
        ious.append(float(same.sum() / union.sum()) if union.any() else 1.0)
    assert min(ious) > 0.9
    study = plain.records.at[annotated[0], "study"]
    draws = {plain[(annotated[0], e)]["box_phrase"] for e in range(6)}
    assert draws <= {phrase for phrase, _ in plain.phrases[study]}
    again = CachedImages(cache, "train", boxes=True, views=0, seed=0)
    assert [again[(i, 5)]["box_phrase"] for i in annotated] == [plain[(i, 5)]["box_phrase"] for i in annotated]


def test_training_with_boxes_logs_the_term_and_moves_the_image_tower(
    cache: CachedCohort,  # noqa: F811
    tmp_path: Path,
) -> None:
    stage = _stage(cache, steps=3, box_weight=1.0)
    items = [stage.dataset()[(i, 0)] for i in range(6)]
    batch = stage.collate(items)
    k = len(batch["box_phrases"])
    assert k == sum(it["box_phrase"] is not None for it in items) and k > 0
    assert batch["extra_tokens"]["input_ids"].shape[0] == k and batch["box_masks"].shape[0] == k
    terms = stage.training_forward(stage.module(), batch, 0)
    assert torch.isfinite(terms["box"]) and terms["box"].item() > 0
    before = {n: p.detach().clone() for n, p in stage.model.image_encoder.named_parameters()}
    run_stage(stage, tmp_path, CPU, seed=0)
    logged = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r for r in logged if "box" in r], "the box term is logged"
    assert any(not torch.equal(p, before[n]) for n, p in stage.model.image_encoder.named_parameters())


def test_without_text_grad_the_box_term_leaves_the_text_tower_alone(cache: CachedCohort) -> None:  # noqa: F811
    for text_grad in (True, False):
        stage = _stage(cache, steps=1, box_weight=1.0, box_text_grad=text_grad)
        batch = stage.collate([stage.dataset()[(i, 0)] for i in range(6)])
        out = stage.module()(batch["image"], *stage._tokens(batch, torch.device("cpu")))
        stage.model.zero_grad()
        stage._box_term(out, batch, text_grad).backward()
        text = [p.grad for p in stage.model.text_encoder.parameters() if p.requires_grad]
        image = [p.grad for p in stage.model.image_encoder.parameters()]
        assert any(g is not None and g.abs().sum() > 0 for g in image)
        assert any(g is not None and g.abs().sum() > 0 for g in text) is text_grad


def test_box_weight_on_a_cohort_without_boxes_says_so(
    cache: CachedCohort,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(cache, "grounding", cache.grounding.iloc[:0])
    stage = _stage(cache, box_weight=1.0)
    with caplog.at_level("WARNING"):
        item = stage.dataset()[(0, 0)]
    assert "has no phrase boxes" in caplog.text
    assert item["box_phrase"] is None and not item["box_mask"].any(), "the study itself is kept, without a phrase"
