"""Sentence-level alignment with rule-made hard negatives: the loss term, the stage's draws and a training run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from medvlp.config import AlignStageConfig
from medvlp.data.cache import CachedCohort
from medvlp.data.perturb import negate, swap_laterality, twins
from medvlp.data.reports import normalize_report, text_sentences
from medvlp.losses import ContrastiveLoss, clip_loss, sentence_alignment_loss
from medvlp.train.loop import run_stage
from tests.train.test_align import CPU, _stage, cache  # noqa: F401  (the module-scoped cohort fixture)


def _unit(*shape: int, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_one_positive_per_row_is_the_clip_loss() -> None:
    img, txt = _unit(6, 8), _unit(6, 8, seed=1)
    got = sentence_alignment_loss(img, txt, 10.0, torch.eye(6, dtype=torch.bool))
    assert got.item() == pytest.approx(clip_loss(img, txt, 10.0).item(), rel=1e-6)


def test_a_shared_sentence_is_a_positive_for_every_report_that_states_it() -> None:
    img, txt = _unit(4, 8), _unit(4, 8, seed=1)
    img[1] = txt[0]  # image 1's report also states sentence 0 ("No pneumothorax."), and its image is close to it
    eye = torch.eye(4, dtype=torch.bool)
    shared = eye.clone()
    shared[1, 0] = True
    assert sentence_alignment_loss(img, txt, 10.0, shared).item() < sentence_alignment_loss(img, txt, 10.0, eye).item()
    logits = 10.0 * img @ txt.T
    target = shared.float() / shared.sum(1, keepdim=True)
    image_ce = -(target * logits.log_softmax(1)).sum(1).mean()
    text_ce = -(shared.T.float() / shared.T.sum(1, keepdim=True) * logits.T.log_softmax(1)).sum(1).mean()
    got = sentence_alignment_loss(img, txt, 10.0, shared)
    assert got.item() == pytest.approx(((image_ce + text_ce) / 2).item(), rel=1e-6)


def test_a_hard_negative_twin_raises_the_loss_only_where_it_is_unmasked() -> None:
    img, txt = _unit(4, 8), _unit(4, 8, seed=1)
    eye = torch.eye(4, dtype=torch.bool)
    base = sentence_alignment_loss(img, txt, 10.0, eye)
    twin = F.normalize(img + 0.1 * _unit(4, 8, seed=2), dim=-1)  # twins that look like the image: hard
    none = torch.zeros(4, dtype=torch.bool)
    assert sentence_alignment_loss(img, txt, 10.0, eye, twin, none).item() == pytest.approx(base.item(), rel=1e-6)
    hard = sentence_alignment_loss(img, txt, 10.0, eye, twin, torch.ones(4, dtype=torch.bool))
    assert hard.item() > base.item() + 0.1
    assert torch.isfinite(hard)


def test_twins_follow_the_named_rules() -> None:
    s = "Small left pleural effusion."
    assert twins(s, ["negation"]) == [negate(s)]
    assert twins(s, ["laterality"]) == [swap_laterality(s)] == ["Small right pleural effusion."]
    assert twins("No pneumothorax.", ["negation", "laterality"]) == []
    assert twins("No pneumothorax.", ["negation", "affirmation"]) == ["Pneumothorax."]
    with pytest.raises(ValueError, match="unknown perturbations"):
        twins(s, ["shuffle"])


def test_hard_negatives_need_the_sentence_term() -> None:
    with pytest.raises(ValidationError, match="sentence_weight"):
        AlignStageConfig(steps=1, batch_size=2, lr=1e-3, hard_negatives=["negation"])
    with pytest.raises(ValidationError):
        AlignStageConfig(steps=1, batch_size=2, lr=1e-3, sentence_weight=1.0, hard_negatives=["reverse"])
    with pytest.raises(ValueError, match="sentence_features"):
        ContrastiveLoss(sentence_weight=1.0)(_unit(2, 4), _unit(2, 4), 1.0)


def test_the_stage_draws_a_sentence_of_each_report_seeded_by_epoch_and_study(cache: CachedCohort) -> None:  # noqa: F811
    stage = _stage(cache, sentence_weight=1.0, hard_negatives=["negation", "laterality"])
    ds = stage.dataset()
    keys = [(i, 0) for i in range(8)]
    batch = stage.collate([ds[k] for k in keys])
    again = stage.collate([ds[k] for k in keys])
    assert batch["sentences"] == again["sentences"], "a pure function of (seed, epoch, study)"
    later = [stage.collate([ds[(i, e)] for i in range(8)])["sentences"] for e in range(1, 6)]
    assert any(s != batch["sentences"] for s in later), "other epochs draw other sentences"
    pos = batch["sentence_positives"]
    assert pos.diagonal().all()
    for i, (text, sentence) in enumerate(zip(batch["text"], batch["sentences"], strict=True)):
        own = {normalize_report(x) for x in text_sentences(text)}
        assert normalize_report(sentence) in own
        for j, other in enumerate(batch["sentences"]):
            assert bool(pos[i, j]) == (normalize_report(other) in own)
    n = len(batch["sentences"])
    twins_of = stage.model.text_encoder.tokenize(batch["sentences"])["input_ids"].shape[0]
    assert batch["extra_tokens"]["input_ids"].shape[0] == 2 * twins_of == 2 * n
    assert batch["hard_mask"].dtype == torch.bool


def test_a_twin_the_report_itself_states_is_masked(cache: CachedCohort) -> None:  # noqa: F811
    stage = _stage(cache, sentence_weight=1.0, hard_negatives=["laterality"])
    item = dict(stage.dataset()[(0, 0)])
    item["text"] = "Small left pleural effusion. Small right pleural effusion."
    batch = stage.collate([item, stage.dataset()[(1, 0)]])
    assert batch["hard_mask"][0].item() is False


def test_training_with_sentences_and_twins_logs_the_term_and_moves_the_text_tower(
    cache: CachedCohort,  # noqa: F811
    tmp_path: Path,
) -> None:
    stage = _stage(cache, steps=3, sentence_weight=1.0, hard_negatives=["negation", "laterality"])
    before = {n: p.detach().clone() for n, p in stage.model.text_encoder.named_parameters()}
    run_stage(stage, tmp_path, CPU, seed=0)
    logged = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    terms = [r for r in logged if "sentence" in r]
    assert terms and all(torch.isfinite(torch.tensor(r["sentence"])) for r in terms)
    moved = [n for n, p in stage.model.text_encoder.named_parameters() if not torch.equal(p, before[n])]
    assert moved
