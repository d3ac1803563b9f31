"""Prompt forms: how each finding's prompts are written before they are embedded, chosen on ``val``.

The image tower is aligned with whole reports, which state (or deny) every finding at once, while a zero-shot prompt
is one sentence about one finding. The forms:

- ``sentence``: the prompts alone (``"There is pleural effusion."`` / ``"There is no pleural effusion."``), as
  rendered by :func:`medvlp.tasks.zeroshot.render_prompts`.
- ``report``: each prompt followed by a negative prompt of every *other* finding of the model, so it reads like a
  report that is normal but for this one finding (``"There is pleural effusion. No cardiomegaly. There is no
  pneumothorax."``); positive and negative differ only in their first sentence. The other findings' templates are
  taken in turn, so the ensemble does not repeat one context.
- ``report_section``: the same, under a ``FINDINGS:`` section header, as reports are commonly written.
- ``mined``: the sentences of the training reports themselves, mined without labels
  (:func:`medvlp.tasks.mined_prompts.mine_prompts`), which the calibration stores (``mined_prompts`` in
  ``calibration.json``) so that every reader of the model folder answers with the same sentences; a finding without
  mined sentences (one asked for by name at the server) is prompted with its templates.
- ``mined_report_section``: the mined sentences framed as ``report_section`` frames the templates.
- ``mined_reports``: no sentence at all but each finding's *report prototypes*, the mean embeddings of the training
  reports that state the finding and of the others, read without labels
  (:func:`medvlp.tasks.mined_prompts.mine_report_prototypes`); the calibration stores the two vectors per finding
  (``mined_report_prototypes`` in ``calibration.json``), and a finding without them is prompted with its
  ``sentence`` templates.

How much the wording matters beyond the form: :func:`prompt_sensitivity` scores each single template pair
(:func:`template_variants`) on ``val``.

Which form a model answers with is a tuned choice: :func:`choose_prompt_form` takes the candidate with the best mean
zero-shot AUROC on ``val`` (an earlier candidate wins ties), and the calibration stores it (``prompt_form`` in
``calibration.json``), so the evaluation card, the notebooks, the server and its exports all use it. A model folder
whose calibration names no form answers with ``sentence``, and so does validation during training (the form is
chosen after it). A framed prompt longer than the text tower's ``text_max_length`` loses the end of its context,
never the finding's own sentence, which comes first.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "DEFAULT_FORM",
    "MINED_FORMS",
    "PROMPT_FORMS",
    "REPORT_PROTOTYPE_FORM",
    "choose_prompt_form",
    "form_prompt_sets",
    "mined_prompts",
    "mined_report_prototypes",
    "prompt_form",
    "prompt_sensitivity",
    "template_variants",
]

PROMPT_FORMS = ("sentence", "report", "report_section", "mined", "mined_report_section", "mined_reports")
#: The form that answers with the report prototypes (its text prompts, ``sentence``, serve the findings without).
REPORT_PROTOTYPE_FORM = "mined_reports"
#: The forms that answer with the mined sentences, and the framing each puts them in.
MINED_FORMS = {"mined": "sentence", "mined_report_section": "report_section"}
DEFAULT_FORM = "sentence"
SECTION_HEADER = "FINDINGS:"


def form_prompt_sets(
    findings: Sequence[str],
    templates: Mapping[str, Sequence[str]] | None = None,
    synonyms: Mapping[str, Sequence[str]] | None = None,
    form: str = DEFAULT_FORM,
    context: Sequence[str] | None = None,
    mined: Mapping[str, Mapping[str, Sequence[str]]] | None = None,
) -> list[dict[str, list[str]]]:
    """Per finding ``{"positive": [...], "negative": [...]}`` in the given form.

    Args:
        findings: the findings to prompt for.
        templates, synonyms: as :func:`medvlp.tasks.zeroshot.render_prompts` takes them.
        form: one of :data:`PROMPT_FORMS`.
        context: the findings whose negations surround each prompt in the report forms: the model's own findings
            (so a finding asked for alone, by the server, reads the same as in the card); ``findings`` when None.
            A finding is never its own context.
        mined: the ``mined`` form's sentences, ``{finding: {"positive": [...], "negative": [...]}}``
            (:func:`mined_prompts` of the calibration); required by that form.
    """
    from medvlp.tasks.zeroshot import POLARITIES, render_prompts

    if form not in PROMPT_FORMS:
        raise ValueError(f"unknown prompt form {form!r}; known: {', '.join(PROMPT_FORMS)}")
    own = [render_prompts(f, templates, synonyms) for f in findings]
    if form in MINED_FORMS:
        if mined is None:
            raise ValueError(f"the {form} prompt form needs the mined sentences (mined_prompts in calibration.json)")
        own = [
            {pol: list(mined[f][pol]) for pol in POLARITIES}
            if f in mined and all(mined[f].get(pol) for pol in POLARITIES)
            else rendered
            for f, rendered in zip(findings, own, strict=True)
        ]
        form = MINED_FORMS[form]
    if form in ("sentence", REPORT_PROTOTYPE_FORM):
        return own
    others_of = list(dict.fromkeys(context if context is not None else findings))
    negatives = {f: render_prompts(f, templates, synonyms)["negative"] for f in others_of}
    header = f"{SECTION_HEADER} " if form == "report_section" else ""
    out = []
    for finding, prompts in zip(findings, own, strict=True):
        others = [negatives[o] for o in others_of if o != finding]

        def framed(sentence: str, i: int, others: list[list[str]] = others) -> str:
            rest = " ".join(neg[(i + k) % len(neg)] for k, neg in enumerate(others))
            return f"{header}{sentence} {rest}".strip()

        n = max(len(prompts["positive"]), len(prompts["negative"]))
        out.append(
            {
                pol: [framed(prompts[pol][i % len(prompts[pol])], i) for i in range(n)]
                for pol in ("positive", "negative")
            }
        )
    return out


def prompt_form(calibration: Mapping[str, Any] | None) -> str:
    """The form a model answers with: its calibration's ``prompt_form``, else :data:`DEFAULT_FORM`."""
    form = str((calibration or {}).get("prompt_form") or DEFAULT_FORM)
    if form not in PROMPT_FORMS:
        raise ValueError(f"the calibration names an unknown prompt form {form!r}; known: {', '.join(PROMPT_FORMS)}")
    return form


def mined_prompts(calibration: Mapping[str, Any] | None) -> dict[str, dict[str, list[str]]] | None:
    """The ``mined`` form's sentences stored with the calibration (``{finding: {"positive", "negative"}}``), or None."""
    mined = (calibration or {}).get("mined_prompts")
    if mined is None:
        return None
    polarities = ("positive", "negative")
    if not isinstance(mined, Mapping) or not all(
        isinstance(e, Mapping) and all(isinstance(e.get(p), list) for p in polarities) for e in mined.values()
    ):
        raise ValueError("the calibration's mined_prompts must map each finding to positive and negative lists")
    return {f: {pol: [str(x) for x in entry[pol]] for pol in polarities} for f, entry in mined.items()}


def mined_report_prototypes(calibration: Mapping[str, Any] | None) -> dict[str, np.ndarray] | None:
    """The report prototypes stored with the calibration as ``{finding: [2, E]}`` (positive, negative), or None."""
    stored = (calibration or {}).get("mined_report_prototypes")
    if stored is None:
        return None
    bad = ValueError("the calibration's mined_report_prototypes must map each finding to positive and negative vectors")
    if not isinstance(stored, Mapping):
        raise bad
    out = {}
    for finding, entry in stored.items():
        vectors = [entry.get(p) if isinstance(entry, Mapping) else None for p in ("positive", "negative")]
        if not all(isinstance(v, list) and v for v in vectors) or len(vectors[0]) != len(vectors[1]):
            raise bad
        out[str(finding)] = np.asarray(vectors, dtype=np.float32)
    return out


def with_report_prototypes(
    embeddings: Any, findings: Sequence[str], prototypes: Mapping[str, np.ndarray] | None
) -> Any:
    """``[F, 2, E]`` prompt embeddings with each finding's report prototypes in place of its text prompts, where it
    has them (:func:`mined_report_prototypes`)."""
    import torch
    import torch.nn.functional as F

    if prototypes is None:
        raise ValueError(
            f"the {REPORT_PROTOTYPE_FORM} prompt form needs the report prototypes "
            "(mined_report_prototypes in calibration.json)"
        )
    out = embeddings.clone()
    for i, finding in enumerate(findings):
        if finding in prototypes:
            vectors = torch.as_tensor(prototypes[finding], dtype=out.dtype)
            if vectors.shape != out.shape[1:]:
                raise ValueError(
                    f"the report prototypes of {finding!r} are {list(vectors.shape)}, the model's prompts "
                    f"{list(out.shape[1:])}: they were mined with another model"
                )
            out[i] = F.normalize(vectors, dim=-1)
    return out


def choose_prompt_form(aurocs: Mapping[str, float]) -> str:
    """The candidate with the best mean val AUROC (``{form: auroc}`` in candidate order); an earlier one wins ties
    and a NaN never wins."""
    best, best_value = None, -np.inf
    for form, value in aurocs.items():
        if form not in PROMPT_FORMS:
            raise ValueError(f"unknown prompt form {form!r}; known: {', '.join(PROMPT_FORMS)}")
        if np.isfinite(value) and value > best_value:
            best, best_value = form, float(value)
    return best if best is not None else next(iter(aurocs), DEFAULT_FORM)


def template_variants(
    templates: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, dict[str, list[str]]]:
    """Every single positive/negative template pair (by position), plus the full ensemble as ``"ensemble"``."""
    from medvlp.tasks.zeroshot import DEFAULT_TEMPLATES

    t = DEFAULT_TEMPLATES if templates is None else templates
    pos, neg = list(t["positive"]), list(t["negative"])
    out = {f"{p} | {n}": {"positive": [p], "negative": [n]} for p, n in zip(pos, neg, strict=False)}
    out["ensemble"] = {"positive": pos, "negative": neg}
    return out


def prompt_sensitivity(
    model: Any,
    image_features: np.ndarray,
    labels: np.ndarray,
    findings: Sequence[str],
    variants: Mapping[str, Mapping[str, Sequence[str]]] | None = None,
    synonyms: Mapping[str, Sequence[str]] | None = None,
) -> Any:
    """AUROC per finding (columns, plus ``mean``) for each template set (rows, see :func:`template_variants`),
    every set rendered with the model's ``synonyms`` (:func:`medvlp.tasks.zeroshot.prompt_spec`).

    Run it on ``val``: choosing templates by their test AUROC flatters the model.
    """
    import pandas as pd

    from medvlp.tasks.zeroshot import classification_metrics, zero_shot_scores

    variants = template_variants() if variants is None else variants
    rows = {}
    for name, templates in variants.items():
        scores = zero_shot_scores(model, image_features, findings, templates, synonyms)
        m = classification_metrics(labels, scores, findings)
        rows[name] = {f: v["auroc"] for f, v in m["per_finding"].items()} | {"mean": m["mean_auroc"]}
    return pd.DataFrame(rows).T.rename_axis("templates")
