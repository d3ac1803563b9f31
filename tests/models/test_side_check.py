"""The side check scores a one-sided affirmative sentence by where its finding lights up the image tokens and leaves
every other text's score as it was; fitted on a cohort whose images show the side, it makes each image prefer its own
side's sentence over the twins, and it survives the folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from medvlp.models import MedVLP
from medvlp.models.side_check import SideCheck, checked_sides, half_difference
from medvlp.tasks.embed import score_pairs
from medvlp.tasks.side_check import SIDE_CHECK_RECORD, STRENGTHS, checked_sentences, fit_side_check

from .side_cohort import side_cohort, tiny_model_dir


def test_checked_sides_are_one_affirmative_sentence_naming_one_side() -> None:
    texts = [
        "Small left pleural effusion.",
        "Right apical pneumothorax.",
        "No left pleural effusion.",  # negated
        "Possible right pneumothorax.",  # hedged
        "Effusions on the left and the right.",  # both sides
        "Small left effusion. The heart is normal.",  # two sentences
        "The heart is enlarged.",  # no side
    ]
    assert checked_sides(texts).tolist() == [1.0, -1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    rows, sentences, sides = checked_sentences(["Left effusion. No right pneumothorax.", "Heart normal. Right nodule."])
    assert rows == [0, 1] and sentences == ["Left effusion.", "Right nodule."] and sides.tolist() == [1.0, -1.0]


def test_half_difference_compares_the_halves_of_one_axis_and_leaves_an_odd_middle_out() -> None:
    grid = (3, 2)
    values = torch.zeros(1, 3, 2)
    values[0, 2, 0] = 0.9  # the upper half of axis 0
    values[0, 1, 1] = 5.0  # the middle row of an odd axis: in neither half
    flat = values.reshape(1, -1)
    assert half_difference(flat, grid, 0).item() == pytest.approx(0.9)
    assert half_difference(flat, grid, 1).item() == pytest.approx(5.0 - 0.9)  # axis 1: column 1 is the upper half
    with pytest.raises(ValueError, match="fewer than two rows"):
        half_difference(torch.zeros(1, 3), (1, 3), 0)


def test_the_term_acts_on_checked_texts_only_and_flips_with_the_side() -> None:
    check = SideCheck(axis=0)
    tokens = torch.zeros(3, 4, 2)
    tokens[:, 2:, 0] = 1.0  # the upper half of a (4, 1) grid is along the topic, the lower half orthogonal
    tokens[:, :2, 1] = 1.0
    texts = ["Small left effusion.", "Small right effusion.", "No effusion."]
    encode = lambda more: torch.tensor([[1.0, 0.0]] * len(more))  # noqa: E731 every topic along axis 0
    assert torch.equal(check(texts, tokens, (4, 1), encode), torch.zeros(3))  # strength 0: no term
    check.set(orientation=1.0, strength=0.5)
    term = check(texts, tokens, (4, 1), encode)
    assert term.tolist() == pytest.approx([0.5, -0.5, 0.0])
    check.set(orientation=-1.0, strength=0.5)  # the lower half is the patient's left
    assert check(texts, tokens, (4, 1), encode).tolist() == pytest.approx([-0.5, 0.5, 0.0])


@pytest.fixture()
def model_dir(tmp_path: Path) -> Path:
    return tiny_model_dir(tmp_path / "model")


def test_fit_writes_a_check_with_which_each_image_prefers_its_own_side(model_dir: Path) -> None:
    cache = side_cohort(24, seed=0)
    before = MedVLP.from_pretrained(model_dir)
    record = fit_side_check(model_dir, cache, ["findings"])
    assert record is not None and record["train_sentences"] == 24 and record["val_sentences"] == 24
    assert record["axis"] == 0 and record["orientation"] in (1.0, -1.0) and record["strength"] in STRENGTHS
    assert record["strength"] > 0 and record["train_agreement"] > 0.9
    val = record["val_accuracy"]
    assert val[str(record["strength"])]["laterality"] > val["0.0"]["laterality"]
    assert json.loads((model_dir / SIDE_CHECK_RECORD).read_text()) == record
    after = MedVLP.from_pretrained(model_dir)  # the check is in the folder's weights and config
    assert after.config.side_check_axis == 0
    assert float(after.side_check.strength) == pytest.approx(record["strength"])
    studies = ["val-1", "val-1", "val-1", "val-1"]
    texts = ["Small left pleural effusion.", "Small right pleural effusion.", "No pleural effusion.", "Heart normal."]
    plain, checked = score_pairs(before, cache, studies, texts), score_pairs(after, cache, studies, texts)
    assert torch.equal(plain[2:], checked[2:])  # no check on a negated or side-free text
    assert checked[0] - checked[1] > plain[0] - plain[1]  # the image's own side gains on its twin
    embedded = ["Small left pleural effusion."]
    torch.testing.assert_close(after.encode_text(embedded), before.encode_text(embedded), rtol=0, atol=0)
    weights = {k: v.clone() for k, v in after.state_dict().items()}
    assert fit_side_check(model_dir, cache, ["findings"]) == record  # a refit reads the model without its check
    again = MedVLP.from_pretrained(model_dir).state_dict()
    assert all(torch.equal(weights[k], again[k]) for k in weights)


def test_no_check_without_enough_sentences_or_a_known_left_right_axis(model_dir: Path) -> None:
    config = (model_dir / "config.json").read_text()
    assert fit_side_check(model_dir, side_cohort(6, seed=1), ["findings"]) is None  # 3 of each side per split
    assert fit_side_check(model_dir, side_cohort(24, seed=1, spatial_dims=3), ["findings"]) is None  # no orientation
    assert (model_dir / "config.json").read_text() == config and not (model_dir / SIDE_CHECK_RECORD).exists()


def test_a_folder_with_the_check_in_its_config_but_not_its_weights_loads_without_it(model_dir: Path) -> None:
    cache = side_cohort(24, seed=0)
    weights = (model_dir / "model.safetensors").read_bytes()
    fit_side_check(model_dir, cache, ["findings"])
    (model_dir / "model.safetensors").write_bytes(weights)  # old weights, new config
    assert MedVLP.from_pretrained(model_dir).side_check is None


def test_a_training_config_cannot_set_the_fitted_check() -> None:
    from medvlp.config import load_config

    with pytest.raises(ValueError, match=r"stages\.stage2-align\.side_check: true"):
        load_config(None, ["model.side_check_axis=0"])
    assert load_config(None, ["stages.stage2-align.side_check=true"]).stages.stage2_align.side_check is True


def test_a_side_check_axis_outside_the_image_is_a_clear_error() -> None:
    from medvlp.models import ModelConfig

    with pytest.raises(ValueError, match="side_check_axis 2 is not an axis of a 2D image"):
        ModelConfig(image_encoder="tiny_vit", spatial_dims=2, image_size=(32, 32), side_check_axis=2)
