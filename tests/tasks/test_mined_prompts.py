"""Label-free prompts mined from the training reports' sentences."""

from __future__ import annotations

import re
from typing import ClassVar

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from medvlp.models import MedVLP, ModelConfig
from medvlp.tasks.mined_prompts import mine_prompts, mine_report_prototypes, sentence_polarity
from medvlp.tasks.prompts import sentence_key
from medvlp.tasks.zeroshot import render_prompts

FINDINGS = ["cardiomegaly", "pneumothorax"]


class KeywordTower:
    """A text tower whose embedding counts topic words (one axis per topic) and negations (a last axis), so which
    finding a sentence is about is known in advance."""

    TOPICS: ClassVar[dict[str, int]] = {"cardiomegaly": 0, "cardiac": 0, "heart": 0, "pneumothorax": 1, "lungs": 2}

    def encode_text(self, texts: list[str], normalize: bool = True) -> torch.Tensor:
        out = torch.full((len(texts), 4), 1e-3)
        for i, text in enumerate(texts):
            words = re.findall(r"[a-z]+", text.lower())
            for w in words:
                if w in self.TOPICS:
                    out[i, self.TOPICS[w]] += 1.0
            out[i, 3] += sum(w in ("no", "not") for w in words)
        return F.normalize(out, dim=-1) if normalize else out


def _reports() -> pd.DataFrame:
    """12 subjects in their cohort's words; a label column is there but mining must not need it."""
    rows = []
    for i in range(12):
        heart = "The cardiac silhouette is enlarged." if i < 6 else "The cardiac silhouette is not enlarged."
        ptx = "Small right pneumothorax." if i in (0, 7, 9) else "No pneumothorax."
        lungs = "Lungs are clear."  # about neither finding: never a prompt
        unique = f"There is a marker {'abcdefghijkl'[i] * 3}."  # one subject each: never a prompt
        rows.append({"subject": f"sj-{i}", "report": f"FINDINGS:\n{heart} {ptx} {lungs} {unique}", "label": i < 6})
    return pd.DataFrame(rows)


def test_sentence_polarity_reads_the_perturbation_rules() -> None:
    assert sentence_polarity("Small right pneumothorax.") == ("positive", "No right pneumothorax.")
    assert sentence_polarity("No pneumothorax.") == ("negative", "Pneumothorax.")
    assert sentence_polarity("The heart is not enlarged.") == ("negative", "The heart is enlarged.")
    assert sentence_polarity("Possible small effusion.") is None  # uncertain: neither


def test_sentences_go_to_the_finding_they_are_about_by_polarity() -> None:
    df = _reports()
    mined = mine_prompts(KeywordTower(), list(df["report"]), FINDINGS, subjects=list(df["subject"]))
    assert mined["cardiomegaly"]["positive"] == ["The cardiac silhouette is enlarged."]
    assert mined["cardiomegaly"]["negative"] == ["The cardiac silhouette is not enlarged."]
    assert mined["pneumothorax"]["positive"] == ["Small right pneumothorax."]
    assert mined["pneumothorax"]["negative"] == ["No pneumothorax."]
    assert all(m["fallback"] == [] for m in mined.values())
    everything = {s for m in mined.values() for pol in ("positive", "negative") for s in m[pol]}
    assert not any("Lungs" in s or "marker" in s for s in everything)  # off topic; one subject each


def test_too_few_subjects_or_no_clear_finding_falls_back_to_the_templates() -> None:
    df = _reports()
    mined = mine_prompts(KeywordTower(), list(df["report"]), FINDINGS, subjects=list(df["subject"]), min_count=4)
    ptx = mined["pneumothorax"]  # the positive sentence is in 3 subjects' reports only
    assert ptx["fallback"] == ["positive"] and ptx["positive"] == render_prompts("pneumothorax")["positive"]
    assert ptx["negative"] == ["No pneumothorax."]
    # every report one subject: the count is of subjects, so 12 reports by one patient count once
    one = mine_prompts(KeywordTower(), list(df["report"]), FINDINGS, subjects=["sj-0"] * len(df))
    assert all(m["fallback"] == ["positive", "negative"] for m in one.values())


def test_a_real_text_tower_mines_sentences_of_the_reports_by_their_polarity() -> None:
    torch.manual_seed(0)
    config = ModelConfig(
        image_encoder="tiny_resnet", spatial_dims=2, image_size=(32, 32), embed_dim=16, text_num_layers=1
    )
    model = MedVLP(config)
    df = _reports()
    mined = mine_prompts(model.eval(), list(df["report"]), FINDINGS, subjects=list(df["subject"]), k=2)
    keys = {sentence_key(s) for r in df["report"] for s in re.split(r"(?<=\.)\s+", r.split("\n", 1)[1])}
    for entry in mined.values():
        for pol in ("positive", "negative"):
            assert 1 <= len(entry[pol]) <= 2
            if pol in entry["fallback"]:
                continue
            for sentence in entry[pol]:
                assert sentence_key(sentence) in keys and "marker" not in sentence
                assert sentence_polarity(sentence)[0] == pol


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        mine_prompts(KeywordTower(), ["No pneumothorax."], FINDINGS, k=0)
    with pytest.raises(ValueError, match="subjects"):
        mine_prompts(KeywordTower(), ["No pneumothorax."], FINDINGS, subjects=["a", "b"])


def test_report_prototypes_are_the_mean_embeddings_of_the_reports_that_state_each_finding() -> None:
    df = _reports()
    reports = list(df["report"])
    reports[11] = reports[11].replace("No pneumothorax.", "Possible pneumothorax.")  # uncertain: not a statement
    tower = KeywordTower()
    got = mine_report_prototypes(tower, reports, FINDINGS, subjects=list(df["subject"]))
    texts = [r.split("\n", 1)[1] for r in reports]  # what the text tower reads: the FINDINGS section
    emb = F.normalize(tower.encode_text(texts), dim=-1)
    states = {"cardiomegaly": [i < 6 for i in range(12)], "pneumothorax": [i in (0, 7, 9) for i in range(12)]}
    for finding, positive in states.items():
        rows = torch.tensor(positive)
        assert got[finding]["reports"] == {"positive": int(rows.sum()), "negative": int((~rows).sum())}
        for pol, side in (("positive", rows), ("negative", ~rows)):
            expected = F.normalize(emb[side].mean(0), dim=0)
            torch.testing.assert_close(torch.tensor(got[finding][pol]), expected, atol=1e-5, rtol=0)
    # only numbers leave the training split: no sentence of any report (the one-subject markers included)
    assert all(isinstance(x, float) for e in got.values() for pol in ("positive", "negative") for x in e[pol])
    # a side with fewer distinct subjects than min_count gets no prototypes: that finding is left to the templates
    fewer = mine_report_prototypes(tower, reports, FINDINGS, subjects=list(df["subject"]), min_count=4)
    assert set(fewer) == {"cardiomegaly"}  # 3 subjects state a pneumothorax
    with pytest.raises(ValueError, match="at least 1"):
        mine_report_prototypes(tower, reports, FINDINGS, min_count=0)
    assert mine_report_prototypes(tower, [], FINDINGS) == {}


class MisreadingTower(KeywordTower):
    """A trained tower's mistake: it reads the thoracic spine as the cardiomegaly topic (boilerplate that contrastive
    training on reports pulled onto a finding)."""

    TOPICS: ClassVar[dict[str, int]] = {**KeywordTower.TOPICS, "spine": 0, "degenerative": 0}


def test_a_sentence_the_two_readers_give_to_different_findings_is_about_none() -> None:
    """Topics are read by the model's tower and by the bundled general sentence encoder; where they disagree (the
    general encoder does not read a spine as the heart) the sentence states no finding."""
    from medvlp.tasks.mined_prompts import general_reader

    df = _reports()
    boiler = "Mild degenerative changes of the thoracic spine."
    reports = [r + f" {boiler}" if i % 2 else r for i, r in enumerate(df["report"])]
    subjects = list(df["subject"])
    alone = mine_prompts(MisreadingTower(), reports, FINDINGS, subjects=subjects, topic_readers=("model",))
    assert boiler in alone["cardiomegaly"]["positive"]  # the tower alone counts it as cardiomegaly
    assert mine_prompts(MisreadingTower(), reports, FINDINGS, subjects=subjects) == alone  # the default: the model
    readers = ("model", "general")
    both = mine_prompts(MisreadingTower(), reports, FINDINGS, subjects=subjects, topic_readers=readers)
    assert both["pneumothorax"]["positive"] == ["Small right pneumothorax."]
    assert both["cardiomegaly"]["positive"] == ["The cardiac silhouette is enlarged."]
    # the report prototypes read topics the same way: the boilerplate no longer makes more reports positive
    protos = mine_report_prototypes(MisreadingTower(), reports, FINDINGS, subjects=subjects, topic_readers=readers)
    assert protos["cardiomegaly"]["reports"]["positive"] == 6
    misread = mine_report_prototypes(MisreadingTower(), reports, FINDINGS, subjects=subjects)
    assert misread["cardiomegaly"]["reports"]["positive"] == 9  # 6 stated (0-5), 6 with the boilerplate, 3 both
    assert general_reader() is general_reader()  # loaded once per process
    with pytest.raises(ValueError, match="topic_readers"):
        mine_prompts(KeywordTower(), reports, FINDINGS, topic_readers=("oracle",))
