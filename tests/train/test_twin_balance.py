"""``twin_sentence_balance``: the sentence twin term weighs its statement-wins and denial-wins pairs equally."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from medvlp.config import AlignStageConfig
from medvlp.data.cache import CachedCohort
from medvlp.data.perturb import polarity, twins
from medvlp.losses import twin_loss
from medvlp.train.stages.align import balanced_weights
from tests.train.test_align import _stage, cache  # noqa: F401  (the module-scoped cohort fixture)

STATEMENT = ("Small left pleural effusion.", "No left pleural effusion.")  # the statement must win
DENIAL = ("No pneumothorax.", "Pneumothorax.")  # the denial must win
SIDE = ("Small left pleural effusion.", "Small right pleural effusion.")  # neither way


def _unit(*shape: int, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_float_weights_give_the_weighted_mean_of_the_rows() -> None:
    img, txt, twin = _unit(4, 8), _unit(4, 8, seed=1), _unit(4, 8, seed=2)
    per = torch.stack([twin_loss(img[i : i + 1], txt[i : i + 1], twin[i : i + 1], 10.0) for i in range(4)])
    weights = torch.tensor([2.0, 0.0, 0.5, 0.0])
    expected = (per * weights).sum() / weights.sum()
    assert twin_loss(img, txt, twin, 10.0, weights).item() == pytest.approx(expected.item(), rel=1e-6)
    img.requires_grad_(True)
    none = twin_loss(img, txt, twin, 10.0, torch.zeros(4))
    none.backward()
    assert none.item() == 0.0 and torch.isfinite(img.grad).all()


def test_balanced_weights_give_each_way_of_no_half_of_their_weight() -> None:
    pairs = [STATEMENT, DENIAL, DENIAL, DENIAL, DENIAL, SIDE, STATEMENT]
    rows = torch.tensor([True, True, True, True, True, True, False])
    w = balanced_weights(pairs, rows)
    ways = torch.tensor([polarity(*p) for p in pairs])
    assert w[6] == 0.0, "a row left out weighs nothing, whatever its way"
    assert w[5] == 1.0, "a side pair keeps its weight"
    kept = rows & (ways != 0)
    assert w[kept & (ways == 1)].sum() == pytest.approx(w[kept & (ways == -1)].sum())
    assert w[kept].sum() == pytest.approx(int(kept.sum())), "the two ways keep their total weight"
    one_way = balanced_weights([DENIAL, DENIAL, SIDE], torch.tensor([True, True, True]))
    assert one_way.tolist() == [1.0, 1.0, 1.0], "nothing to balance against: the plain mean"


def test_the_stage_weighs_its_drawn_pairs_by_their_way(cache: CachedCohort) -> None:  # noqa: F811
    kinds = ["negation", "laterality", "affirmation"]
    cfg = {"twin_weight": 1.0, "twin_sentence_weight": 1.0, "hard_negatives": kinds, "batch_size": 16}
    plain, balanced = _stage(cache, **cfg), _stage(cache, twin_sentence_balance=True, **cfg)
    items = [plain.dataset()[(i, 0)] for i in range(16)]
    off, on = plain.collate(items), balanced.collate(items)
    assert "twin_sentence_mask" not in off and on["twin_sentences"] == off["twin_sentences"], "the same draw"
    weights, ways = on["twin_sentence_mask"], torch.tensor([polarity(*p) for p in on["twin_sentences"]])
    assert weights.dtype == torch.float32 and (weights[~off["twin_mask"]] == 0).all()
    yes, no = off["twin_mask"] & (ways == 1), off["twin_mask"] & (ways == -1)
    assert yes.any() and no.any() and int(no.sum()) != int(yes.sum()), "the fixture's draw holds both ways, unequally"
    assert weights[yes].sum() == pytest.approx(weights[no].sum())
    out = balanced.training_forward(balanced.module(), on, 0)
    assert torch.isfinite(out["twin_sentence"]) and out["twin_sentence"] > 0
    with pytest.raises(ValidationError, match="twin_sentence_balance"):
        AlignStageConfig(
            steps=1, batch_size=2, lr=1e-3, twin_weight=1.0, hard_negatives=kinds, twin_sentence_balance=True
        )


def test_twin_sentence_kinds_names_the_absence_pairs_apart_from_the_rules(cache: CachedCohort) -> None:  # noqa: F811
    """``twin_sentence_kinds`` with ``absence``: twin_absence's pairs enter the sentence twin term (and the balance)
    beside the named rules' pairs; without it they stay out, whatever rule might also have made them."""
    kinds = ["negation", "laterality", "affirmation"]
    cfg = {"twin_weight": 1.0, "twin_sentence_weight": 1.0, "hard_negatives": kinds, "twin_absence": True}
    polar = ["negation", "affirmation"]
    with_absence = _stage(cache, twin_sentence_kinds=[*polar, "absence"], **cfg)
    without = _stage(cache, twin_sentence_kinds=polar, **cfg)
    items = [with_absence.dataset()[(i, e)] for e in range(2) for i in range(8)]
    on, off = with_absence.collate(items), without.collate(items)
    assert on["twin_sentences"] == off["twin_sentences"], "the same draw"
    absent = with_absence._report_twins(on)[3]
    assert any(absent) and not all(absent)
    for (sentence, twin), away, has, keep, kept in zip(
        on["twin_sentences"], absent, on["twin_mask"], on["twin_sentence_mask"], off["twin_sentence_mask"], strict=True
    ):
        if away:
            assert has and keep and not kept and polarity(sentence, twin) == -1
        else:
            assert keep == kept == (bool(has) and twin in [t for k in polar for t in twins(sentence, [k])])
    with pytest.raises(ValidationError, match="twin_sentence_kinds"):
        AlignStageConfig(
            steps=1, **(cfg | {"twin_absence": False}), batch_size=2, lr=1e-3, twin_sentence_kinds=["absence"]
        )
