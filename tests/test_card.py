"""The model card renders what metrics.json holds, section by section."""

from __future__ import annotations

from pathlib import Path

from medvlp.card import PROMPT_NOTES, write_model_card
from medvlp.tasks.prompt_forms import PROMPT_FORMS

COHORT = {"cohort": {"name": "ct-demo", "test_studies": 12, "findings": ["kidney_stone", "renal_mass"]}}


def test_grounding_is_shown_per_finding(tmp_path: Path) -> None:
    metrics = COHORT | {
        "grounding": {
            "n": 5,
            "mean_cnr": 1.1,
            "per_category": {
                "kidney_stone": {"cnr": 0.412, "iou": 0.051, "miou": 0.033, "cnr_control": 0.398, "n": 2},
                "renal_mass": {"cnr": 1.573, "iou": 0.214, "miou": 0.188, "n": 3},
            },
        }
    }
    text = write_model_card(tmp_path, metrics, tmp_path / "model").read_text()
    assert "## Grounding per finding" in text
    assert "| kidney_stone | 0.412 | 0.051 | 0.033 | 0.398 | 2 |" in text
    assert "| renal_mass | 1.573 | 0.214 | 0.188 | – | 3 |" in text, "a card from before the control shows a dash"
    assert "*Supervised*" not in text
    metrics["grounding"]["supervised"] = True  # trained with box_weight > 0: the card says the boxes taught it
    assert (
        "*Supervised*: this model trained on the training split's phrase boxes"
        in write_model_card(tmp_path, metrics, tmp_path / "model").read_text()
    )


def test_a_card_without_grounding_has_no_grounding_section(tmp_path: Path) -> None:
    metrics = COHORT | {"grounding": {"n": 0, "per_category": {}}}
    text = write_model_card(tmp_path, metrics, tmp_path / "model").read_text()
    assert "Grounding per finding" not in text


def test_the_card_says_which_prompts_the_zero_shot_answers_with(tmp_path: Path) -> None:
    per = {"kidney_stone": {"auroc": 0.7, "n_pos": 3, "n_neg": 9}}
    for form, labels, expected in (
        ("mined_reports", False, "mean embedding of the training reports that state it"),
        ("sentence", None, "the template prompts alone"),
    ):
        prompts = {"form": form} | ({} if labels is None else {"uses_training_labels": labels})
        metrics = COHORT | {"zero_shot": {"per_finding": per, "prompts": prompts}}
        text = write_model_card(tmp_path, metrics, tmp_path / "model").read_text()
        line = next(x for x in text.splitlines() if x.startswith("*Prompts*"))
        assert f"`{form}` (chosen on val)" in line and expected in line
        assert ("No training label was read." in line) == (labels is False)
    assert set(PROMPT_NOTES) == set(PROMPT_FORMS)  # every form the calibration can choose is explained
    metrics = COHORT | {"zero_shot": {"per_finding": per, "prompts": {}}}  # a card from before the forms: no line
    assert "*Prompts*" not in write_model_card(tmp_path, metrics, tmp_path / "model").read_text()
