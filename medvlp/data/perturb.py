"""Rule-based perturbations of report sentences: a negated twin and a laterality-swapped twin.

They are hard negatives that differ from the true sentence in one clinically decisive way ("small left effusion"
against "no effusion" or "small right effusion"), the idea behind text-side hard negatives made by perturbing the
description. The rules read grammar, not a list of findings, so they work on any finding vocabulary:

- :func:`negate` turns an affirmative finding sentence into its negation ("There is a 2 cm renal mass." -> "There is
  no renal mass."; "The heart is enlarged." -> "The heart is not enlarged."; "Large left pneumothorax." -> "No
  left pneumothorax."); a sentence that is already negated, hedged ("Equivocal small pneumothorax.", "Suspected
  nodule."), a statement of normality ("The osseous structures are intact.") or a sentence that states nothing of its
  own ("Recommend follow-up chest CT.", "As above.") has no twin (None);
- :func:`swap_laterality` swaps left and right ("left" <-> "right", keeping case); a sentence without a side, or
  with both, has no twin (None);
- :func:`affirm` is the reverse of :func:`negate`: a negated sentence made affirmative ("No pneumothorax." ->
  "Pneumothorax."; "There is no effusion." -> "There is effusion."; "The heart is not enlarged." -> "The heart is
  enlarged."); an affirmative or uncertain sentence has no twin. As a hard negative it tells a normal image that the
  finding its report denies is not there, which a sentence-embedding text tower, blind to "no", does not learn from
  the reports alone;
- :func:`change_severity` turns size and severity around ("Small left pleural effusion." -> "Large left pleural
  effusion."; "Mild hydronephrosis." -> "Severe hydronephrosis."; "A 8 mm nodule." -> "A 32 mm nodule."): every
  size or severity word becomes its opposite and every measurement is scaled by four (up below 20 mm, down from
  it), so a sentence stays consistent with itself; a sentence with neither, or one that is negated, hedged or no
  statement, has no twin.
"""

from __future__ import annotations

import re

__all__ = [
    "PERTURBATIONS",
    "affirm",
    "change_severity",
    "mirror_sides",
    "named_sides",
    "negate",
    "polarity",
    "swap_laterality",
    "twins",
]

#: Words that hedge a sentence (it states neither presence nor absence), as report labellers read uncertainty
#: ("may" not before a number: "May 2019" is a month).
_HEDGES = (
    r"cannot be excluded|cannot be ruled out|cannot exclude|cannot rule out|not excluded|possible|possibly|"
    r"may(?!\s+\d)|might|could|questionable|suspicious for|suspected|equivocal|likely|probable|probably|presumed|"
    r"concerning for|suggestive of"
)
#: Words that state normality: "The osseous structures are intact." states no finding, so it has no negated twin
#: ("clear" and "intact" as what something is: "Cardiomegaly with clear lungs." keeps its twin).
_NORMALITY = r"unremarkable|normal|(?:is|are) (?:otherwise )?(?:clear|intact)"
#: Sentences that state no finding of their own: a recommendation or a pointer elsewhere ("Recommend follow-up chest
#: CT.", "Clinical correlation is recommended.", "As above.", "Findings as described above.").
_NOT_A_STATEMENT = re.compile(
    r"^\W*(?:please )?(?:recommend(?:ed)?|consider|suggest|advise|(?:clinical )?correlat\w*)\b"
    r"|\b(?:is|are) (?:recommended|advised|suggested)\b"
    r"|\b(?:as (?:described |noted |discussed )?above|see (?:the )?(?:findings )?above)\b"
    r"|^\W*follow-up (?:in|with|is|recommended)\b",
    re.I,
)
_NEGATED = re.compile(
    rf"\b(no|not|without|negative for|absent|free of|resolved|{_HEDGES}|{_NORMALITY})\b",
    re.I,
)
_SIDE = re.compile(r"\b(left|right)\b", re.I)
_SIZE = r"(?:(?:\d+(?:\.\d+)?\s*(?:mm|cm)|small|tiny|trace|mild|moderate|large|severe|massive)[\s,]+)*"
_THERE = re.compile(r"^there (is|are) (?:an? |some )?" + _SIZE + r"(.*)$", re.I)
_SEEN = re.compile(r"^(an? |the )?(.*?) (is|are) (seen|noted|present|identified|demonstrated|visible)\b(.*)$", re.I)
_IS_ADJ = re.compile(r"^(.*?) (is|are) (?!not\b)(\w+)(.*)$", re.I)
_LEAD = re.compile(r"^(?:an? |the )?" + _SIZE, re.I)


def _sentence(text: str) -> tuple[str, str]:
    body = " ".join(text.split())
    end = body[-1] if body and body[-1] in ".!?" else "."
    return body.rstrip(".!? "), end


def negate(sentence: str) -> str | None:
    """The negated twin of an affirmative finding sentence, or None when it is negated, hedged, a statement of
    normality or no statement of its own (see the module docstring)."""
    body, end = _sentence(sentence)
    if not body or _NEGATED.search(body) or _NOT_A_STATEMENT.search(body):
        return None
    if m := _THERE.match(body):
        return f"There {m.group(1).lower()} no {m.group(2)}{end}"
    if m := _SEEN.match(body):
        subject = _LEAD.sub("", m.group(2))
        return f"No {subject} {m.group(3).lower()} {m.group(4).lower()}{m.group(5)}{end}"
    if m := _IS_ADJ.match(body):
        return f"{m.group(1)} {m.group(2)} not {m.group(3)}{m.group(4)}{end}"
    rest = _LEAD.sub("", body)
    return f"No {rest[:1].lower()}{rest[1:]}{end}" if rest else None


def swap_laterality(sentence: str) -> str | None:
    """The sentence with left and right swapped (case kept), or None without exactly one side named."""
    return mirror_sides(sentence) if len(named_sides(sentence)) == 1 else None


def named_sides(text: str) -> set[str]:
    """The sides a text names, ``{"left"}``, ``{"right"}``, both or none (whole words, any case)."""
    return {m.group(1).lower() for m in _SIDE.finditer(text)}


def mirror_sides(text: str) -> str:
    """Every "left" made "right" and every "right" "left" (whole words, case kept): the report of the image mirrored
    across the patient's left-right axis. Unlike :func:`swap_laterality` it swaps a text naming both sides too.

    Only the words: abbreviations (LLL, RUL), "dextro-"/"levo-" and named structures whose side is part of their name
    ("left ventricle", which a mirror does not turn into a right ventricle) are not handled, one reason why mirroring
    is off by default."""

    def swap(m: re.Match[str]) -> str:
        word = m.group(1)
        other = "right" if word.lower() == "left" else "left"
        return other.upper() if word.isupper() else other.capitalize() if word[0].isupper() else other

    return _SIDE.sub(swap, text)


_UNCERTAIN = re.compile(rf"\b({_HEDGES})\b", re.I)
_AFFIRM_RULES = (  # (pattern, replacement) on the sentence body; the first that matches wins
    (re.compile(r"^there (is|are) no (.+)$", re.I), lambda m: f"There {m.group(1).lower()} {m.group(2)}"),
    (re.compile(r"^no (.+)$", re.I), lambda m: m.group(1)[:1].upper() + m.group(1)[1:]),
    (re.compile(r"^(.*?) (is|are) not (.+)$", re.I), lambda m: f"{m.group(1)} {m.group(2)} {m.group(3)}"),
    (re.compile(r"^(.*?)\bnegative for (.+)$", re.I), lambda m: f"{m.group(1)}positive for {m.group(2)}"),
    (re.compile(r"^(.*?)\bwithout (.+)$", re.I), lambda m: f"{m.group(1)}with {m.group(2)}"),
)


def affirm(sentence: str) -> str | None:
    """The affirmative twin of a negated finding sentence, or None when it is not negated or is uncertain."""
    body, end = _sentence(sentence)
    if not body or _UNCERTAIN.search(body) or _NOT_A_STATEMENT.search(body):
        return None
    for pattern, make in _AFFIRM_RULES:
        if m := pattern.match(body):
            text = make(m)
            return f"{text[:1].upper()}{text[1:]}{end}"
    return None


#: Each size or severity word and the one it becomes (grammar, not findings: these qualify any finding).
_OPPOSITE = {
    "small": "large", "tiny": "large", "trace": "large", "minimal": "extensive", "mild": "severe",
    "slight": "marked", "moderate": "mild", "large": "small", "massive": "small", "extensive": "minimal",
    "severe": "mild", "marked": "slight",
}  # fmt: skip
_SEVERITY = re.compile(rf"\b({'|'.join(_OPPOSITE)})\b", re.I)
#: A measurement, one number or several ("2 x 3 cm"), and its unit.
_MEASURE = re.compile(r"\b(\d+(?:\.\d+)?(?:\s*[x\u00d7]\s*\d+(?:\.\d+)?)*)\s*(mm|cm)\b", re.I)
_NUMBER = re.compile(r"\d+(?:\.\d+)?")


def _opposite(m: re.Match[str]) -> str:
    word = m.group(1)
    other = _OPPOSITE[word.lower()]
    return other.upper() if word.isupper() else other.capitalize() if word[0].isupper() else other


def _rescale(m: re.Match[str]) -> str:
    unit = m.group(2)
    per_mm = 10.0 if unit.lower() == "cm" else 1.0
    factor = 4.0 if max(float(x) for x in _NUMBER.findall(m.group(1))) * per_mm < 20 else 0.25

    def scaled(n: re.Match[str]) -> str:
        value = round(float(n.group(0)) * factor, 1)
        return f"{value:g}"

    return f"{_NUMBER.sub(scaled, m.group(1))} {unit}"


def change_severity(sentence: str) -> str | None:
    """The sentence with size and severity turned around (see the module docstring), or None when it has no size or
    severity word or measurement, or is negated, hedged or no statement of its own."""
    body, end = _sentence(sentence)
    if not body or _NEGATED.search(body) or _NOT_A_STATEMENT.search(body):
        return None
    if not (_SEVERITY.search(body) or _MEASURE.search(body)):
        return None
    return f"{_MEASURE.sub(_rescale, _SEVERITY.sub(_opposite, body))}{end}"


#: The perturbations by name, as configs and reports name them.
PERTURBATIONS = {"negation": negate, "laterality": swap_laterality, "affirmation": affirm, "severity": change_severity}


def polarity(sentence: str, twin: str) -> int:
    """Which way a (winner, twin) pair reads "no": 1 when the twin is the winner negated (the statement must win), -1
    when the winner is the twin negated or the twin the winner affirmed (the denial must win), 0 otherwise (a side or
    severity change, or no pair of these rules)."""
    if negate(sentence) == twin:
        return 1
    if negate(twin) == sentence or affirm(sentence) == twin:
        return -1
    return 0


def twins(sentence: str, kinds: list[str] | tuple[str, ...] = tuple(PERTURBATIONS)) -> list[str]:
    """The sentence's twins under each perturbation of ``kinds`` that applies (in that order)."""
    unknown = [k for k in kinds if k not in PERTURBATIONS]
    if unknown:
        raise ValueError(f"unknown perturbations {unknown} (known: {', '.join(PERTURBATIONS)})")
    return [t for t in (PERTURBATIONS[k](sentence) for k in kinds) if t is not None]
