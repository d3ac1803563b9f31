"""The negation, laterality, affirmation and severity rules: grammar, not a finding list."""

from __future__ import annotations

import pytest

from medvlp.data.perturb import affirm, named_sides, negate, polarity, swap_laterality


@pytest.mark.parametrize(
    ("sentence", "negated"),
    [
        ("There is a large left pneumothorax.", "There is no left pneumothorax."),
        ("There are multiple pulmonary nodules.", "There are no multiple pulmonary nodules."),
        ("Large right pleural effusion.", "No right pleural effusion."),
        ("The cardiac silhouette is enlarged.", "The cardiac silhouette is not enlarged."),
        ("A 2.5 cm lesion is seen in the right hepatic lobe.", "No lesion is seen in the right hepatic lobe."),
        ("Enhancing renal mass measuring 1.5 cm.", "No enhancing renal mass measuring 1.5 cm."),
        ("Blunting of the left costophrenic angle", "No blunting of the left costophrenic angle."),
        ("Cardiomegaly.", "No cardiomegaly."),
        ("No pneumothorax.", None),
        ("The lungs are clear without effusion.", None),
        ("A trace right pleural effusion cannot be excluded.", None),
        ("Possible small right pleural effusion.", None),
    ],
)
def test_negate(sentence: str, negated: str | None) -> None:
    assert negate(sentence) == negated


@pytest.mark.parametrize(
    ("sentence", "swapped"),
    [
        ("Large left pneumothorax.", "Large right pneumothorax."),
        ("RIGHT lower lobe nodule; Right hilum normal.", "LEFT lower lobe nodule; Left hilum normal."),
        ("Moderate bilateral pleural effusions.", None),
        ("Left effusion, right pneumothorax.", None),  # both sides named: a swap says the same thing
        ("The heart is enlarged.", None),
        ("Leftover contrast in the bowel.", None),  # whole words only
    ],
)
def test_swap_laterality(sentence: str, swapped: str | None) -> None:
    assert swap_laterality(sentence) == swapped


@pytest.mark.parametrize(
    ("sentence", "affirmed"),
    [
        ("No pneumothorax.", "Pneumothorax."),
        ("No focal consolidation or pulmonary nodule.", "Focal consolidation or pulmonary nodule."),
        ("There is no pleural effusion.", "There is pleural effusion."),
        ("The cardiac silhouette is not enlarged.", "The cardiac silhouette is enlarged."),
        ("The lungs are clear without focal consolidation.", "The lungs are clear with focal consolidation."),
        ("Negative for renal calculi.", "Positive for renal calculi."),
        ("Small left pleural effusion.", None),
        ("Normal chest radiograph.", None),
        ("A pneumothorax cannot be excluded.", None),
        ("No definite nodule, though a small one may be present.", None),
    ],
)
def test_affirm(sentence: str, affirmed: str | None) -> None:
    from medvlp.data.perturb import affirm

    assert affirm(sentence) == affirmed


def test_affirm_undoes_negate() -> None:
    from medvlp.data.perturb import affirm

    for s in ("Cardiomegaly.", "There is a large left pneumothorax.", "The cardiac silhouette is enlarged."):
        twin = negate(s)
        assert twin is not None and affirm(twin) is not None and "no" not in affirm(twin).lower().split()


@pytest.mark.parametrize(
    "sentence",
    [
        "Equivocal small left pneumothorax.",  # hedged: neither present nor absent
        "Suspected nodular opacity over the right mid lung zone.",
        "Cannot exclude a small liver lesion.",
        "A trace effusion is not excluded.",
        "Findings could represent atelectasis.",
        "The visualized osseous structures are intact.",  # normality states no finding
        "The lungs are clear.",
        "As above.",  # states nothing of its own
        "See findings above.",
        "Recommend follow-up chest CT.",
        "Correlate clinically.",
        "Clinical correlation is recommended.",
        "Findings as described above.",  # the synthetic cohorts' own pointers
        "Impression as above.",
        "Please see findings above.",
        "May represent a small left effusion.",
    ],
)
def test_hedged_normal_and_empty_sentences_have_no_twin(sentence: str) -> None:
    """A report's boilerplate and hedges state no finding: neither rule makes a twin, so the prompt miner does not
    read them as stating a finding (``medvlp.tasks.mined_prompts.sentence_polarity``)."""
    from medvlp.data.perturb import affirm
    from medvlp.tasks.mined_prompts import sentence_polarity

    assert negate(sentence) is None
    assert affirm(sentence) is None
    assert sentence_polarity(sentence) is None


def test_hedged_negation_is_not_affirmed() -> None:
    from medvlp.data.perturb import affirm

    assert affirm("No pneumothorax, though a tiny one cannot be ruled out.") is None
    assert affirm("No suspected pneumothorax.") is None
    assert affirm("No pneumothorax.") == "Pneumothorax."


@pytest.mark.parametrize(
    "sentence",
    [
        "Compared with the study from May 2019, there is a new left effusion.",  # a month, not a hedge
        "Follow-up CT demonstrates an enlarging right renal mass.",
        "As noted previously, there is a 2 cm left renal mass.",
        "Cardiomegaly with clear lungs.",
        "Indeterminate 5 mm nodule in the right upper lobe.",  # the nodule is there; its nature is open
    ],
)
def test_finding_sentences_near_the_hedge_and_boilerplate_words_keep_their_twin(sentence: str) -> None:
    assert negate(sentence) is not None


@pytest.mark.parametrize(
    ("sentence", "changed"),
    [
        ("Small left pleural effusion.", "Large left pleural effusion."),
        ("Large right pneumothorax.", "Small right pneumothorax."),
        ("Mild hydronephrosis of the right kidney.", "Severe hydronephrosis of the right kidney."),
        ("SEVERE cardiomegaly.", "MILD cardiomegaly."),
        ("A 8 mm stone in the lower pole.", "A 32 mm stone in the lower pole."),  # small measurements grow
        ("There is a 2 x 3 cm renal mass.", "There is a 0.5 x 0.8 cm renal mass."),  # large ones shrink, all numbers
        ("Small nodule measuring 8 mm.", "Large nodule measuring 32 mm."),  # words and numbers agree after
        ("Moderate ascites.", "Mild ascites."),
        ("Cardiomegaly.", None),  # nothing to turn around
        ("No large effusion.", None),
        ("Possible small nodule.", None),
        ("Recommend follow-up in 6 mm increments.", None),  # no statement of its own
        ("The smallest nodule is unchanged.", None),  # whole words only: "smallest" is no size word
    ],
)
def test_change_severity(sentence: str, changed: str | None) -> None:
    from medvlp.data.perturb import change_severity

    assert change_severity(sentence) == changed


def test_severity_is_a_hard_negative_rule_of_the_config_and_of_twins() -> None:
    from medvlp.config import AlignStageConfig
    from medvlp.data.perturb import twins

    config = AlignStageConfig(steps=1, batch_size=2, lr=1e-3, twin_weight=1.0, hard_negatives=["severity"])
    assert config.hard_negatives == ["severity"]
    assert twins("Small left pleural effusion.", ["negation", "severity"]) == [
        "No left pleural effusion.",
        "Large left pleural effusion.",
    ]


def test_named_sides_reads_whole_words_in_any_case() -> None:
    assert named_sides("Small LEFT effusion. Right nodule.") == {"left", "right"}
    assert named_sides("Left pleural effusion.") == {"left"}
    assert named_sides("Leftover contrast; righteous bright lungs.") == set()


@pytest.mark.parametrize(
    ("sentence", "twin", "way"),
    [
        ("Small left pleural effusion.", negate("Small left pleural effusion."), 1),  # a negated twin: the statement
        ("There is a 2 cm renal mass.", "There is no renal mass.", 1),
        ("No pneumothorax.", affirm("No pneumothorax."), -1),  # an affirmed twin: the denial must win
        ("The heart is not enlarged.", "The heart is enlarged.", -1),
        (negate("Hepatic lesion is seen."), "Hepatic lesion is seen.", -1),  # an absence pair (negated phrase, phrase)
        ("Small left pleural effusion.", "Small right pleural effusion.", 0),  # sides, severity: neither way
        ("Small left pleural effusion.", "Large left pleural effusion.", 0),
        ("Small left pleural effusion.", "There is no renal mass.", 0),  # not a pair of these rules
    ],
)
def test_polarity_reads_which_way_a_pair_says_no(sentence: str, twin: str, way: int) -> None:
    assert polarity(sentence, twin) == way
