"""The report-twin term: each image against its own report and that report with one sentence flipped by a rule."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from medvlp.config import AlignStageConfig
from medvlp.data.cache import CachedCohort
from medvlp.data.perturb import mirror_sides, negate, twins
from medvlp.data.reports import text_sentences
from medvlp.losses import ContrastiveLoss, twin_loss
from medvlp.train.loop import run_stage
from tests.train.test_align import CPU, _stage, cache  # noqa: F401  (the module-scoped cohort fixture)


def _unit(*shape: int, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_the_term_is_the_two_way_cross_entropy_of_report_against_twin() -> None:
    img, txt, twin = _unit(5, 8), _unit(5, 8, seed=1), _unit(5, 8, seed=2)
    logits = 10.0 * torch.stack([(img * txt).sum(-1), (img * twin).sum(-1)], dim=1)  # [5, 2]
    expected = F.cross_entropy(logits, torch.zeros(5, dtype=torch.long))
    assert twin_loss(img, txt, twin, 10.0).item() == pytest.approx(expected.item(), rel=1e-6)


def test_an_image_closer_to_its_report_than_to_the_twin_costs_less() -> None:
    img = _unit(4, 8)
    near = F.normalize(img + 0.1 * _unit(4, 8, seed=1), dim=-1)
    far = _unit(4, 8, seed=2)
    assert twin_loss(img, near, far, 10.0).item() < 0.1 < twin_loss(img, far, near, 10.0).item()


def test_masked_rows_do_not_count_and_no_twin_at_all_is_zero() -> None:
    img, txt, twin = _unit(4, 8), _unit(4, 8, seed=1), _unit(4, 8, seed=2)
    mask = torch.tensor([True, False, True, False])
    kept = twin_loss(img[mask], txt[mask], twin[mask], 10.0)
    assert twin_loss(img, txt, twin, 10.0, mask).item() == pytest.approx(kept.item(), rel=1e-6)
    img.requires_grad_(True)
    none = twin_loss(img, txt, twin, 10.0, torch.zeros(4, dtype=torch.bool))
    none.backward()
    assert none.item() == 0.0 and img.grad is not None and torch.isfinite(img.grad).all()
    with pytest.raises(ValueError, match="one shape"):
        twin_loss(img, txt, twin[:2], 10.0)


def test_the_twin_term_needs_rules_and_features() -> None:
    with pytest.raises(ValidationError, match="hard_negatives"):
        AlignStageConfig(steps=1, batch_size=2, lr=1e-3, twin_weight=1.0)
    AlignStageConfig(steps=1, batch_size=2, lr=1e-3, twin_weight=1.0, hard_negatives=["negation"])  # no sentences
    with pytest.raises(ValueError, match="twin_features"):
        ContrastiveLoss(twin_weight=1.0)(_unit(2, 4), _unit(2, 4), 1.0)
    got = ContrastiveLoss(twin_weight=0.5)(_unit(3, 4), _unit(3, 4, seed=1), 5.0, twin_features=_unit(3, 4, seed=2))
    assert got["loss"].item() == pytest.approx((got["contrastive"] + 0.5 * got["twin"]).item(), rel=1e-6)


def test_each_twin_is_its_report_with_one_sentence_flipped_by_a_rule(cache: CachedCohort) -> None:  # noqa: F811
    kinds = ["negation", "laterality", "affirmation"]
    stage = _stage(cache, twin_weight=1.0, hard_negatives=kinds)
    ds = stage.dataset()
    batch = stage.collate([ds[(i, 0)] for i in range(8)])
    assert batch["report_twins"] == stage.collate([ds[(i, 0)] for i in range(8)])["report_twins"], "seeded"
    assert batch["twin_mask"].any()
    for text, twin, has in zip(batch["text"], batch["report_twins"], batch["twin_mask"].tolist(), strict=True):
        if not has:
            assert twin == text
            continue
        old, new = text_sentences(text), text_sentences(twin)
        changed = [(a, b) for a, b in zip(old, new, strict=True) if a != b]
        assert len(changed) == 1 and changed[0][1] in twins(changed[0][0], kinds)
    later = [stage.collate([ds[(i, e)] for i in range(8)])["report_twins"] for e in range(1, 6)]
    assert any(t != batch["report_twins"] for t in later), "other epochs flip other sentences"
    assert batch["extra_tokens"]["input_ids"].shape[0] == 8, "only the twins: no sentence term"


def test_report_sides_swap_every_side_of_a_laterality_twin_and_leave_the_other_rules_alone(
    cache: CachedCohort,  # noqa: F811
) -> None:
    """``twin_sides: report``: the same draw, but a laterality twin swaps every side the report names, so it never
    contradicts itself; a negated or affirmed twin is the one-sentence twin as before."""
    kinds = ["negation", "laterality", "affirmation"]
    ds = _stage(cache, twin_weight=1.0, hard_negatives=kinds).dataset()
    items = [dict(ds[(i, 0)]) for i in range(8)]
    items[0]["text"] = "FINDINGS: Small left pleural effusion. IMPRESSION: Left effusion."
    one = _stage(cache, twin_weight=1.0, hard_negatives=["laterality"]).collate(items)
    whole = _stage(cache, twin_weight=1.0, hard_negatives=["laterality"], twin_sides="report").collate(items)
    assert one["report_twins"][0] == "FINDINGS: Small right pleural effusion. IMPRESSION: Left effusion."
    assert whole["report_twins"][0] == "FINDINGS: Small right pleural effusion. IMPRESSION: Right effusion."
    mixed = _stage(cache, twin_weight=1.0, hard_negatives=kinds, twin_sides="report").collate(items)
    plain = _stage(cache, twin_weight=1.0, hard_negatives=kinds).collate(items)
    assert mixed["twin_mask"].tolist() == plain["twin_mask"].tolist()
    swapped = 0
    for text, a, b in zip(mixed["text"], mixed["report_twins"], plain["report_twins"], strict=True):
        if a != b:  # a laterality draw: the whole report mirrored
            swapped += 1
            assert a == mirror_sides(text) and b != a
    assert swapped >= 1
    with pytest.raises(ValidationError, match="twin_sides"):
        AlignStageConfig(
            steps=1, batch_size=2, lr=1e-3, twin_weight=1.0, hard_negatives=["negation"], twin_sides="report"
        )


def test_a_report_with_nothing_to_flip_is_masked(cache: CachedCohort) -> None:  # noqa: F811
    stage = _stage(cache, twin_weight=1.0, hard_negatives=["negation"])
    item = dict(stage.dataset()[(0, 0)])
    item["text"] = "No pneumothorax. Heart size is normal."
    batch = stage.collate([item, stage.dataset()[(1, 0)]])
    assert batch["twin_mask"][0].item() is False and batch["report_twins"][0] == item["text"]


def test_training_with_sentences_and_report_twins_logs_both_and_moves_the_text_tower(
    cache: CachedCohort,  # noqa: F811
    tmp_path: Path,
) -> None:
    stage = _stage(cache, steps=3, sentence_weight=1.0, twin_weight=1.0, hard_negatives=["negation", "laterality"])
    batch = stage.collate([stage.dataset()[(i, 0)] for i in range(4)])
    assert batch["extra_tokens"]["input_ids"].shape[0] == 12, "sentences, their twins, then the report twins"
    before = {n: p.detach().clone() for n, p in stage.model.text_encoder.named_parameters()}
    run_stage(stage, tmp_path, CPU, seed=0)
    logged = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    terms = [r for r in logged if "twin" in r]
    assert terms and all("sentence" in r and torch.isfinite(torch.tensor(r["twin"])) for r in terms)
    assert any(not torch.equal(p, before[n]) for n, p in stage.model.text_encoder.named_parameters())


def test_the_sentence_twin_term_scores_the_drawn_sentence_alone_against_its_twin(
    cache: CachedCohort,  # noqa: F811
    tmp_path: Path,
) -> None:
    """``twin_sentence_weight``: the same draw as the report twin, but the two sentences alone enter the term (the
    robustness suite's form), after the report twins in the extra texts; it trains and is logged beside them."""
    kinds = ["negation", "laterality", "affirmation"]
    both = _stage(cache, steps=3, twin_weight=1.0, twin_sentence_weight=1.0, hard_negatives=kinds)
    ds = both.dataset()
    batch = both.collate([ds[(i, 0)] for i in range(8)])
    report_only = _stage(cache, twin_weight=1.0, hard_negatives=kinds).collate([ds[(i, 0)] for i in range(8)])
    assert batch["report_twins"] == report_only["report_twins"], "the same draw"
    for text, twin, (sentence, flipped), has in zip(
        batch["text"], batch["report_twins"], batch["twin_sentences"], batch["twin_mask"].tolist(), strict=True
    ):
        if has:
            assert sentence in text_sentences(text) and flipped in twins(sentence, kinds)
            assert twin == text.replace(sentence, flipped, 1)
    n = 8 * 3  # the report twins, the drawn sentences, their twins
    assert batch["extra_tokens"]["input_ids"].shape[0] == n
    alone = _stage(cache, twin_sentence_weight=1.0, hard_negatives=kinds).collate([ds[(i, 0)] for i in range(8)])
    assert "report_twins" not in alone and alone["extra_tokens"]["input_ids"].shape[0] == 16
    run_stage(both, tmp_path, CPU, seed=0)
    logged = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    terms = [r for r in logged if "twin_sentence" in r]
    assert terms and all("twin" in r and torch.isfinite(torch.tensor(r["twin_sentence"])) for r in terms)


def test_the_sentence_twin_loss_is_the_twin_loss_of_the_pair() -> None:
    img, sentence, twin = _unit(3, 4), _unit(3, 4, seed=1), _unit(3, 4, seed=2)
    mask = torch.tensor([True, False, True])
    got = ContrastiveLoss(twin_sentence_weight=2.0)(
        img, _unit(3, 4, seed=3), 5.0, twin_sentences=(sentence, twin), twin_mask=mask
    )
    assert got["twin_sentence"].item() == pytest.approx(twin_loss(img, sentence, twin, 5.0, mask).item(), rel=1e-6)
    assert got["loss"].item() == pytest.approx((got["contrastive"] + 2.0 * got["twin_sentence"]).item(), rel=1e-6)
    with pytest.raises(ValueError, match="twin_sentences"):
        ContrastiveLoss(twin_sentence_weight=1.0)(img, sentence, 1.0)
    with pytest.raises(ValidationError, match="twin_sentence_weight > 0 needs hard_negatives"):
        AlignStageConfig(steps=1, batch_size=2, lr=1e-3, twin_sentence_weight=1.0)


def test_twin_sentence_text_only_trains_the_text_side_and_leaves_the_image_to_the_other_terms() -> None:
    """``twin_sentence_text_only``: the same value, but no gradient reaches the image features through the sentence
    twin term; the sentences still get theirs, and the report-level terms still reach the image."""
    mask = torch.tensor([True, False, True])

    def grads(text_only: bool) -> tuple[torch.Tensor, ...]:
        img, report = _unit(3, 4).requires_grad_(), _unit(3, 4, seed=3).requires_grad_()
        sentence, twin = _unit(3, 4, seed=1).requires_grad_(), _unit(3, 4, seed=2)
        loss = ContrastiveLoss(twin_sentence_weight=1.0, twin_sentence_text_only=text_only)
        terms = loss(img, report, 5.0, twin_sentences=(sentence, twin), twin_mask=mask)
        (g_img_term, g_sentence) = torch.autograd.grad(
            terms["twin_sentence"], (img, sentence), allow_unused=True, retain_graph=True
        )
        (g_img_all,) = torch.autograd.grad(terms["loss"], (img,))
        zero = torch.zeros_like(img)
        return (terms["twin_sentence"].detach(), zero if g_img_term is None else g_img_term, g_sentence, g_img_all)

    value, g_img, g_sentence, _ = grads(False)
    value_text, g_img_text, g_sentence_text, g_all_text = grads(True)
    assert value_text.item() == pytest.approx(value.item(), rel=1e-6), "the same term"
    assert g_img.abs().sum() > 0 and g_img_text.abs().sum() == 0, "the image is detached from the term"
    torch.testing.assert_close(g_sentence_text, g_sentence)  # the text side learns as before
    assert g_all_text.abs().sum() > 0, "the contrastive term still trains the image"
    with pytest.raises(ValidationError, match="twin_sentence_text_only acts on the sentence twin term"):
        AlignStageConfig(steps=1, batch_size=2, lr=1e-3, twin_sentence_text_only=True)


def test_twin_sentence_kinds_keeps_the_pairs_of_those_rules_in_the_sentence_twin_term(
    cache: CachedCohort,  # noqa: F811
    tmp_path: Path,
) -> None:
    """``twin_sentence_kinds: [laterality]``: the same draw, but only the side-swapped pairs enter the sentence twin
    term (its mask), while the report twin term keeps every rule's twin; the term trains and is logged."""
    kinds = ["negation", "laterality", "affirmation"]
    stage = _stage(
        cache,
        steps=3,
        twin_weight=1.0,
        twin_sentence_weight=1.0,
        hard_negatives=kinds,
        twin_sentence_kinds=["laterality"],
    )
    ds = stage.dataset()
    batch = stage.collate([ds[(i, 0)] for i in range(16)])
    every = _stage(cache, twin_weight=1.0, twin_sentence_weight=1.0, hard_negatives=kinds).collate(
        [ds[(i, 0)] for i in range(16)]
    )
    assert batch["twin_sentences"] == every["twin_sentences"] and "twin_sentence_mask" not in every, "the same draw"
    chosen, has = batch["twin_sentence_mask"].tolist(), batch["twin_mask"].tolist()
    for (sentence, twin), keep, drawn in zip(batch["twin_sentences"], chosen, has, strict=True):
        assert keep == (drawn and twin in twins(sentence, ["laterality"]))
    assert any(chosen) and not all(c == h for c, h in zip(chosen, has, strict=True)), "some pairs kept, some not"
    img, sentence, twin = _unit(4, 4), _unit(4, 4, seed=1), _unit(4, 4, seed=2)
    rows, only = torch.tensor([True, True, True, False]), torch.tensor([True, False, False, False])
    got = ContrastiveLoss(twin_sentence_weight=1.0)(
        img, _unit(4, 4, seed=3), 5.0, twin_sentences=(sentence, twin), twin_mask=rows, twin_sentence_mask=only
    )
    assert got["twin_sentence"].item() == pytest.approx(twin_loss(img, sentence, twin, 5.0, only).item(), rel=1e-6)
    run_stage(stage, tmp_path, CPU, seed=0)
    logged = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert any("twin_sentence" in r and torch.isfinite(torch.tensor(r["twin_sentence"])) for r in logged)
    with pytest.raises(ValidationError, match="twin_sentence_kinds"):
        AlignStageConfig(
            steps=1,
            batch_size=2,
            lr=1e-3,
            twin_sentence_weight=1.0,
            hard_negatives=["negation"],
            twin_sentence_kinds=["laterality"],
        )


def test_twin_absence_pairs_a_negated_training_phrase_with_it_on_an_image_labelled_without_the_finding(
    cache: CachedCohort,  # noqa: F811
) -> None:
    """``twin_absence``: the draw also holds a training phrase of a finding the study is labelled without, paired as
    (its negation, the phrase); the report's twin is then the report with the phrase added. Off, the draw is as it
    was."""
    kinds = ["negation", "laterality", "affirmation"]
    stage = _stage(cache, twin_weight=1.0, twin_sentence_weight=1.0, hard_negatives=kinds, twin_absence=True)
    pool = stage.absence_phrases
    assert pool and all(negate(p) is not None for ps in pool.values() for p in ps)
    train = set(cache.split("train")["study"])
    known = set(cache.grounding.loc[cache.grounding["study"].isin(train), "label_text"])
    assert {p for ps in pool.values() for p in ps} <= known, "training phrases only"
    ds = stage.dataset()
    items = [ds[(i, e)] for e in range(4) for i in range(8)]
    batch = stage.collate(items)
    absent = 0
    phrases = {p: j for j, ps in pool.items() for p in ps}
    for item, text, twin, (sentence, flipped) in zip(
        items, batch["text"], batch["report_twins"], batch["twin_sentences"], strict=True
    ):
        if sentence not in text_sentences(text) and flipped in phrases:
            absent += 1
            assert item["labels"][phrases[flipped]] == 0, "only on an image labelled without the finding"
            assert sentence == negate(flipped) and twin == f"{text.rstrip()} {flipped}"
    assert absent >= 1
    plain = _stage(cache, twin_weight=1.0, twin_sentence_weight=1.0, hard_negatives=kinds)
    assert plain.absence_phrases == {}
    off = plain.collate(items)
    assert all(s in text_sentences(t) or s == t for (s, _), t in zip(off["twin_sentences"], off["text"], strict=True))
    stage.absence_phrases = {}  # nothing to draw: the same draw as without the switch (no random number spent)
    assert stage.collate(items)["report_twins"] == off["report_twins"]
    with pytest.raises(ValidationError, match="twin_absence"):
        AlignStageConfig(
            steps=1, batch_size=2, lr=1e-3, twin_weight=1.0, hard_negatives=["laterality"], twin_absence=True
        )
