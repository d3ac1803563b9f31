"""Prompt prototypes from the training split's own sentences (not zero-shot: they use the training labels)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from medvlp.models import MedVLP, ModelConfig
from medvlp.tasks.embed import SplitEmbeddings
from medvlp.tasks.prompts import prompt_prototype_task, prototype_prompt_sets, select_prototypes
from medvlp.tasks.zeroshot import (
    build_prompt_embeddings,
    embed_prompt_sets,
    model_logit_scale,
    render_prompts,
    zero_shot_probabilities,
)

FINDINGS = ["cardiomegaly", "pneumothorax"]


def _reports() -> pd.DataFrame:
    """12 subjects: 6 with an enlarged heart in their cohort's words, 6 without; pneumothorax in 2 only."""
    rows = []
    for i in range(12):
        heart = "The cardiac silhouette is enlarged." if i < 6 else "Heart size is normal."
        ptx = "Small right pneumothorax." if i in (0, 7) else "No pneumothorax."
        extra = "Lungs are clear." if i % 2 else "The lungs are clear."  # same in both groups: never chosen
        unique = f"Comparison with study number {i}."  # one subject each: never a prototype
        impression = "Cardiomegaly." if i < 6 else "No acute process."
        report = f"INDICATION: Dyspnea.\nFINDINGS:\n{heart} {extra} {ptx} {unique}\n\nIMPRESSION:\n{impression}"
        rows.append(
            {"subject": f"sj-{i}", "report": report, "cardiomegaly": float(i < 6), "pneumothorax": float(i in (0, 7))}
        )
    return pd.DataFrame(rows)


def test_the_discriminating_sentences_are_chosen_and_too_few_fall_back() -> None:
    df = _reports()
    chosen = select_prototypes(df["report"], df[FINDINGS].to_numpy(), FINDINGS, df["subject"])
    cardio = chosen["cardiomegaly"]
    assert cardio["positive"] == ["Cardiomegaly.", "The cardiac silhouette is enlarged."]
    assert cardio["negative"] == ["Heart size is normal.", "No acute process."]
    assert cardio["fallback"] == [] and cardio["n_pos"] == 6 and cardio["n_neg"] == 6
    everything = {s for pol in ("positive", "negative") for s in cardio[pol]}
    assert not any("lungs are clear" in s.lower() or "Comparison" in s or "Dyspnea" in s for s in everything)
    assert all(s > 0 for s in cardio["scores"]["positive"]) and all(s < 0 for s in cardio["scores"]["negative"])
    # 2 pneumothorax studies: no sentence reaches 3 subjects on the positive side, so the templates stand in
    ptx = chosen["pneumothorax"]
    assert ptx["positive"] == [] and ptx["fallback"] == ["positive"]
    assert ptx["negative"] == ["No pneumothorax."]  # in all 10 negative reports, in no positive one
    sets = prototype_prompt_sets(chosen, FINDINGS, (None, {"pneumothorax": ["collapsed lung"]}))
    assert sets[1]["positive"] == render_prompts("pneumothorax", None, {"pneumothorax": ["collapsed lung"]})["positive"]
    assert sets[0]["positive"] == cardio["positive"]
    # top k and the thresholds are honoured
    one = select_prototypes(df["report"], df[FINDINGS].to_numpy(), FINDINGS, df["subject"], k=1)
    assert one["cardiomegaly"]["positive"] == ["Cardiomegaly."]
    strict = select_prototypes(df["report"], df[FINDINGS].to_numpy(), FINDINGS, df["subject"], min_count=7)
    assert strict["cardiomegaly"]["fallback"] == ["positive", "negative"]


def test_no_pneumothorax_is_a_negative_prototype_when_the_positives_never_say_it() -> None:
    df = _reports()
    labels = df[FINDINGS].to_numpy().copy()
    labels[[8, 9], 1] = 1  # four pneumothorax subjects (0, 7, 8, 9): now the positive side has enough
    df.loc[[8, 9], "report"] = df.loc[[8, 9], "report"].str.replace("No pneumothorax.", "Small right pneumothorax.")
    chosen = select_prototypes(df["report"], labels, FINDINGS, df["subject"])["pneumothorax"]
    assert chosen["positive"] == ["Small right pneumothorax."]
    assert chosen["negative"][0] == "No pneumothorax."  # the strongest: in every negative report, no positive one
    assert chosen["fallback"] == []


def test_a_sentence_of_one_patient_is_never_a_prototype() -> None:
    """Three studies of one subject share a sentence: it counts once, so it cannot reach min_count."""
    df = _reports()
    df["subject"] = ["sj-0", "sj-0", "sj-0", "sj-3", "sj-4", "sj-5", *[f"sj-{i}" for i in range(6, 12)]]
    df.loc[[0, 1, 2], "report"] = df.loc[[0, 1, 2], "report"] + " Patient John Doe."
    chosen = select_prototypes(df["report"], df[FINDINGS].to_numpy(), FINDINGS, df["subject"])
    assert not any("John" in s for s in chosen["cardiomegaly"]["positive"])
    by_study = select_prototypes(df["report"], df[FINDINGS].to_numpy(), FINDINGS, None)
    assert "Patient John Doe." in by_study["cardiomegaly"]["positive"]  # counted per study it would pass


def test_sentences_that_differ_only_in_a_size_count_as_one() -> None:
    from medvlp.tasks.prompts import sentence_key

    assert sentence_key("A 2.3 cm nodule in the right upper lobe.") == sentence_key(
        "A 11 cm nodule in the right upper lobe"
    )
    df = _reports()
    sizes = ["2.3", "1.1", "0.8", "3", "1.7", "2.0"]
    tails = [f" A {s} cm nodule in the right upper lobe." for s in sizes]
    df.loc[:5, "report"] = [r + t for r, t in zip(df["report"][:6], tails, strict=True)]
    chosen = select_prototypes(df["report"], df[FINDINGS].to_numpy(), FINDINGS, df["subject"])["cardiomegaly"]
    assert any("cm nodule in the right upper lobe" in s for s in chosen["positive"])


def test_bad_arguments_are_named() -> None:
    df = _reports()
    labels = df[FINDINGS].to_numpy()
    with pytest.raises(ValueError, match="k must be"):
        select_prototypes(df["report"], labels, FINDINGS, k=0)
    with pytest.raises(ValueError, match="min_count"):
        select_prototypes(df["report"], labels, FINDINGS, min_count=0)
    with pytest.raises(ValueError, match="findings do not agree"):
        select_prototypes(df["report"], labels, ["cardiomegaly"])
    with pytest.raises(ValueError, match="3 subjects for 12 reports"):
        select_prototypes(df["report"], labels, FINDINGS, ["a", "b", "c"])


@pytest.fixture(scope="module")
def model() -> MedVLP:
    torch.manual_seed(0)
    config = ModelConfig(image_encoder="tiny_vit", spatial_dims=2, image_size=(64, 64), text_num_layers=1, embed_dim=32)
    return MedVLP(config).eval()


def _split(records: pd.DataFrame, n: int, seed: int) -> SplitEmbeddings:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, size=(n, len(FINDINGS))).astype(np.float32)
    image = rng.normal(size=(n, 32)).astype(np.float32)
    return SplitEmbeddings(records, image, image, labels, list(records.get("report", [])))


def test_the_task_scores_with_the_prototypes_embedded_as_prompts(model: MedVLP) -> None:
    df = _reports()
    train = SplitEmbeddings(
        df, np.zeros((12, 32), np.float32), np.zeros((12, 32), np.float32), df[FINDINGS].to_numpy(), []
    )
    val, test = _split(pd.DataFrame(index=range(10)), 10, 1), _split(pd.DataFrame(index=range(30)), 30, 2)
    metrics, probs = prompt_prototype_task(model, train, val, test, FINDINGS, ["findings", "impression"])
    assert metrics["uses_training_labels"] is True and metrics["zero_shot"] is False
    assert metrics["fallback_findings"] == ["pneumothorax"]
    assert metrics["prototypes"]["cardiomegaly"]["positive"] == ["Cardiomegaly.", "The cardiac silhouette is enlarged."]
    assert set(metrics["per_finding"]) == set(FINDINGS) and "operating_point" in metrics
    chosen = select_prototypes(df["report"], df[FINDINGS].to_numpy(), FINDINGS, df["subject"])
    emb = embed_prompt_sets(model, prototype_prompt_sets(chosen, FINDINGS))
    expected = zero_shot_probabilities(test.image, emb, model_logit_scale(model))
    np.testing.assert_allclose(probs, expected)
    # the fallback polarity is exactly the template embedding; the prototype one is not
    templates = build_prompt_embeddings(model, FINDINGS)
    torch.testing.assert_close(emb[1, 0], templates[1, 0])
    assert not torch.allclose(emb[0, 0], templates[0, 0])
