"""The robustness suite counts a true sentence ranked above its twin; a model that cannot tell them apart scores 0, and
one that ranks every negated sentence low passes the negation but fails it asked the other way round (absence)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import torch

from medvlp.data.perturb import negate
from medvlp.tasks.robustness import ABSENCE, absence_cases, robustness_cases, robustness_suite


class WordModel:
    """A text tower that embeds a sentence by its words (bag of words over a fixed vocabulary)."""

    training = False
    vocab = ("left", "right", "no", "pneumothorax", "effusion", "heart", "enlarged", "not")

    def __init__(self, blind: bool = False) -> None:
        self.blind = blind

    def eval(self) -> None:
        pass

    def train(self, mode: bool = True) -> None:
        pass

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        if self.blind:
            return torch.ones(len(texts), len(self.vocab))
        words = [set(t.lower().replace(".", "").split()) for t in texts]
        return torch.tensor([[float(w in ws) for w in self.vocab] for ws in words]) + 0.01


class AffirmingModel(WordModel):
    """Ranks every affirmative sentence above every negated one, whatever the image."""

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        return torch.tensor([[0.0, 1.0] if negate(t) is None else [1.0, 0.0] for t in texts])


def _labelled(study: list[str]) -> pd.DataFrame:
    labels = {"pneumothorax": [1, 0, 0], "pleural_effusion": [0, 1, 0], "cardiomegaly": [0, 0, 1]}
    return pd.DataFrame({"study": ["st-1", "st-2", "st-3"], **labels})


def _cache() -> SimpleNamespace:
    rows = [
        ("st-1", "pneumothorax", "Large left pneumothorax.", 1.0, 1.0, 4.0, 4.0),
        ("st-2", "pleural_effusion", "Right effusion.", 1.0, 1.0, 4.0, 4.0),
        ("st-3", "cardiomegaly", "The heart is enlarged.", 1.0, 1.0, 4.0, 4.0),
    ]
    frame = pd.DataFrame(rows, columns=["study", "category_name", "label_text", "x", "y", "w", "h"])
    return SimpleNamespace(
        grounding=frame, spatial_dims=2, split=lambda _: pd.DataFrame({"study": ["st-1", "st-2", "st-3"]})
    )


def test_cases_have_twins_only_where_the_rules_apply() -> None:
    cases = robustness_cases(_cache())
    assert sorted(cases["perturbation"]) == ["laterality", "laterality", "negation", "negation", "negation"]
    assert set(cases.loc[cases["finding"] == "cardiomegaly", "twin"]) == {"The heart is not enlarged."}


def test_a_model_that_reads_the_words_passes_and_a_blind_one_fails() -> None:
    cache = _cache()
    studies = ["st-1", "st-2", "st-3"]
    texts = ["Large left pneumothorax.", "Right effusion.", "The heart is enlarged."]
    image = WordModel().encode_text(texts).numpy()  # each image sits exactly on its true sentence
    good = robustness_suite(WordModel(), cache, image, studies)
    assert good["n"] == 5 and good["mean_accuracy"] == 1.0
    assert good["per_finding"]["pneumothorax"] == {"laterality": 1.0, "negation": 1.0}
    blind = robustness_suite(WordModel(blind=True), cache, np.ones((3, 8), np.float32), studies)
    assert blind["mean_accuracy"] == 0.0  # every comparison a tie: ties count against the model
    swapped = robustness_suite(WordModel(), cache, WordModel().encode_text(["right", "left", "x"]).numpy(), studies)
    assert swapped["per_perturbation"]["laterality"]["accuracy"] == 0.0


def test_absence_asks_the_negation_the_other_way_round_on_a_study_without_the_finding() -> None:
    cache = _cache()
    cache.split = _labelled
    cases = absence_cases(cache)
    assert list(cases["perturbation"].unique()) == [ABSENCE] and len(cases) == 3
    first = cases.iloc[0]  # st-1's pneumothorax, asked on the first study without one
    assert (first["study"], first["phrase"], first["twin"]) == (
        "st-2",
        "No left pneumothorax.",
        "Large left pneumothorax.",
    )
    studies = ["st-1", "st-2", "st-3"]
    blind = robustness_suite(AffirmingModel(), cache, np.tile([[1.0, 0.1]], (3, 1)).astype(np.float32), studies)
    assert blind["per_perturbation"]["negation"]["accuracy"] == 1.0  # passes the negation without looking...
    assert blind["per_perturbation"][ABSENCE]["accuracy"] == 0.0  # ...and fails it the other way round
    assert blind["negation_balanced_accuracy"] == 0.5
    assert blind["n"] == 5 and blind["mean_accuracy"] == 0.6  # negation 3 of 3, laterality ties 0 of 2
    assert blind["mean_accuracy_with_absence"] == 3 / 8
    words = ["Large left pneumothorax. no effusion heart not enlarged", "Right effusion. no pneumothorax heart not",
             "The heart is enlarged. no pneumothorax effusion"]  # fmt: skip
    seeing = robustness_suite(WordModel(), cache, WordModel().encode_text(words).numpy(), studies)
    per = seeing["per_perturbation"]
    assert per[ABSENCE]["accuracy"] == 1.0  # images that read "no pneumothorax" rank it first
    assert seeing["negation_balanced_accuracy"] == (per["negation"]["accuracy"] + 1.0) / 2
