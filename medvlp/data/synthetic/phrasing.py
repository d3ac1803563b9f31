"""Report language of styled synthetic cohorts: several ways to say each finding, each negation and each hedge.

Each finding has banks of templates (``present``, ``impression``, ``negation``, ``hedged`` noun phrases and, for
findings that can be bilateral, ``bilateral`` and ``bilateral_impression``); a :class:`~.style.Style` keeps two or
three templates of each bank and two or three of the uncertainty templates in :data:`HEDGES`, and decides how often
a finding is written only in FINDINGS or only in IMPRESSION. The built-in cohorts (no style) use
:mod:`medvlp.data.synthetic.reports` unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from medvlp.data.synthetic.reports import _article, _assemble, _cap, _size_mm

if TYPE_CHECKING:
    from medvlp.data.synthetic.style import Style

HEDGES = [
    "Possible {np}.",
    "{Np} cannot be excluded.",
    "Findings may represent {np}.",
    "Questionable {np}.",
    "Suspected {np}.",
    "Equivocal {np}.",
    "Cannot exclude {np}.",
]

BANKS: dict[str, dict[str, dict[str, list[str]]]] = {
    "cxr": {
        "cardiomegaly": {
            "present": [
                "The heart is enlarged.",
                "{Grade} cardiomegaly.",
                "The cardiac silhouette is enlarged.",
                "Enlarged cardiac silhouette, cardiothoracic ratio {ctr}.",
                "The heart size is increased.",
                "Cardiomegaly is present.",
            ],
            "impression": ["Cardiomegaly.", "{Grade} cardiomegaly.", "Enlarged heart.", "Enlarged cardiac silhouette."],
            "negation": [
                "The heart size is normal.",
                "Heart size is within normal limits.",
                "The cardiac silhouette is not enlarged.",
                "No cardiomegaly.",
                "Normal cardiac silhouette.",
            ],
            "hedged": ["mild cardiomegaly", "mild enlargement of the cardiac silhouette", "borderline heart size"],
        },
        "pleural_effusion": {
            "present": [
                "{Size} {side} pleural effusion.",
                "There is a {size} {side} pleural effusion.",
                "Blunting of the {side} costophrenic angle, in keeping with a {size} effusion.",
                "{Size} {side}-sided pleural effusion.",
                "{Size} {side} effusion with fluid tracking along the lateral chest wall.",
            ],
            "bilateral": [
                "{Size} bilateral pleural effusions.",
                "Bilateral {size} pleural effusions.",
                "Blunting of both costophrenic angles, in keeping with {size} bilateral effusions.",
                "{Size} pleural effusions on both sides.",
            ],
            "impression": ["{Size} {side} pleural effusion.", "{Side} pleural effusion.", "{Side} effusion."],
            "bilateral_impression": [
                "Bilateral pleural effusions.",
                "{Size} bilateral effusions.",
                "Bilateral effusions.",
            ],
            "negation": [
                "No pleural effusion.",
                "There is no pleural effusion.",
                "The costophrenic angles are sharp, without effusion.",
                "No effusion.",
                "Costophrenic angles are clear without pleural fluid.",
            ],
            "hedged": [
                "small {side} pleural effusion",
                "blunting of the {side} costophrenic angle from a small effusion",
                "trace {side} pleural fluid",
            ],
        },
        "lung_nodule": {
            "present": [
                "{A} {size} nodule in the {lobe}.",
                "There is {a} {size} rounded nodular opacity in the {lobe}.",
                "{A} {size} pulmonary nodule projects over the {zone}.",
                "{A} {size} solitary pulmonary nodule in the {lobe}.",
                "Nodule in the {lobe} measuring {size}.",
            ],
            "impression": [
                "{Size} {lobe} pulmonary nodule. Recommend follow-up chest CT.",
                "{Size} nodule in the {lobe}.",
                "{Lobe} pulmonary nodule.",
            ],
            "negation": [
                "No pulmonary nodule.",
                "No suspicious pulmonary nodule.",
                "No focal nodule or mass.",
                "No nodular opacity is seen.",
            ],
            "hedged": ["{size} nodule in the {lobe}", "nodular opacity over the {zone}", "small nodule in the {lobe}"],
        },
        "pneumothorax": {
            "present": [
                "{Size} {side} pneumothorax.",
                "There is a {size} {side} pneumothorax with a visible pleural line {where}.",
                "{Size} {side}-sided pneumothorax {where}.",
                "A {size} pneumothorax is seen on the {side}, {where}.",
            ],
            "impression": ["{Size} {side} pneumothorax.", "{Side} pneumothorax.", "{Side}-sided pneumothorax."],
            "negation": [
                "No pneumothorax.",
                "There is no pneumothorax.",
                "No evidence of pneumothorax.",
                "No pneumothorax is seen.",
            ],
            "hedged": [
                "tiny {side} apical pneumothorax",
                "a thin {side} apical pleural line from a small pneumothorax",
                "small {side} pneumothorax",
            ],
        },
    },
    "ct": {
        "renal_mass": {
            "present": [
                "A {size} enhancing mass in the {pole} of the {side} kidney.",
                "There is a {size} heterogeneous solid mass arising from the {side} kidney.",
                "A {size} exophytic enhancing {side} renal mass at the {pole}.",
                "{Side} renal mass measuring {size}.",
                "Solid enhancing {side} renal lesion, {size}, suspicious for renal cell carcinoma.",
            ],
            "impression": [
                "{Size} {side} renal mass, suspicious for renal cell carcinoma.",
                "Enhancing {side} renal mass measuring {size}.",
                "{Side} renal mass.",
            ],
            "negation": [
                "No renal mass.",
                "The kidneys enhance symmetrically without focal mass.",
                "No solid renal mass.",
                "No suspicious renal lesion.",
            ],
            "hedged": [
                "a small {side} renal mass",
                "a complex cyst or small solid mass of the {side} kidney",
                "an indeterminate {size} {side} renal lesion",
            ],
        },
        "kidney_stone": {
            "present": [
                "{A} {size} nonobstructing stone in the {pole} of the {side} kidney.",
                "There is {a} {size} {side} renal calculus.",
                "{Side} nephrolithiasis with {a} {size} stone in the {pole}.",
                "{A} {size} calcified stone in the {side} kidney.",
            ],
            "bilateral": [
                "Bilateral nonobstructing renal calculi, the largest {size}.",
                "Bilateral nephrolithiasis, up to {size}.",
                "Stones in both kidneys, the largest {size}.",
            ],
            "impression": [
                "{Size} nonobstructing {side} renal stone.",
                "{Side} nephrolithiasis.",
                "{Side} renal calculus.",
            ],
            "bilateral_impression": [
                "Bilateral nephrolithiasis.",
                "Bilateral renal calculi.",
                "Bilateral nonobstructing renal stones.",
            ],
            "negation": [
                "No renal calculi.",
                "There is no nephrolithiasis.",
                "No nephrolithiasis or hydronephrosis.",
                "No urinary tract stones.",
            ],
            "hedged": ["a tiny {side} renal calculus", "a punctate {side} renal stone", "tiny {side} nephrolithiasis"],
        },
        "hepatic_lesion": {
            "present": [
                "{A} {size} hypodense lesion in the {lobe}.",
                "There is {a} {size} hypoattenuating lesion in the {lobe}.",
                "{A} {size} low-attenuation liver lesion in the {lobe}.",
                "Focal lesion in the {lobe} measuring {size}.",
            ],
            "impression": [
                "{Size} hypodense lesion in the {lobe}; recommend MRI for further characterization.",
                "{Size} hepatic lesion.",
                "Hypodense liver lesion.",
            ],
            "negation": [
                "The liver is unremarkable.",
                "No focal hepatic lesion.",
                "The liver is normal in size and attenuation without focal lesion.",
                "No focal liver lesion.",
            ],
            "hedged": [
                "a small hypodense lesion in the {lobe}",
                "a subcentimeter hypodensity in the {lobe}",
                "a small liver lesion",
            ],
        },
        "ascites": {
            "present": [
                "{Amount} volume ascites.",
                "{Amount} ascites in the paracolic gutters.",
                "There is {amount} free fluid in the abdomen.",
                "{Amount} amount of ascites.",
            ],
            "impression": ["{Amount} ascites.", "Ascites.", "{Amount} volume ascites."],
            "negation": ["No ascites or free air.", "There is no ascites.", "No free fluid.", "No ascites."],
            "hedged": ["trace ascites", "trace free fluid in the right paracolic gutter", "minimal ascites"],
        },
    },
}

_NORMAL_IMPRESSION = {
    "cxr": [
        "No acute cardiopulmonary abnormality.",
        "No acute cardiopulmonary process.",
        "Normal chest radiograph.",
        "No active disease in the chest.",
    ],
    "ct": [
        "No acute abnormality in the abdomen.",
        "No acute intra-abdominal process.",
        "Unremarkable CT of the abdomen.",
        "No acute findings.",
    ],
}
_OTHERWISE = {"cxr": "Otherwise no acute cardiopulmonary abnormality.", "ct": "Otherwise no acute abnormality."}
_AS_ABOVE = ["Findings as described above.", "See findings above.", "As above."]
_FILLER = {
    "cxr": [
        "The mediastinal contours are unremarkable.",
        "The visualized osseous structures are intact.",
        "No acute osseous abnormality.",
        "Mild degenerative changes of the thoracic spine.",
    ],
    "ct": [
        "The spleen, pancreas and adrenal glands are unremarkable.",
        "No lymphadenopathy.",
        "The abdominal aorta is normal in caliber.",
        "Colonic diverticulosis.",
    ],
}


def _vars(kind: str, finding: str, d: Mapping[str, Any]) -> dict[str, str]:
    """Template variables of one finding from its details; every string also capitalised (``{Size}``)."""
    v: dict[str, str] = {}
    if finding == "cardiomegaly":
        ctr = float(d["ctr"])
        v = {"ctr": f"{ctr:.2f}", "grade": "mild" if ctr < 0.6 else ("moderate" if ctr < 0.65 else "marked")}
    elif finding == "pneumothorax":
        where = "at the apex" if d["location"] == "apical" else "along the lateral chest wall"
        v = {"size": d["size"], "side": d["side"], "where": where}
    elif finding in ("pleural_effusion", "ascites"):
        v = {k: str(x) for k, x in d.items()}
    else:
        mm = float(d["diameter_mm"])
        if finding == "renal_mass":
            size = f"{mm / 10:.1f} cm"
        elif finding == "kidney_stone":
            size = f"{round(mm):d} mm"
        else:
            size = _size_mm(mm)
        v = {k: str(x) for k, x in d.items() if k != "diameter_mm"} | {"size": size, "a": _article(size).lower()}
    return v | {k.capitalize(): _cap(x) for k, x in v.items()}


def _say(rng: np.random.Generator, templates: list[str], allowed: list[int], v: Mapping[str, str]) -> str:
    return _cap(templates[allowed[int(rng.integers(len(allowed)))]].format(**v))


def _hedge(rng: np.random.Generator, kind: str, finding: str, style: Style, v: Mapping[str, str]) -> str:
    np_text = _say(rng, BANKS[kind][finding]["hedged"], style.phrasing[finding]["hedged"], v)
    np_text = np_text[:1].lower() + np_text[1:]
    return _say(rng, HEDGES, style.hedges, {"np": np_text, "Np": _cap(np_text)})


def styled_report(
    kind: str,
    states: Mapping[str, str],
    details: Mapping[str, Mapping[str, Any]],
    rng: np.random.Generator,
    style: Style,
) -> tuple[str, dict[str, str]]:
    """A report in the style's language and, per present finding, the sentence that describes it.

    The sentence is the FINDINGS one, or the IMPRESSION one when the style wrote the finding only there.
    """
    banks = BANKS[kind]
    order = [c for c in style.column_order if c in banks]
    body: list[str] = []
    impression: list[str] = []
    label_text: dict[str, str] = {}
    positives = [f for f in order if states[f] in ("present", "uncertain")]
    for f in order:
        state = states[f]
        if state == "unmentioned":
            continue
        allowed = style.phrasing[f]
        if state == "absent":
            body.append(_say(rng, banks[f]["negation"], allowed["negation"], {}))
            continue
        v = _vars(kind, f, details[f])
        if state == "uncertain":
            sentence, summary = _hedge(rng, kind, f, style, v), _hedge(rng, kind, f, style, v)
        else:
            both = details[f].get("side") == "bilateral"
            bank, imp_bank = ("bilateral", "bilateral_impression") if both else ("present", "impression")
            sentence = _say(rng, banks[f][bank], allowed[bank], v)
            summary = _say(rng, banks[f][imp_bank], allowed[imp_bank], v)
        u = rng.random()
        where = "findings" if u < style.p_findings_only else (
            "impression" if u < style.p_findings_only + style.p_impression_only else "both"
        )  # fmt: skip
        if where != "impression":
            body.append(sentence)
        if where != "findings":
            impression.append(summary)
        if state == "present":
            label_text[f] = sentence if where != "impression" else summary
    fillers = _FILLER[kind]
    body += [fillers[i] for i in sorted(rng.choice(len(fillers), size=int(rng.integers(0, 3)), replace=False))]
    normal = _NORMAL_IMPRESSION[kind][style.seed % len(_NORMAL_IMPRESSION[kind])]
    if not positives:
        impression = [normal]
    else:
        if not impression:
            impression = [_AS_ABOVE[style.seed % len(_AS_ABOVE)]]
        if not any(states[f] == "present" for f in positives):
            impression.append(_OTHERWISE[kind])
    if not body:
        body = ["See impression."]
    return _assemble(body, impression, rng), label_text
