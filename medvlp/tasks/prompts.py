"""Prompt prototypes: each finding's prompts taken from the training split's own report sentences.

This uses the training labels, so it is a prompt-prototype classifier, **not** zero-shot, and every result says so
(``"uses_training_labels": true``). For each finding, the training reports (the sections the text tower was trained
on) are split into sentences (:func:`medvlp.data.reports.report_sentences`) and normalised (:func:`sentence_key`:
:func:`medvlp.data.reports.normalize_report`, numbers as ``#``). A sentence's count in a group is the number of
distinct *subjects* whose reports in that group contain it, so a sentence specific to one patient never becomes a
prototype. With ``n1`` of ``N1`` subjects labelled 1 and ``n0`` of ``N0`` labelled 0, its score is the smoothed
log-ratio

    ``log((n1 + a) / (N1 + 2a)) - log((n0 + a) / (N0 + 2a))``  (``a`` = :data:`SMOOTHING`)

Positive prototypes are the ``k`` highest-scoring sentences with ``n1 >= min_count`` and score ``>= min_log_ratio``;
negative prototypes the ``k`` lowest with ``n0 >= min_count`` and score ``<= -min_log_ratio`` ("No pneumothorax."
style sentences). Nothing about the vocabulary is assumed. A polarity with no such sentence falls back to the
templates (:func:`medvlp.tasks.zeroshot.render_prompts`, with the cohort's synonyms), and the result says which.
Prototypes are embedded as prompts are (:func:`medvlp.tasks.zeroshot.embed_prompt_sets`) and scored as zero-shot is
(:func:`medvlp.tasks.zeroshot.zero_shot_probabilities`).
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from medvlp.data.reports import normalize_report, report_sentences
from medvlp.tasks.zeroshot import (
    POLARITIES,
    PromptSpec,
    embed_prompt_sets,
    model_logit_scale,
    render_prompts,
    val_test_metrics,
    zero_shot_probabilities,
)

__all__ = [
    "DEFAULT_K",
    "DEFAULT_MIN_COUNT",
    "DEFAULT_MIN_LOG_RATIO",
    "PROMPT_MODES",
    "prompt_prototype_task",
    "prototype_prompt_sets",
    "select_prototypes",
]

DEFAULT_K = 8
DEFAULT_MIN_COUNT = 3  # distinct subjects
DEFAULT_MIN_LOG_RATIO = math.log(2.0)  # at least twice as frequent in one group
SMOOTHING = 0.5
PROMPT_MODES = ("templates", "auto")  # `medvlp evaluate --prompts`: the cohort's templates, or the prototypes


def sentence_key(sentence: str) -> str:
    """A sentence's counting key: :func:`~medvlp.data.reports.normalize_report` with every number as ``#``, so that
    "A 2.3 cm nodule ..." and "A 1.1 cm nodule ..." are one sentence (sizes would make each finding sentence unique)."""
    return re.sub(r"#(?: #)+", "#", re.sub(r"\d+", "#", normalize_report(sentence)))


def _sentence_sets(reports: Sequence[str], sections: Sequence[str]) -> tuple[list[set[str]], dict[str, Counter[str]]]:
    """Per report the set of its normalised sentences, and per normalised sentence its written forms."""
    per_report: list[set[str]] = []
    forms: dict[str, Counter[str]] = defaultdict(Counter)
    for report in reports:
        keys = set()
        for sentence in report_sentences(str(report), tuple(sections)):
            key = sentence_key(sentence)
            if key:
                keys.add(key)
                forms[key][sentence] += 1
        per_report.append(keys)
    return per_report, forms


def report_subjects(reports: Sequence[str], subjects: Sequence[str] | None) -> list[str]:
    """Each report's subject as a string (each report its own subject when None); the lengths must agree."""
    out = [str(i) for i in range(len(reports))] if subjects is None else [str(s) for s in subjects]
    if len(out) != len(reports):
        raise ValueError(f"{len(out)} subjects for {len(reports)} reports")
    return out


def _subject_counts(sentence_sets: list[set[str]], subjects: Sequence[str], rows: np.ndarray) -> Counter[str]:
    """How many distinct subjects, among ``rows``, have a report containing each sentence."""
    by_subject: dict[str, set[str]] = defaultdict(set)
    for i in np.flatnonzero(rows):
        by_subject[str(subjects[i])] |= sentence_sets[i]
    counts: Counter[str] = Counter()
    for keys in by_subject.values():
        counts.update(keys)
    return counts


def select_prototypes(
    reports: Sequence[str],
    labels: np.ndarray,
    findings: Sequence[str],
    subjects: Sequence[str] | None = None,
    sections: Sequence[str] = ("findings", "impression"),
    k: int = DEFAULT_K,
    min_count: int = DEFAULT_MIN_COUNT,
    min_log_ratio: float = DEFAULT_MIN_LOG_RATIO,
) -> dict[str, dict[str, Any]]:
    """The discriminating sentences of each finding, from training reports and their labels.

    Args:
        reports: the ``N`` training reports (raw; ``sections`` of each are used).
        labels: ``[N, F]`` with 1, 0, -1 (uncertain) or NaN (unknown); only 1 and 0 rows count for a finding.
        findings: the ``F`` names.
        subjects: the subject (pseudonym) of each report; each report its own subject when None.
        sections: the report sections the text tower was trained on.
        k: most prototypes per finding and polarity.
        min_count: least number of distinct subjects of the favoured group whose reports hold the sentence.
        min_log_ratio: least absolute smoothed log-ratio (natural log) for a sentence to count.

    Returns:
        ``{finding: {"positive": [...], "negative": [...], "scores": {"positive": [...], "negative": [...]},
        "fallback": [polarities with no prototype], "n_pos", "n_neg"}}``; each sentence in its most frequent
        written form, best first.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if min_count < 1:
        raise ValueError(f"min_count must be at least 1, got {min_count}")
    if min_log_ratio < 0:
        raise ValueError(f"min_log_ratio must not be negative, got {min_log_ratio}")
    labels = np.asarray(labels, dtype=np.float64)
    labels = labels.reshape(-1, 1) if labels.ndim == 1 else labels
    if labels.shape != (len(reports), len(findings)):
        raise ValueError(f"labels {labels.shape} and {len(findings)} findings do not agree")
    subjects = report_subjects(reports, subjects)
    sentence_sets, forms = _sentence_sets(reports, sections)
    out: dict[str, dict[str, Any]] = {}
    for j, name in enumerate(findings):
        pos_rows, neg_rows = labels[:, j] == 1, labels[:, j] == 0
        n1 = _subject_counts(sentence_sets, subjects, pos_rows)
        n0 = _subject_counts(sentence_sets, subjects, neg_rows)
        tot1 = len({subjects[i] for i in np.flatnonzero(pos_rows)})
        tot0 = len({subjects[i] for i in np.flatnonzero(neg_rows)})
        scored = []
        for key in set(n1) | set(n0):
            a, b = n1.get(key, 0), n0.get(key, 0)
            ratio = math.log((a + SMOOTHING) / (tot1 + 2 * SMOOTHING)) - math.log(
                (b + SMOOTHING) / (tot0 + 2 * SMOOTHING)
            )
            scored.append((ratio, a, b, key))
        positive = sorted(
            (s for s in scored if s[1] >= min_count and s[0] >= min_log_ratio), key=lambda s: (-s[0], s[3])
        )[:k]
        negative = sorted(
            (s for s in scored if s[2] >= min_count and s[0] <= -min_log_ratio), key=lambda s: (s[0], s[3])
        )[:k]
        chosen = {"positive": positive, "negative": negative}
        out[name] = {pol: [forms[s[3]].most_common(1)[0][0] for s in chosen[pol]] for pol in POLARITIES} | {
            "scores": {pol: [round(s[0], 4) for s in chosen[pol]] for pol in POLARITIES},
            "fallback": [pol for pol in POLARITIES if not chosen[pol]],
            "n_pos": tot1,
            "n_neg": tot0,
        }
    return out


def prototype_prompt_sets(
    prototypes: Mapping[str, Mapping[str, Any]], findings: Sequence[str], prompts: PromptSpec | None = None
) -> list[dict[str, list[str]]]:
    """Per finding the prompt set to embed: its prototypes, the templates where a polarity has none."""
    templates, synonyms = prompts or (None, None)
    out = []
    for name in findings:
        rendered = render_prompts(name, templates, synonyms)
        found = prototypes.get(name, {})
        out.append({pol: list(found.get(pol) or []) or rendered[pol] for pol in POLARITIES})
    return out


def prompt_prototype_task(
    model: Any,
    train: Any,
    val: Any,
    test: Any,
    findings: Sequence[str],
    sections: Sequence[str],
    prompts: PromptSpec | None = None,
    k: int = DEFAULT_K,
    min_count: int = DEFAULT_MIN_COUNT,
    min_log_ratio: float = DEFAULT_MIN_LOG_RATIO,
    target_sensitivity: float = 0.9,
) -> tuple[dict[str, Any], np.ndarray]:
    """The prompt-prototype classifier on split embeddings (:class:`medvlp.tasks.embed.SplitEmbeddings`).

    Prototypes come from ``train`` (its reports and labels), the operating point is fitted on ``val`` and the
    numbers are :func:`~medvlp.tasks.zeroshot.zero_shot_metrics` on ``test`` (uncalibrated: the model's calibration
    was fitted for its zero-shot prompts).

    Returns:
        ``(metrics, probabilities [N_test, F])``; metrics carry ``"uses_training_labels": true``, the prototypes
        per finding and ``fallback_findings`` (findings with a polarity scored by the templates instead).
    """
    records = train.records if isinstance(train.records, pd.DataFrame) else pd.DataFrame(train.records)
    subjects = list(records["subject"]) if "subject" in records.columns else None
    chosen = select_prototypes(
        list(records["report"]), train.labels, findings, subjects, sections, k, min_count, min_log_ratio
    )
    sets = prototype_prompt_sets(chosen, findings, prompts)
    emb = embed_prompt_sets(model, sets) if findings else None
    images = np.concatenate([val.image, test.image])
    if emb is None:
        probs = np.zeros((len(images), 0))
    else:
        probs = zero_shot_probabilities(images, emb, model_logit_scale(model))
    metrics, test_probs = val_test_metrics(probs, val, test, findings, target_sensitivity)
    metrics |= {
        "uses_training_labels": True,
        "zero_shot": False,
        "method": "prompt prototypes: discriminating sentences of the training split's reports, per finding",
        "selection": {"k": k, "min_count_subjects": min_count, "min_log_ratio": min_log_ratio, "fitted_on": "train"},
        "prototypes": {
            name: {pol: chosen[name][pol] for pol in POLARITIES} | {"fallback": chosen[name]["fallback"]}
            for name in findings
        },
        "fallback_findings": [name for name in findings if chosen[name]["fallback"]],
    }
    return metrics, test_probs
