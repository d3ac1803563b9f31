"""Prompt forms: a finding's prompts alone or framed as an otherwise normal report; the form chosen on val."""

from __future__ import annotations

import typing

import pytest

from medvlp.config import AlignStageConfig
from medvlp.tasks.prompt_forms import (
    PROMPT_FORMS,
    choose_prompt_form,
    form_prompt_sets,
    mined_prompts,
    mined_report_prototypes,
    prompt_form,
)
from medvlp.tasks.zeroshot import finding_text, render_prompts

FINDINGS = ["cardiomegaly", "pleural_effusion", "lung_nodule"]


def rest_after(text: str, heads: list[str]) -> str:
    """What follows the one of ``heads`` a framed prompt starts with."""
    found = [h for h in heads if text.startswith(h + " ")]
    assert found, text
    return text[len(max(found, key=len)) + 1 :]


def test_the_sentence_form_is_the_prompts_alone() -> None:
    assert form_prompt_sets(FINDINGS) == [render_prompts(f) for f in FINDINGS]


@pytest.mark.parametrize("form", ["report", "report_section"])
def test_a_report_form_is_one_finding_stated_or_denied_among_the_others_denied(form: str) -> None:
    synonyms = {"cardiomegaly": ["enlarged heart"]}
    sets = form_prompt_sets(FINDINGS, synonyms=synonyms, form=form)
    for finding, got in zip(FINDINGS, sets, strict=True):
        own = render_prompts(finding, synonyms=synonyms)
        others = [render_prompts(o)["negative"] for o in FINDINGS if o != finding]
        assert len(got["positive"]) == len(got["negative"]) == max(len(own["positive"]), len(own["negative"]))
        for pos, neg in zip(got["positive"], got["negative"], strict=True):
            assert pos.startswith("FINDINGS: ") == neg.startswith("FINDINGS: ") == (form == "report_section")
            rest_p = rest_after(pos.removeprefix("FINDINGS: "), own["positive"])
            rest_n = rest_after(neg.removeprefix("FINDINGS: "), own["negative"])
            assert rest_p == rest_n  # positive and negative differ in their first sentence only
            # the rest denies each other finding, and never names this one
            assert all(any(n in rest_p for n in negs) for negs in others)
            assert finding_text(finding) not in rest_p and "enlarged heart" not in rest_p
        assert len(set(got["positive"])) > 1  # the other findings' templates are taken in turn


def test_a_finding_asked_alone_reads_as_in_the_models_list() -> None:
    """The server embeds findings one at a time: with the model's findings as context it writes the same prompts."""
    whole = form_prompt_sets(FINDINGS, form="report")
    alone = form_prompt_sets(FINDINGS[1:2], form="report", context=FINDINGS)
    assert alone == whole[1:2]
    assert form_prompt_sets(["free text finding"], form="report", context=FINDINGS)[0]["positive"][0].startswith(
        "There is free text finding. "
    )


def test_the_form_is_read_from_the_calibration_and_chosen_on_val() -> None:
    assert prompt_form(None) == prompt_form({"findings": {}}) == "sentence"
    assert prompt_form({"prompt_form": "report"}) == "report"
    with pytest.raises(ValueError, match="unknown prompt form"):
        prompt_form({"prompt_form": "poem"})
    with pytest.raises(ValueError, match="unknown prompt form"):
        form_prompt_sets(FINDINGS, form="poem")
    assert choose_prompt_form({"sentence": 0.70, "report": 0.75, "report_section": 0.74}) == "report"
    assert choose_prompt_form({"sentence": 0.75, "report": 0.75}) == "sentence"  # ties: the earlier candidate
    assert choose_prompt_form({"sentence": float("nan"), "report": 0.6}) == "report"
    assert choose_prompt_form({"report": float("nan")}) == "report"
    # the training config offers exactly these forms
    field = AlignStageConfig.model_fields["prompt_forms"].annotation
    assert tuple(typing.get_args(typing.get_args(field)[0])) == PROMPT_FORMS
    assert AlignStageConfig().prompt_forms == ["sentence"]
    with pytest.raises(ValueError):
        AlignStageConfig(prompt_forms=[])


def test_the_mined_form_answers_with_the_calibrations_sentences_and_templates_for_the_rest() -> None:
    calibration = {
        "prompt_form": "mined",
        "mined_prompts": {
            "cardiomegaly": {
                "positive": ["The cardiac silhouette is enlarged."],
                "negative": ["Heart size is normal.", "No cardiomegaly."],
                "fallback": [],
            }
        },
    }
    mined = mined_prompts(calibration)
    assert mined == {"cardiomegaly": {"positive": ["The cardiac silhouette is enlarged."],
                                      "negative": ["Heart size is normal.", "No cardiomegaly."]}}  # fmt: skip
    assert prompt_form(calibration) == "mined" and mined_prompts({"findings": {}}) is None
    sets = form_prompt_sets(FINDINGS, form="mined", mined=mined)
    assert sets[0] == mined["cardiomegaly"]
    assert sets[1:] == [render_prompts(f) for f in FINDINGS[1:]]  # no mined sentence: the templates, as `sentence`
    with pytest.raises(ValueError, match="mined sentences"):
        form_prompt_sets(FINDINGS, form="mined")
    with pytest.raises(ValueError, match="mined_prompts must map"):
        mined_prompts({"mined_prompts": {"cardiomegaly": {"positive": "Enlarged heart."}}})
    # framed: each mined sentence opens a report section that denies the other findings, as report_section does
    framed = form_prompt_sets(FINDINGS, form="mined_report_section", mined=mined)
    templated = form_prompt_sets(FINDINGS, form="report_section")
    assert framed[1:] == templated[1:]
    got = framed[0]
    assert len(got["positive"]) == len(got["negative"]) == 2
    for i, (pos, neg) in enumerate(zip(got["positive"], got["negative"], strict=True)):
        assert pos.startswith("FINDINGS: The cardiac silhouette is enlarged. ")
        assert neg.startswith(f"FINDINGS: {mined['cardiomegaly']['negative'][i]} ")
        rest = rest_after(pos.removeprefix("FINDINGS: "), mined["cardiomegaly"]["positive"])
        assert rest == rest_after(neg.removeprefix("FINDINGS: "), mined["cardiomegaly"]["negative"])
        assert "pleural effusion" in rest and "cardiomegaly" not in rest


def test_the_mined_reports_form_answers_with_the_calibrations_prototypes_and_templates_for_the_rest() -> None:
    import torch

    from medvlp.models import MedVLP, ModelConfig
    from medvlp.tasks.zeroshot import build_prompt_embeddings

    torch.manual_seed(0)
    model = MedVLP(ModelConfig(image_encoder="tiny_resnet", spatial_dims=2, image_size=(32, 32), embed_dim=8))
    model.eval()
    stored = {"cardiomegaly": {"positive": [3.0] + [0.0] * 7, "negative": [0.0, 2.0] + [0.0] * 6, "reports": {}}}
    calibration = {"findings": {}, "prompt_form": "mined_reports", "mined_report_prototypes": stored}
    prototypes = mined_report_prototypes(calibration)
    assert prompt_form(calibration) == "mined_reports" and mined_report_prototypes({"findings": {}}) is None
    got = build_prompt_embeddings(model, FINDINGS, form="mined_reports", prototypes=prototypes)
    assert got[0, 0, 0] == pytest.approx(1.0) and got[0, 1, 1] == pytest.approx(1.0)  # the vectors, unit norm
    torch.testing.assert_close(got[1:], build_prompt_embeddings(model, FINDINGS[1:]))  # the rest: `sentence`
    with pytest.raises(ValueError, match="report prototypes"):
        build_prompt_embeddings(model, FINDINGS, form="mined_reports")
    with pytest.raises(ValueError, match="another model"):
        short = {"cardiomegaly": {"positive": [1.0, 0.0], "negative": [0.0, 1.0]}}
        build_prompt_embeddings(
            model,
            FINDINGS,
            form="mined_reports",
            prototypes=mined_report_prototypes({"mined_report_prototypes": short}),
        )
    with pytest.raises(ValueError, match="mined_report_prototypes must map"):
        mined_report_prototypes({"mined_report_prototypes": {"cardiomegaly": {"positive": [1.0]}}})
