"""Radiology report text: sections (FINDINGS, IMPRESSION, ...) and normalization for duplicate detection."""

from __future__ import annotations

import re

_HEADER = re.compile(r"^\s*([A-Z][A-Z /&]{2,40}):\s*", re.MULTILINE)
_KNOWN = {
    "findings": "findings",
    "finding": "findings",
    "impression": "impression",
    "impressions": "impression",
    "conclusion": "impression",
    "indication": "indication",
    "clinical history": "indication",
    "history": "indication",
    "technique": "technique",
    "comparison": "comparison",
}


def split_sections(report: str) -> dict[str, str]:
    """Split a report on upper-case headers such as ``FINDINGS:`` and ``IMPRESSION:``.

    Returns:
        Section name (lower case, synonyms merged: CONCLUSION -> impression) -> text. Text before the first
        header, or a report with no header at all, is returned under ``"body"``.
    """
    out: dict[str, str] = {}
    matches = list(_HEADER.finditer(report))
    head = report[: matches[0].start()] if matches else report
    if head.strip():
        out["body"] = " ".join(head.split())
    nexts = [*matches[1:], None] if matches else []
    for m, nxt in zip(matches, nexts, strict=True):
        name = m.group(1).strip().lower()
        name = _KNOWN.get(name, name)
        text = " ".join(report[m.end() : nxt.start() if nxt else len(report)].split())
        if text:
            out[name] = f"{out[name]} {text}" if name in out else text
    return out


def report_text(report: str, sections: list[str]) -> str:
    """The parts of a report the text tower sees: the chosen sections in order, or the whole report."""
    parts = split_sections(report)
    chosen = [parts[s] for s in sections if s in parts]
    return " ".join(chosen) if chosen else " ".join(report.split())


def normalize_report(text: str) -> str:
    """Lower case, punctuation and extra spaces removed: near-identical normal reports compare equal."""
    return " ".join(re.sub(r"[^a-z0-9 ]+", " ", text.lower()).split())


def report_sentences(report: str, sections: list[str] | tuple[str, ...] = ("findings", "impression")) -> list[str]:
    """The sentences of a report's chosen sections (what a user might ask the model to ground)."""
    return text_sentences(report_text(report, list(sections)))


def text_sentences(text: str) -> list[str]:
    """The sentences of a text (split after ``.``, ``!`` or ``?``), fragments of 3 characters or less left out."""
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if len(s.strip()) > 3]
