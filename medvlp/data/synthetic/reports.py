"""Radiology report language of the synthetic cohorts.

A report has a ``FINDINGS:`` and an ``IMPRESSION:`` section. Every finding is, by its state, affirmed
(``present``), negated (``absent``), hedged with an uncertainty cue (``uncertain``: "possible", "cannot be
excluded", "may represent", "questionable") or not named at all (``unmentioned``). Normal studies mostly
reuse one of a few fixed templates, so many normal reports are near-identical, as in real archives.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from medvlp.data.synthetic.common import pick

# ------------------------------------------------------------------ helpers


def _article(text: str) -> str:
    """'A' or 'An' before a measurement such as '8 mm' or '1.1 cm'."""
    return "An" if text.startswith(("8", "11 ", "18 ")) else "A"


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _size_mm(d_mm: float) -> str:
    return f"{round(d_mm):d} mm" if d_mm < 10 else f"{d_mm / 10:.1f} cm"


def _assemble(findings: list[str], impression: list[str], rng: np.random.Generator) -> str:
    if len(impression) > 1 and rng.random() < 0.5:
        imp = "\n".join(f"{k + 1}. {s}" for k, s in enumerate(impression))
    else:
        imp = " ".join(impression)
    return "FINDINGS:\n" + " ".join(findings) + "\n\nIMPRESSION:\n" + imp


def _neg(options: list[str], style: int, rng: np.random.Generator, normal: bool) -> str:
    """The style's negation most of the time (always in normal studies), another phrasing otherwise."""
    if normal or rng.random() < 0.6:
        return options[style % len(options)]
    return pick(rng, options)


def _mention(f: str, states: Mapping[str, str], said: Mapping[str, tuple[str, str]], negation: str) -> str:
    """The findings sentence of finding ``f``: its negation, its description, or nothing."""
    if states[f] == "absent":
        return negation
    return "" if states[f] == "unmentioned" else said[f][0]


def _finish(
    body: list[str], said: Mapping[str, tuple[str, str]], states: Mapping[str, str], normal_impression: str,
    otherwise: str, rng: np.random.Generator,
) -> tuple[str, dict[str, str]]:  # fmt: skip
    """Assembles the report; also returns, per present finding, the findings sentence describing it."""
    present = [f for f in said if states[f] == "present"]
    if not said:
        impression = [normal_impression]
    else:
        impression = [said[f][1] for f in present] + [said[f][1] for f in said if states[f] == "uncertain"]
        if not present:
            impression.append(otherwise)
    return _assemble([s for s in body if s], impression, rng), {f: said[f][0] for f in present}


# ------------------------------------------------------------------ chest radiographs

_CXR_NEG = {
    "cardiomegaly": [
        "The heart size is normal.",
        "Heart size is within normal limits.",
        "The cardiomediastinal silhouette is within normal limits.",
    ],
    "lung_nodule": [
        "The lungs are clear without focal consolidation or nodule.",
        "The lungs are clear without focal consolidation or nodule.",
        "No focal consolidation or pulmonary nodule.",
        "No suspicious pulmonary nodule.",
    ],
    "pleural_effusion": [
        "No pleural effusion.",
        "There is no pleural effusion.",
        "The costophrenic angles are sharp without pleural effusion.",
    ],
    "pneumothorax": ["No pneumothorax.", "There is no pneumothorax.", "No evidence of pneumothorax."],
}
_CXR_NEG_PLEURA = [
    "No pleural effusion or pneumothorax.",
    "There is no pleural effusion or pneumothorax.",
    "No pleural effusion or pneumothorax is seen.",
]
_CXR_MEDIASTINUM = ["The mediastinal contours are unremarkable.", "", ""]
_CXR_BONES = [
    "The visualized osseous structures are intact.",
    "No acute osseous abnormality.",
    "",
]
_CXR_NORMAL_IMPRESSION = [
    "No acute cardiopulmonary abnormality.",
    "No acute cardiopulmonary process.",
    "Normal chest radiograph.",
]
_CXR_INCIDENTAL = [
    "Mild degenerative changes of the thoracic spine.",
    "Atherosclerotic calcification of the aortic arch.",
    "Healed fracture of a right posterior rib.",
    "Surgical clips in the right upper quadrant.",
    "Mild thoracic dextroscoliosis.",
]


def _cxr_present(finding: str, d: Mapping[str, Any], rng: np.random.Generator) -> tuple[str, str]:
    """(findings sentence, impression sentence) of a present chest finding."""
    if finding == "cardiomegaly":
        ctr = d["ctr"]
        grade = "mild" if ctr < 0.6 else ("moderate" if ctr < 0.65 else "marked")
        sentence = pick(
            rng,
            [
                "The heart is enlarged.",
                f"{_cap(grade)} cardiomegaly.",
                f"The cardiac silhouette is enlarged, with a cardiothoracic ratio of {ctr:.2f}.",
                f"Cardiomegaly, cardiothoracic ratio approximately {ctr:.2f}.",
            ],
        )
        return sentence, pick(rng, [f"{_cap(grade)} cardiomegaly.", "Cardiomegaly."])
    if finding == "pleural_effusion":
        size, side = d["size"], d["side"]
        if side == "bilateral":
            options = [f"{_cap(size)} bilateral pleural effusions.", f"There are {size} bilateral pleural effusions."]
            imp = f"{_cap(size)} bilateral pleural effusions."
        else:
            options = [
                f"{_cap(size)} {side} pleural effusion.",
                f"There is a {size} {side} pleural effusion.",
                f"{_cap(size)} {side} pleural effusion with adjacent basilar opacity.",
            ]
            imp = f"{_cap(size)} {side} pleural effusion."
        return pick(rng, options), imp
    if finding == "lung_nodule":
        size = _size_mm(d["diameter_mm"])
        lobe, zone = d["lobe"], d["zone"]
        sentence = pick(
            rng,
            [
                f"{_article(size)} {size} nodule in the {lobe}.",
                f"There is {_article(size).lower()} {size} rounded nodular opacity in the {lobe}.",
                f"{_article(size)} well-circumscribed {size} pulmonary nodule projects over the {zone}.",
            ],
        )
        imp = pick(
            rng,
            [
                f"{_cap(size)} {lobe} pulmonary nodule. Recommend follow-up chest CT.",
                f"{_cap(size)} nodule in the {lobe}.",
            ],
        )
        return sentence, imp
    size, side, where = d["size"], d["side"], d["location"]
    if where == "apical":
        options = [
            f"{_cap(size)} {side} apical pneumothorax.",
            f"There is a {size} {side} pneumothorax with a visible pleural line at the apex.",
        ]
    else:
        options = [
            f"{_cap(size)} {side} pneumothorax along the lateral chest wall.",
            f"There is a {size} {side} pneumothorax with a visible pleural line along the lateral chest wall.",
        ]
    return pick(rng, options), f"{_cap(size)} {side} pneumothorax."


def _cxr_uncertain(finding: str, d: Mapping[str, Any], rng: np.random.Generator) -> tuple[str, str]:
    if finding == "cardiomegaly":
        sentence = pick(
            rng,
            [
                "The heart size is borderline; mild cardiomegaly cannot be excluded.",
                "Possible mild cardiomegaly.",
                "Questionable mild enlargement of the cardiac silhouette.",
            ],
        )
        return sentence, pick(
            rng, ["Possible mild cardiomegaly.", "Borderline heart size, possibly mild cardiomegaly."]
        )
    if finding == "pleural_effusion":
        side = d["side"]
        sentence = pick(
            rng,
            [
                f"Blunting of the {side} costophrenic angle may represent a small pleural effusion.",
                f"Possible small {side} pleural effusion.",
                f"A trace {side} pleural effusion cannot be excluded.",
            ],
        )
        return sentence, f"Possible small {side} pleural effusion."
    if finding == "lung_nodule":
        size, lobe, zone = _size_mm(d["diameter_mm"]), d["lobe"], d["zone"]
        sentence = pick(
            rng,
            [
                f"Questionable nodular opacity projecting over the {zone}, may represent a nipple shadow.",
                f"A possible {size} nodule in the {lobe}.",
                f"A small nodule in the {lobe} cannot be excluded.",
            ],
        )
        return sentence, f"Possible small nodule in the {lobe}; consider chest CT."
    side = d["side"]
    sentence = pick(
        rng,
        [
            f"A tiny {side} apical pneumothorax cannot be excluded.",
            f"Possible tiny {side} apical pneumothorax.",
            f"Questionable thin {side} apical pleural line, may represent a small pneumothorax.",
        ],
    )
    return sentence, f"Possible tiny {side} apical pneumothorax."


def cxr_report(
    states: Mapping[str, str], details: Mapping[str, Mapping[str, Any]], rng: np.random.Generator
) -> tuple[str, dict[str, str]]:
    """A chest radiograph report and, per present finding, the findings sentence that describes it."""
    style = int(rng.integers(3))
    order = ("pneumothorax", "pleural_effusion", "lung_nodule", "cardiomegaly")
    said = {
        f: (_cxr_present if states[f] == "present" else _cxr_uncertain)(f, details[f], rng)
        for f in order
        if states[f] in ("present", "uncertain")
    }
    normal = not said
    neg = {f: _neg(_CXR_NEG[f], style, rng, normal) for f in _CXR_NEG}
    if not all(states[f] in ("absent", "unmentioned") for f in ("pleural_effusion", "pneumothorax")):
        neg["lung_nodule"] = _neg(_CXR_NEG["lung_nodule"][2:], style, rng, normal)  # the lungs are not "clear"
    body = [_mention("cardiomegaly", states, said, neg["cardiomegaly"]), _CXR_MEDIASTINUM[style]]
    body.append(_mention("lung_nodule", states, said, neg["lung_nodule"]))
    if states["pleural_effusion"] == "absent" and states["pneumothorax"] == "absent" and rng.random() < 0.8:
        body.append(_neg(_CXR_NEG_PLEURA, style, rng, normal))
    else:
        body += [_mention(f, states, said, neg[f]) for f in ("pleural_effusion", "pneumothorax")]
    if rng.random() < 0.15:
        body.append(pick(rng, _CXR_INCIDENTAL))
    body.append(_CXR_BONES[style])
    otherwise = "Otherwise no acute cardiopulmonary abnormality."
    return _finish(body, said, states, _CXR_NORMAL_IMPRESSION[style], otherwise, rng)


# ------------------------------------------------------------------ abdominal CT

_CT_NEG = {
    "hepatic_lesion": [
        "The liver is unremarkable.",
        "The liver is normal in size and attenuation without focal lesion.",
        "No focal hepatic lesion.",
    ],
    "renal_mass": ["No renal mass.", "The kidneys enhance symmetrically without focal mass.", "No solid renal mass."],
    "kidney_stone": ["No renal calculi.", "There is no nephrolithiasis.", "No nephrolithiasis or hydronephrosis."],
    "ascites": ["No ascites or free air.", "There is no ascites.", "No free fluid."],
}
_CT_NEG_KIDNEYS = [
    "The kidneys are unremarkable without mass, stone or hydronephrosis.",
    "The kidneys enhance symmetrically without mass, calculus or hydronephrosis.",
    "No renal mass, nephrolithiasis or hydronephrosis.",
]
_CT_LIVER_AND_OTHERS = "The liver, spleen, pancreas and adrenal glands are unremarkable."
_CT_OTHER_ORGANS = [
    "The spleen, pancreas and adrenal glands are unremarkable.",
    "The spleen and pancreas are unremarkable.",
    "Normal spleen, pancreas and adrenal glands.",
]
_CT_VESSELS = [
    "The abdominal aorta is normal in caliber. No lymphadenopathy.",
    "No abdominal lymphadenopathy.",
    "No lymphadenopathy.",
]
_CT_BONES = ["The visualized osseous structures are unremarkable.", "", ""]
_CT_NORMAL_IMPRESSION = [
    "No acute abnormality in the abdomen.",
    "No acute intra-abdominal process.",
    "Unremarkable CT of the abdomen.",
]
_CT_INCIDENTAL = [
    "Mild degenerative changes of the lumbar spine.",
    "Colonic diverticulosis.",
    "Small hiatal hernia.",
    "Atherosclerotic calcification of the abdominal aorta.",
    "Small fat-containing umbilical hernia.",
]


def _ct_present(finding: str, d: Mapping[str, Any], rng: np.random.Generator) -> tuple[str, str]:
    if finding == "renal_mass":
        size, side, pole = f"{d['diameter_mm'] / 10:.1f} cm", d["side"], d["pole"]
        sentence = pick(
            rng,
            [
                f"A {size} enhancing mass in the {pole} of the {side} kidney.",
                f"There is a {size} heterogeneous solid mass arising from the {pole} of the {side} kidney, "
                "suspicious for renal cell carcinoma.",
                f"A {size} exophytic enhancing {side} renal mass at the {pole}.",
            ],
        )
        imp = pick(
            rng,
            [
                f"{size} {side} renal mass, suspicious for renal cell carcinoma.",
                f"Enhancing {side} renal mass measuring {size}.",
            ],
        )
        return sentence, _cap(imp)
    if finding == "kidney_stone":
        size, side, pole = f"{round(d['diameter_mm']):d} mm", d["side"], d["pole"]
        sentence = pick(
            rng,
            [
                f"{_article(size)} {size} nonobstructing stone in the {pole} of the {side} kidney.",
                f"There is {_article(size).lower()} {size} {side} renal calculus.",
                f"{_cap(side)} nephrolithiasis with {_article(size).lower()} {size} stone in the {pole}.",
            ],
        )
        return sentence, pick(rng, [f"{size} nonobstructing {side} renal stone.", f"{_cap(side)} nephrolithiasis."])
    if finding == "hepatic_lesion":
        size, lobe = _size_mm(d["diameter_mm"]), d["lobe"]
        sentence = pick(
            rng,
            [
                f"{_article(size)} {size} hypodense lesion in the {lobe}.",
                f"There is {_article(size).lower()} {size} hypoattenuating lesion in the {lobe}.",
                f"{_article(size)} {size} low-attenuation lesion is seen in the {lobe}.",
            ],
        )
        imp = pick(
            rng,
            [
                f"{size} hypodense lesion in the {lobe}; recommend MRI for further characterization.",
                f"{size} hepatic lesion.",
            ],
        )
        return sentence, _cap(imp)
    amount = d["amount"]
    sentence = pick(
        rng,
        [
            f"{_cap(amount)} volume ascites.",
            f"{_cap(amount)} ascites in the paracolic gutters.",
            f"There is {amount} free fluid in the abdomen.",
        ],
    )
    return sentence, f"{_cap(amount)} ascites."


def _ct_uncertain(finding: str, d: Mapping[str, Any], rng: np.random.Generator) -> tuple[str, str]:
    if finding == "renal_mass":
        size, side, pole = f"{d['diameter_mm'] / 10:.1f} cm", d["side"], d["pole"]
        sentence = pick(
            rng,
            [
                f"A {size} hyperdense lesion in the {side} kidney may represent a complex cyst or a small renal mass.",
                f"Questionable small exophytic mass at the {pole} of the {side} kidney.",
                f"A small solid mass in the {side} kidney cannot be excluded.",
            ],
        )
        return (
            sentence,
            f"Indeterminate {size} {side} renal lesion, possibly a small renal mass; renal MRI is recommended.",
        )
    if finding == "kidney_stone":
        side = d["side"]
        sentence = pick(
            rng,
            [
                f"Questionable punctate density in the {side} kidney, possibly a tiny stone.",
                f"A tiny {side} renal calculus cannot be excluded.",
            ],
        )
        return sentence, f"Possible tiny {side} renal stone."
    if finding == "hepatic_lesion":
        lobe = d["lobe"]
        sentence = pick(
            rng,
            [
                f"A subcentimeter hypodensity in the {lobe} is too small to characterize and may represent a cyst.",
                f"Possible small hypodense lesion in the {lobe}.",
            ],
        )
        return sentence, f"Possible small lesion in the {lobe}."
    sentence = pick(rng, ["Possible trace ascites.", "Questionable trace free fluid in the right paracolic gutter."])
    return sentence, "Possible trace ascites."


def ct_report(
    states: Mapping[str, str], details: Mapping[str, Mapping[str, Any]], rng: np.random.Generator
) -> tuple[str, dict[str, str]]:
    """An abdominal CT report and, per present finding, the findings sentence that describes it."""
    style = int(rng.integers(3))
    order = ("renal_mass", "hepatic_lesion", "ascites", "kidney_stone")
    said = {
        f: (_ct_present if states[f] == "present" else _ct_uncertain)(f, details[f], rng)
        for f in order
        if states[f] in ("present", "uncertain")
    }
    normal = not said
    neg = {f: _neg(_CT_NEG[f], style, rng, normal) for f in _CT_NEG}
    if states["hepatic_lesion"] == "absent" and style == 0 and (normal or rng.random() < 0.6):
        body = [_CT_LIVER_AND_OTHERS]
    else:
        body = [_mention("hepatic_lesion", states, said, neg["hepatic_lesion"]), _CT_OTHER_ORGANS[style]]
    if states["renal_mass"] == "absent" and states["kidney_stone"] == "absent" and rng.random() < 0.8:
        body.append(_neg(_CT_NEG_KIDNEYS, style, rng, normal))
    else:
        body += [_mention(f, states, said, neg[f]) for f in ("renal_mass", "kidney_stone")]
    body += [_mention("ascites", states, said, neg["ascites"]), _CT_VESSELS[style]]
    if rng.random() < 0.15:
        body.append(pick(rng, _CT_INCIDENTAL))
    body.append(_CT_BONES[style])
    otherwise = "Otherwise no acute abnormality in the abdomen."
    return _finish(body, said, states, _CT_NORMAL_IMPRESSION[style], otherwise, rng)
