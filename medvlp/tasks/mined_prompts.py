"""Label-free prompts mined from the training reports' own sentences: zero-shot in the cohort's words.

The default prompts say "There is cardiomegaly." while a hospital's reports say "The cardiac silhouette is
enlarged."; the prompt prototypes (:mod:`medvlp.tasks.prompts`) close that gap with the training labels, so they are
not zero-shot. Mining uses the training reports' **text only**, as contrastive training does, and never a label:

1. The training reports' sentences (the sections the text tower was trained on) are counted by distinct subject
   (:func:`medvlp.tasks.prompts.sentence_key`: numbers as ``#``); one written by fewer than ``min_count`` subjects is
   left out, so a sentence specific to one patient never becomes a prompt.
2. Each sentence's polarity is read by the rules of :mod:`medvlp.data.perturb`: affirmative when it has a negated
   twin, negated when it has an affirmative twin; an uncertain or unparsed sentence is left out.
3. Each sentence's *topic* is a text encoder's embedding of the sentence plus that of its twin (so polarity, which
   the twin flips, cancels out), and each finding's topic the same of its template prompts (positive plus negative,
   :func:`medvlp.tasks.zeroshot.render_prompts`, with the cohort's synonyms). A sentence belongs to the finding whose
   topic is nearest (cosine), and only when it is nearer to it than ``min_margin`` over every other finding.
   The reader is the model's own text tower, which knows the cohort's words (``topic_readers``). Optionally the
   bundled general-purpose sentence encoder (:func:`general_reader`), which contrastive training on reports has not
   pulled together, reads too, and the two must agree: read by the trained tower alone, boilerplate such as "Mild
   degenerative changes of the thoracic spine." can land on some finding in every third report; the general encoder
   puts it elsewhere, and a sentence the two readers give to different findings belongs to none.
4. A finding's prompts of each polarity are its ``k`` nearest sentences of that polarity; a polarity with none falls
   back to the templates, and the result says which.

The same reading gives each finding *report prototypes* (:func:`mine_report_prototypes`): the mean embedding of the
training reports that state the finding, against that of the others. They are text too, and still read no label.

Which prompts a model answers with stays a choice made on ``val`` (:mod:`medvlp.tasks.prompt_forms`).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from medvlp.data.perturb import affirm, negate
from medvlp.tasks.embed import encode_texts
from medvlp.tasks.prompts import _sentence_sets, _subject_counts, report_subjects
from medvlp.tasks.zeroshot import POLARITIES, embed_prompt_sets, render_prompts

__all__ = [
    "DEFAULT_K",
    "DEFAULT_MIN_COUNT",
    "DEFAULT_MIN_MARGIN",
    "DEFAULT_TOPIC_READERS",
    "TOPIC_READERS",
    "general_reader",
    "mine_prompts",
    "mine_report_prototypes",
    "sentence_polarity",
]

DEFAULT_K = 8
DEFAULT_MIN_COUNT = 3  # distinct subjects
DEFAULT_MIN_MARGIN = 0.02  # cosine by which a sentence's finding must beat every other finding
TOPIC_READERS = ("model", "general")
#: The model's tower alone: adding the general reader cleans the reading of boilerplate but moved zero-shot AUROC by
#: -0.003 / +0.000 / +0.004 on three 2D styles (README, "the zero-shot ablation"), so it is a switch, not the default.
DEFAULT_TOPIC_READERS: tuple[str, ...] = ("model",)


class _SentenceEncoder:
    """The bundled general-purpose sentence encoder (all six layers, mean-pooled), read-only, as a topic reader."""

    def __init__(self) -> None:
        from medvlp.models.text import TextEncoder

        self.encoder = TextEncoder().eval()

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str], normalize: bool = True) -> Tensor:
        emb = self.encoder.embed(list(texts)).float().cpu()
        return F.normalize(emb, dim=-1) if normalize else emb


@functools.lru_cache(maxsize=1)
def general_reader() -> _SentenceEncoder:
    """The general topic reader (loaded once per process): the bundled sentence encoder, untouched by training."""
    return _SentenceEncoder()


def sentence_polarity(sentence: str) -> tuple[str, str] | None:
    """``(polarity, twin)``: ``"positive"`` with its negated twin, ``"negative"`` with its affirmative twin, or None
    for a sentence whose polarity the rules cannot read (uncertain, or no rule applies)."""
    if (twin := negate(sentence)) is not None:
        return "positive", twin
    if (twin := affirm(sentence)) is not None:
        return "negative", twin
    return None


def mine_prompts(
    model: Any,
    reports: Sequence[str],
    findings: Sequence[str],
    templates: Mapping[str, Sequence[str]] | None = None,
    synonyms: Mapping[str, Sequence[str]] | None = None,
    subjects: Sequence[str] | None = None,
    sections: Sequence[str] = ("findings", "impression"),
    k: int = DEFAULT_K,
    min_count: int = DEFAULT_MIN_COUNT,
    min_margin: float = DEFAULT_MIN_MARGIN,
    topic_readers: Sequence[str] = DEFAULT_TOPIC_READERS,
) -> dict[str, dict[str, Any]]:
    """Each finding's prompts mined from the training reports (no labels; see the module docstring).

    Args:
        model: a :class:`~medvlp.models.MedVLP` (anything with ``encode_text(list[str], normalize=True)``).
        reports: the training reports (raw; ``sections`` of each are used).
        findings: the finding names.
        templates, synonyms: the cohort's, as :func:`~medvlp.tasks.zeroshot.render_prompts` takes them.
        subjects: each report's subject (pseudonym); each report its own subject when None.
        k: most prompts per finding and polarity.
        min_count: least number of distinct subjects whose reports hold a sentence.
        min_margin: least cosine by which a sentence's nearest finding beats the next one, for every reader.
        topic_readers: who reads a sentence's topic (:data:`TOPIC_READERS`): ``model``, ``general`` or both, who
            must then agree.

    Returns:
        ``{finding: {"positive": [...], "negative": [...], "similarity": {pol: [...]}, "fallback": [...]}}``,
        nearest first; ``fallback`` lists the polarities left to the templates.
    """
    if k < 1 or min_count < 1:
        raise ValueError(f"k and min_count must be at least 1, got {k} and {min_count}")
    subjects = report_subjects(reports, subjects)
    sentence_sets, forms = _sentence_sets(reports, sections)
    counts = _subject_counts(sentence_sets, subjects, np.ones(len(reports), dtype=bool))
    candidates: list[tuple[str, str, str]] = []  # (sentence, polarity, twin), in a fixed order
    for key in sorted(k_ for k_, n in counts.items() if n >= min_count):
        sentence = forms[key].most_common(1)[0][0]
        if (read := sentence_polarity(sentence)) is not None:
            candidates.append((sentence, *read))
    templated = [render_prompts(f, templates, synonyms) for f in findings]
    out: dict[str, dict[str, Any]] = {
        f: {pol: [] for pol in POLARITIES} | {"similarity": {pol: [] for pol in POLARITIES}} for f in findings
    }
    best, sim, margin = _assign_topics(model, candidates, templated, topic_readers)
    ranked = sorted(range(len(candidates)), key=lambda i: (-sim[i], candidates[i][0]))
    for i in ranked:
        if margin[i] < min_margin:
            continue
        sentence, pol, _ = candidates[i]
        entry = out[findings[best[i]]]
        if len(entry[pol]) < k:
            entry[pol].append(sentence)
            entry["similarity"][pol].append(round(float(sim[i]), 4))
    for name, rendered in zip(findings, templated, strict=True):
        entry = out[name]
        entry["fallback"] = [pol for pol in POLARITIES if not entry[pol]]
        for pol in entry["fallback"]:
            entry[pol] = list(rendered[pol])
    return out


def _assign_topics(
    model: Any,
    candidates: Sequence[tuple[str, str, str]],
    templated: Sequence[Mapping[str, Sequence[str]]],
    topic_readers: Sequence[str] = DEFAULT_TOPIC_READERS,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each ``(sentence, polarity, twin)`` candidate's nearest finding by topic (step 3 of the module docstring):
    ``(finding index, cosine to it, margin over the next finding)``, three arrays of ``len(candidates)``. With
    several readers, the first reader's finding and cosine; the margin is the least of the readers' margins, and
    ``-inf`` where they name different findings."""
    unknown = [r for r in topic_readers if r not in TOPIC_READERS]
    if unknown or not topic_readers:
        raise ValueError(f"topic_readers {list(topic_readers)} must name some of {TOPIC_READERS}")
    if not candidates or not templated:  # nothing to assign: every margin fails
        n = len(candidates)
        return np.zeros(n, dtype=int), np.zeros(n), np.full(n, -np.inf)
    readers = {"model": _without_side_edit(model)}
    reads = [_nearest_topics(readers.get(r) or general_reader(), candidates, templated) for r in topic_readers]
    best, top, margin = reads[0]
    for other_best, _, other_margin in reads[1:]:
        margin = np.where(other_best == best, np.minimum(margin, other_margin), -np.inf)
    return best, top, margin


class _TowersReader:
    """A model's towers without its side edit (:mod:`medvlp.models.side_edit`), as a topic reader: which finding a
    sentence is about does not depend on the side it names, and the edit moves one-sided sentences along the image's
    side direction, which would move their topics too."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def eval(self) -> None:
        self.model.eval()

    def encode_text(self, texts: Sequence[str], normalize: bool = True) -> torch.Tensor:
        return self.model.forward_text(list(texts), normalize).embedding


def _without_side_edit(model: Any) -> Any:
    """``model`` as a topic reader: itself, or its towers alone when it carries a side edit."""
    return _TowersReader(model) if getattr(model, "side_edit", None) is not None else model


def _nearest_topics(
    reader: Any, candidates: Sequence[tuple[str, str, str]], templated: Sequence[Mapping[str, Sequence[str]]]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One reader's ``(finding index, cosine, margin)`` per candidate; ``reader`` has ``encode_text``."""
    # a sentence and its twin, or a finding's positive and negative templates: the sum of the two polarities
    pairs = [{"positive": [c[0]], "negative": [c[2]]} for c in candidates]
    topic = F.normalize(embed_prompt_sets(reader, pairs).sum(dim=1), dim=-1)  # [S, E]
    centre = F.normalize(embed_prompt_sets(reader, templated).sum(dim=1), dim=-1)  # [F, E]
    sim = (topic @ centre.T).numpy()  # [S, F]
    best = sim.argmax(axis=1)
    top = sim[np.arange(len(sim)), best]
    second = np.sort(sim, axis=1)[:, -2] if sim.shape[1] > 1 else np.full(len(sim), -np.inf)
    return best, top, top - second


def mine_report_prototypes(
    model: Any,
    reports: Sequence[str],
    findings: Sequence[str],
    templates: Mapping[str, Sequence[str]] | None = None,
    synonyms: Mapping[str, Sequence[str]] | None = None,
    subjects: Sequence[str] | None = None,
    sections: Sequence[str] = ("findings", "impression"),
    min_count: int = DEFAULT_MIN_COUNT,
    min_margin: float = DEFAULT_MIN_MARGIN,
    batch_size: int = 64,
    topic_readers: Sequence[str] = DEFAULT_TOPIC_READERS,
) -> dict[str, dict[str, Any]]:
    """Each finding's positive and negative *report prototypes*: the mean text embedding of the training reports
    that the rules read as stating the finding, and of the others (no labels read).

    The image tower is aligned with whole reports, so a whole report's embedding is where an image with its findings
    lands, and a mean over many reports averages the other findings out. A report states a finding when one of its
    sentences (``sections``; every sentence, however rare) is affirmative by :func:`sentence_polarity` and belongs
    to that finding by topic (as in :func:`mine_prompts`, with ``min_margin`` and ``topic_readers``); every other
    report, negated or silent about it, is a negative, as report labellers count an unmentioned finding. A finding
    gets prototypes only when each side holds reports of at least ``min_count`` distinct subjects, and only the
    means are kept, never a report's text, so no single patient's words leave the training split.

    Returns:
        ``{finding: {"positive": [E floats], "negative": [E floats], "reports": {"positive": n, "negative": n}}}``
        for the findings that got prototypes (unit norm, the model's joint space).
    """
    from medvlp.data.reports import report_sentences, report_text

    if min_count < 1:
        raise ValueError(f"min_count must be at least 1, got {min_count}")
    subjects = report_subjects(reports, subjects)
    per_report = [report_sentences(str(r), tuple(sections)) for r in reports]
    candidates = [(s, *read) for s in sorted({s for ss in per_report for s in ss}) if (read := sentence_polarity(s))]
    templated = [render_prompts(f, templates, synonyms) for f in findings]
    best, _, margin = _assign_topics(model, candidates, templated, topic_readers)
    states = {c[0]: int(best[i]) for i, c in enumerate(candidates) if c[1] == "positive" and margin[i] >= min_margin}
    positive = np.zeros((len(reports), len(findings)), dtype=bool)
    for i, sentences in enumerate(per_report):
        for sentence in sentences:
            if sentence in states:
                positive[i, states[sentence]] = True
    if not reports:
        return {}
    emb = encode_texts(model, [report_text(str(r), list(sections)) for r in reports], batch_size)  # [R, E]
    out: dict[str, dict[str, Any]] = {}
    for j, name in enumerate(findings):
        sides = {"positive": positive[:, j], "negative": ~positive[:, j]}
        if any(len({subjects[i] for i in np.flatnonzero(rows)}) < min_count for rows in sides.values()):
            continue
        entry: dict[str, Any] = {
            pol: [round(float(x), 6) for x in F.normalize(emb[torch.from_numpy(rows)].mean(0), dim=-1)]
            for pol, rows in sides.items()
        }
        entry["reports"] = {pol: int(rows.sum()) for pol, rows in sides.items()}
        out[name] = entry
    return out
