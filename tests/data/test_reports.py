"""Report sections and sentences, with and without section headers."""

from __future__ import annotations

from medvlp.data.reports import report_sentences, report_text, split_sections, text_sentences


def test_a_report_without_headers_is_its_body() -> None:
    report = "Small left effusion.  No pneumothorax."
    assert split_sections(report) == {"body": "Small left effusion. No pneumothorax."}
    assert report_text(report, ["findings", "impression"]) == "Small left effusion. No pneumothorax."
    assert report_sentences(report) == ["Small left effusion.", "No pneumothorax."]


def test_sections_are_split_on_headers_and_synonyms_merge() -> None:
    report = "History: cough.\nFINDINGS: Enlarged heart. No effusion.\nCONCLUSION: Cardiomegaly."
    parts = split_sections(report)
    assert parts["findings"] == "Enlarged heart. No effusion."
    assert parts["impression"] == "Cardiomegaly."
    assert report_text(report, ["impression", "findings"]) == "Cardiomegaly. Enlarged heart. No effusion."


def test_empty_text_has_no_sentences() -> None:
    assert split_sections("") == {}
    assert text_sentences("") == []
    assert text_sentences("Ok. A 2 cm mass! Is it?") == ["A 2 cm mass!", "Is it?"]
