"""The side edit moves a text that names a side along the image's side direction and leaves every other text as it was;
fitted on a cohort whose images show the side, it makes each image prefer its own side, and it survives the folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medvlp.models import MedVLP
from medvlp.models.side_edit import SideEdit
from medvlp.tasks.side_edit import SIDE_EDIT_RECORD, fit_side_edit, one_sided_sentences

from .side_cohort import side_cohort, tiny_model_dir


def _encode(texts: list[str]) -> torch.Tensor:
    """A text tower stub: the side a text names along axis 0 (left +, right -), its length along axis 1."""
    rows = [[t.lower().count("left") - t.lower().count("right"), len(t) / 10, 1.0, 0.0] for t in texts]
    return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=-1)


def test_only_texts_that_name_a_side_move_and_norms_are_kept() -> None:
    edit = SideEdit(4)
    report = "Small left effusion. Heart is enlarged."
    texts = ["Small left effusion.", "No effusion.", "Right pneumothorax.", "Heart is enlarged.", report]
    base = _encode(texts) * 3.0  # not unit: the edit keeps each row's norm
    assert torch.equal(edit(texts, base, _encode), base)  # strength 0: the tower as it was
    edit.set(torch.tensor([0.0, 0.0, 0.0, 1.0]), torch.tensor([1.0, 0.0, 0.0, 0.0]), 0.5)
    out = edit(texts, base, _encode)
    assert torch.equal(out[[1, 3, 4]], base[[1, 3, 4]])  # no side named, or more than one sentence: unchanged
    torch.testing.assert_close(out.norm(dim=-1), base.norm(dim=-1))
    assert out[0, 3] > 0 > out[2, 3]  # left toward the image direction, right away from it
    every = SideEdit(4, "all")
    every.set(torch.tensor([0.0, 0.0, 0.0, 1.0]), torch.tensor([1.0, 0.0, 0.0, 0.0]), 0.5)
    moved = every(texts, base, _encode)
    assert torch.equal(moved[:4], out[:4]) and moved[4, 3] > 0  # "all": the report that names a side moves too
    with pytest.raises(ValueError, match="sentences"):
        SideEdit(4, "reports")


@pytest.fixture()
def model_dir(tmp_path: Path) -> Path:
    return tiny_model_dir(tmp_path / "model")


def test_fit_writes_an_edit_with_which_each_image_prefers_its_own_side(model_dir: Path) -> None:
    cache = side_cohort(24, seed=0, axis=1)
    before = MedVLP.from_pretrained(model_dir)
    record = fit_side_edit(model_dir, cache, ["findings"])
    assert record is not None and record["train_sentences"] == 24 and record["val_sentences"] == 24
    assert record["strength"] > 0
    assert record["val_accuracy"][str(record["strength"])] > record["val_accuracy"]["0.0"]
    assert json.loads((model_dir / SIDE_EDIT_RECORD).read_text()) == record
    after = MedVLP.from_pretrained(model_dir)  # the edit is in the folder's weights and config
    assert after.config.side_edit == "sentences"
    assert float(after.side_edit.strength) == pytest.approx(record["strength"])
    plain = ["No pleural effusion.", "The heart is normal.", "Small left pleural effusion. The heart is normal."]
    torch.testing.assert_close(after.encode_text(plain), before.encode_text(plain), rtol=0, atol=0)
    sided = ["Small left pleural effusion.", "Small right pleural effusion."]
    assert not torch.allclose(after.encode_text(sided), before.encode_text(sided))
    tokens = after.text_encoder.tokenize(sided)  # token batches (training, ONNX) are the tower without the edit
    torch.testing.assert_close(after.encode_text(tokens), before.encode_text(tokens))
    weights = {k: v.clone() for k, v in after.state_dict().items()}
    assert fit_side_edit(model_dir, cache, ["findings"]) == record  # a refit starts from the tower alone
    again = MedVLP.from_pretrained(model_dir).state_dict()
    assert all(torch.equal(weights[k], again[k]) for k in weights)


def test_too_few_one_sided_sentences_leave_the_folder_as_it_was(model_dir: Path) -> None:
    cache = side_cohort(6, seed=1, axis=1)  # 3 of each side per split: below the minimum
    config = (model_dir / "config.json").read_text()
    assert fit_side_edit(model_dir, cache, ["findings"]) is None
    assert (model_dir / "config.json").read_text() == config and not (model_dir / SIDE_EDIT_RECORD).exists()


def test_one_sided_sentences_skip_sentences_with_no_side_or_both() -> None:
    rows, sentences, left = one_sided_sentences(
        ["Left effusion. No pneumothorax.", "Effusions on the left and the right.", "Right apical pneumothorax."]
    )
    assert rows == [0, 2] and sentences == ["Left effusion.", "Right apical pneumothorax."]
    assert left.tolist() == [1, 0]


def test_topics_are_read_without_the_edit(model_dir: Path) -> None:
    """Which finding a sentence is about does not depend on its side: the mining reads topics with the towers alone."""
    from medvlp.tasks.mined_prompts import _assign_topics

    fit_side_edit(model_dir, side_cohort(24, seed=0, axis=1), ["findings"])
    edited = MedVLP.from_pretrained(model_dir)
    edited.side_edit.strength.fill_(50.0)  # strong enough to move any topic it touched
    plain = MedVLP.from_pretrained(model_dir)
    plain.side_edit = None
    candidates = [
        ("Small left pleural effusion.", "positive", "No pleural effusion."),
        ("Large right pneumothorax.", "positive", "No pneumothorax."),
    ]
    findings = ("pleural effusion", "pneumothorax")
    templated = [{"positive": [f"There is {f}."], "negative": [f"There is no {f}."]} for f in findings]
    read, plain_read = _assign_topics(edited, candidates, templated), _assign_topics(plain, candidates, templated)
    for a, b in zip(read, plain_read, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not torch.allclose(edited.encode_text([candidates[0][0]]), plain.encode_text([candidates[0][0]]))


def test_grounding_compares_the_tokens_with_the_phrase_without_the_edit(model_dir: Path) -> None:
    """The edit's directions were fitted on the global image embedding: the token maps read the towers alone."""
    from medvlp.tasks.grounding import similarity_maps

    fit_side_edit(model_dir, side_cohort(24, seed=0, axis=1), ["findings"])
    edited = MedVLP.from_pretrained(model_dir)
    edited.side_edit.strength.fill_(50.0)
    plain = MedVLP.from_pretrained(model_dir)
    plain.side_edit = None
    images = torch.as_tensor(np.stack([side_cohort(2, seed=3, axis=1).load_image(s) for s in ("train-0", "train-1")]))
    phrases = ["Small left pleural effusion.", "Small right pleural effusion."]
    np.testing.assert_array_equal(similarity_maps(edited, images, phrases), similarity_maps(plain, images, phrases))
    assert not torch.allclose(edited.encode_text(phrases), plain.encode_text(phrases))


def test_a_fit_killed_between_the_config_and_the_weights_loads_without_the_edit_and_fits_again(model_dir: Path) -> None:
    """The weights are written before config.json: a folder caught between the two (or the reverse) loads without the
    edit, the towers intact, and the resumed fit writes it again."""
    cache = side_cohort(24, seed=0, axis=1)
    config = (model_dir / "config.json").read_text()
    weights = (model_dir / "model.safetensors").read_bytes()
    record = fit_side_edit(model_dir, cache, ["findings"])
    edited = MedVLP.from_pretrained(model_dir)
    (model_dir / "config.json").write_text(config)  # new weights, old config
    assert MedVLP.from_pretrained(model_dir).side_edit is None
    assert fit_side_edit(model_dir, cache, ["findings"]) == record
    (model_dir / "model.safetensors").write_bytes(weights)  # old weights, new config
    half = MedVLP.from_pretrained(model_dir)
    assert half.side_edit is None
    plain = ["No pleural effusion."]
    torch.testing.assert_close(half.encode_text(plain), edited.encode_text(plain), rtol=0, atol=0)
    assert fit_side_edit(model_dir, cache, ["findings"]) == record
    with pytest.raises(RuntimeError, match="does not match"):  # any other mismatch still fails
        (model_dir / "config.json").write_text(config.replace('"projection": "mlp"', '"projection": "linear"'))
        MedVLP.from_pretrained(model_dir)


def test_a_training_config_cannot_set_the_fitted_edit() -> None:
    from medvlp.config import load_config

    with pytest.raises(ValueError, match=r"stages\.stage2-align\.side_edit: true"):
        load_config(None, ["model.side_edit=sentences"])
    assert load_config(None, ["stages.stage2-align.side_edit=true"]).stages.stage2_align.side_edit is True
