"""Zero-shot classification with positive/negative prompt pairs, and the classification metrics used for it.

Each finding gets a positive and a negative prompt embedding (the mean of the L2-normalized embeddings of
several templates, renormalized, as open_clip's ``build_zero_shot_classifier`` does for class names). An image's
probability for a finding is the softmax over its scaled cosine similarities to that pair, so every finding is a
separate binary decision (multi-label), as in CheXzero.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score, roc_curve
from torch import Tensor

from medvlp.tasks.embed import encode_texts
from medvlp.tasks.prompt_forms import prompt_sensitivity, template_variants  # re-exported: their home moved

__all__ = [
    "DEFAULT_TEMPLATES",
    "PromptSpec",
    "build_prompt_embeddings",
    "classification_metrics",
    "embed_prompt_sets",
    "expected_calibration_error",
    "finding_text",
    "model_logit_scale",
    "operating_points",
    "prompt_sensitivity",
    "prompt_spec",
    "render_prompts",
    "template_variants",
    "threshold_at_sensitivity",
    "val_test_metrics",
    "zero_shot_metrics",
    "zero_shot_probabilities",
    "zero_shot_scores",
    "zero_shot_task",
]

DEFAULT_TEMPLATES: dict[str, list[str]] = {
    "positive": [
        "There is {finding}.",
        "Findings consistent with {finding}.",
        "{Finding} is present.",
        "{Finding}.",
        "Evidence of {finding}.",
        "Findings suggestive of {finding}.",
    ],
    "negative": [
        "There is no {finding}.",
        "No {finding}.",
        "No evidence of {finding}.",
        "{Finding} is absent.",
        "No findings of {finding}.",
        "Negative for {finding}.",
    ],
}
POLARITIES = ("positive", "negative")
ECE_BINS = 15
PromptSpec = tuple[dict[str, list[str]] | None, dict[str, list[str]] | None]  # (templates, synonyms)


def prompt_spec(record: Mapping[str, Any] | None) -> PromptSpec:
    """``(templates, synonyms)`` for :func:`render_prompts` from a cohort record.

    The record is a model folder's ``cohort.json`` or a cache's ``summary.json`` (their ``prompts`` entry, written
    from the cohort YAML's ``prompts:``). This is the one place every caller (evaluation, calibration, the server,
    ``medvlp predict``, the notebooks, validation during training) gets a model's prompts from, so they agree.

    Returns:
        ``(None, None)`` (the default templates, no synonyms) when the record has no prompts.
    """
    raw = (record or {}).get("prompts") or {}
    if not isinstance(raw, Mapping):
        raise ValueError(f"a cohort record's 'prompts' must be a mapping, got {type(raw).__name__}")
    templates = raw.get("templates")
    synonyms = raw.get("synonyms")
    t = {pol: [str(x) for x in templates[pol]] for pol in POLARITIES} if templates else None
    syn = {str(k): [str(x) for x in v] for k, v in synonyms.items()} if synonyms else None
    return t, syn


def finding_text(name: str) -> str:
    """``"pleural_effusion"`` -> ``"pleural effusion"`` (underscores and runs of spaces collapse to one space)."""
    return " ".join(name.replace("_", " ").split())


def render_prompts(
    finding: str,
    templates: Mapping[str, Sequence[str]] | None = None,
    synonyms: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, list[str]]:
    """The prompts of one finding, per polarity.

    Args:
        finding: a finding name such as ``"pleural_effusion"``.
        templates: ``{"positive": [...], "negative": [...]}`` with ``{finding}`` (as written) and ``{Finding}``
            (first letter upper-cased) placeholders; :data:`DEFAULT_TEMPLATES` when None.
        synonyms: extra names per finding (``{"cardiomegaly": ["enlarged heart"]}``); every template is rendered
            with the finding's own name and each synonym.

    Returns:
        ``{"positive": [...], "negative": [...]}``, duplicates removed, order kept.
    """
    templates = DEFAULT_TEMPLATES if templates is None else templates
    names = [finding_text(finding), *(synonyms or {}).get(finding, [])]
    out: dict[str, list[str]] = {}
    for polarity in POLARITIES:
        if not templates.get(polarity):
            raise ValueError(f"templates need a non-empty {polarity!r} list")
        rendered = [
            t.format(finding=n, Finding=n[:1].upper() + n[1:])
            for n in dict.fromkeys(names)
            for t in templates[polarity]
        ]
        out[polarity] = list(dict.fromkeys(rendered))
    return out


@torch.no_grad()
def embed_prompt_sets(model: Any, prompt_sets: Sequence[Mapping[str, Sequence[str]]], batch_size: int = 64) -> Tensor:
    """Positive/negative embeddings of ready-made prompt sets, one set per finding.

    Args:
        model: a :class:`~medvlp.models.MedVLP` (anything with ``encode_text(list[str], normalize=True)``).
        prompt_sets: per finding ``{"positive": [...], "negative": [...]}``, each list non-empty.
        batch_size: prompts per text-encoder call.

    Returns:
        ``[F, 2, E]`` float32 on the CPU, unit norm; index 0 is positive, 1 negative. Each entry is the mean of
        the L2-normalized embeddings of that finding's prompts of that polarity, renormalized.
    """
    for i, per in enumerate(prompt_sets):
        for pol in POLARITIES:
            if not per.get(pol):
                raise ValueError(f"prompt set {i} has no {pol!r} prompt")
    flat = [p for per in prompt_sets for pol in POLARITIES for p in per[pol]]
    emb = encode_texts(model, flat, batch_size) if flat else torch.zeros(0, 0)  # [P, E]
    out = torch.empty(len(prompt_sets), 2, emb.shape[-1])
    start = 0
    for i, per in enumerate(prompt_sets):
        for j, pol in enumerate(POLARITIES):
            n = len(per[pol])
            out[i, j] = F.normalize(emb[start : start + n].mean(0), dim=-1)
            start += n
    return out


def build_prompt_embeddings(
    model: Any,
    findings: Sequence[str],
    templates: Mapping[str, Sequence[str]] | None = None,
    synonyms: Mapping[str, Sequence[str]] | None = None,
    batch_size: int = 64,
    form: str = "sentence",
    context: Sequence[str] | None = None,
    mined: Mapping[str, Mapping[str, Sequence[str]]] | None = None,
    prototypes: Mapping[str, np.ndarray] | None = None,
) -> Tensor:
    """Positive/negative prompt embeddings per finding (:func:`render_prompts` in a prompt ``form`` with its
    ``context``, or the ``mined`` sentences, :func:`medvlp.tasks.prompt_forms.form_prompt_sets`; then
    :func:`embed_prompt_sets`; the ``mined_reports`` form puts the report ``prototypes`` in place).

    Args:
        model: a :class:`~medvlp.models.MedVLP` (anything with ``encode_text(list[str], normalize=True)``).
        findings: finding names.
        templates, synonyms: see :func:`render_prompts`.

    Returns:
        ``[F, 2, E]`` float32 on the CPU, unit norm; index 0 is positive, 1 negative.
    """
    from medvlp.tasks.prompt_forms import REPORT_PROTOTYPE_FORM, form_prompt_sets, with_report_prototypes

    sets = form_prompt_sets(findings, templates, synonyms, form, context, mined)
    out = embed_prompt_sets(model, sets, batch_size)
    return with_report_prototypes(out, findings, prototypes) if form == REPORT_PROTOTYPE_FORM else out


def model_logit_scale(model: Any, max_scale: float = 100.0) -> float:
    """The multiplier a model applies to cosine similarities: ``exp(model.logit_scale)``, clamped to ``max_scale``."""
    scale = model.logit_scale
    value = float(scale.detach()) if isinstance(scale, Tensor) else float(scale)
    return float(min(math.exp(value), max_scale))


@torch.no_grad()
def zero_shot_probabilities(
    image_features: Tensor | np.ndarray, prompt_embeddings: Tensor | np.ndarray, logit_scale: float
) -> np.ndarray:
    """Per-finding probability of the positive prompt.

    Args:
        image_features: ``[N, E]`` (normalized here).
        prompt_embeddings: ``[F, 2, E]`` from :func:`build_prompt_embeddings` (normalized here).
        logit_scale: the multiplier of the cosine similarities, i.e. ``exp`` of the model's log-space parameter
            (:func:`model_logit_scale`), as open_clip uses ``100.0 * image @ text.T``.

    Returns:
        ``[N, F]`` float64: ``softmax(scale * [cos(img, pos), cos(img, neg)])[0]`` per finding.
    """
    img = F.normalize(torch.as_tensor(image_features).float().cpu(), dim=-1)  # [N, E]
    prompts = F.normalize(torch.as_tensor(prompt_embeddings).float().cpu(), dim=-1)  # [F, 2, E]
    logits = float(logit_scale) * torch.einsum("ne,fke->nfk", img, prompts)  # [N, F, 2]
    return logits.double().softmax(dim=-1)[..., 0].numpy()


def zero_shot_scores(
    model: Any,
    image_features: Tensor | np.ndarray,
    findings: Sequence[str],
    templates: Mapping[str, Sequence[str]] | None = None,
    synonyms: Mapping[str, Sequence[str]] | None = None,
    form: str = "sentence",
    mined: Mapping[str, Mapping[str, Sequence[str]]] | None = None,
    prototypes: Mapping[str, np.ndarray] | None = None,
) -> np.ndarray:
    """``[N, F]`` zero-shot probabilities of images given as embeddings: prompt ensembles (in ``form``, see
    :mod:`medvlp.tasks.prompt_forms`; ``mined`` sentences or report ``prototypes`` for those forms), the model's
    own scale."""
    prompts = build_prompt_embeddings(
        model, findings, templates, synonyms, form=form, mined=mined, prototypes=prototypes
    )
    return zero_shot_probabilities(image_features, prompts, model_logit_scale(model))


# ------------------------------------------------------------------------------------------------------ metrics
def _valid(labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows labelled 0 or 1 (uncertain -1 and unknown NaN dropped), as int labels and float probabilities."""
    labels = np.asarray(labels, dtype=np.float64)
    probs = np.asarray(probs, dtype=np.float64)
    keep = np.isin(labels, (0.0, 1.0)) & np.isfinite(probs)
    return labels[keep].astype(int), probs[keep]


def expected_calibration_error(labels: np.ndarray, probs: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """Expected calibration error of the positive-class probability.

    Bins are ``n_bins`` equal-width intervals ``[k/n, (k+1)/n)`` (the last one includes 1);
    ``ECE = sum_b (n_b / N) * |mean(y in b) - mean(p in b)|`` over non-empty bins. Only rows labelled 0/1 count.
    """
    y, p = _valid(labels, probs)
    if len(y) == 0:
        return float("nan")
    idx = np.minimum((p * n_bins).astype(int), n_bins - 1)  # [N] bin of each probability
    counts = np.bincount(idx, minlength=n_bins)
    sum_y = np.bincount(idx, weights=y, minlength=n_bins)
    sum_p = np.bincount(idx, weights=p, minlength=n_bins)
    nz = counts > 0
    return float(np.sum(np.abs(sum_y[nz] - sum_p[nz])) / len(y))


def _youden_threshold(y: np.ndarray, p: np.ndarray) -> float:
    fpr, tpr, thr = roc_curve(y, p)
    finite = np.isfinite(thr)
    best = np.argmax((tpr - fpr)[finite])
    return float(thr[finite][best])


def _one_finding(y: np.ndarray, p: np.ndarray, threshold: float | str) -> dict[str, float | int]:
    n_pos, n_neg = int((y == 1).sum()), int((y == 0).sum())
    both = n_pos > 0 and n_neg > 0
    if threshold == "youden":
        thr = _youden_threshold(y, p) if both else 0.5
    elif isinstance(threshold, str):
        raise ValueError(f"threshold must be a float or 'youden', got {threshold!r}")
    else:
        thr = float(threshold)
    nan = float("nan")
    return {
        "auroc": float(roc_auc_score(y, p)) if both else nan,
        "auprc": float(average_precision_score(y, p)) if both else nan,
        "f1": float(f1_score(y, (p >= thr).astype(int), zero_division=0)) if len(y) else nan,
        "ece": expected_calibration_error(y, p),
        "n_pos": n_pos,
        "n_neg": n_neg,
        "threshold": thr,
    }


def classification_metrics(
    labels: np.ndarray,
    probs: np.ndarray,
    findings: Sequence[str],
    threshold: float | str = 0.5,
) -> dict[str, Any]:
    """Per-finding AUROC, AUPRC, F1, ECE, counts and the decision threshold, plus their means.

    Args:
        labels: ``[N, F]`` with 1 (positive), 0 (negative), -1 (uncertain) or NaN (unknown); -1 and NaN rows are
            left out per finding.
        probs: ``[N, F]`` predicted positive probabilities.
        findings: the ``F`` names.
        threshold: the F1 decision threshold, a float or ``"youden"`` (maximizing ``TPR - FPR`` on these labels;
            0.5 for a finding without both classes).

    Returns:
        ``{"per_finding": {name: {auroc, auprc, f1, ece, n_pos, n_neg, threshold}}, "mean_auroc", "mean_auprc",
        "mean_f1", "mean_ece", "n_findings"}``; AUROC/AUPRC are NaN for a finding without both classes, and the
        means are over the findings with both classes (``n_findings`` of them; NaN when none).
    """
    labels = np.asarray(labels, dtype=np.float64).reshape(len(labels), -1)
    probs = np.asarray(probs, dtype=np.float64).reshape(len(probs), -1)
    if labels.shape != probs.shape or labels.shape[1] != len(findings):
        raise ValueError(f"labels {labels.shape}, probs {probs.shape} and {len(findings)} findings do not agree")
    per = {name: _one_finding(*_valid(labels[:, j], probs[:, j]), threshold) for j, name in enumerate(findings)}
    scored = [m for m in per.values() if m["n_pos"] > 0 and m["n_neg"] > 0]

    def _mean(key: str) -> float:
        return float(np.mean([m[key] for m in scored])) if scored else float("nan")

    return {
        "per_finding": per,
        "mean_auroc": _mean("auroc"),
        "mean_auprc": _mean("auprc"),
        "mean_f1": _mean("f1"),
        "mean_ece": _mean("ece"),
        "n_findings": len(scored),
    }


def threshold_at_sensitivity(labels: np.ndarray, probs: np.ndarray, target: float = 0.9) -> float | np.ndarray:
    """The highest threshold whose sensitivity (``P(prob >= t | y = 1)``) is at least ``target``.

    Args:
        labels: ``[N]`` or ``[N, F]`` with 1/0/-1/NaN (only 1/0 rows count).
        probs: same shape as ``labels``.
        target: the sensitivity to reach, in (0, 1].

    Returns:
        A float for 1-D input, ``[F]`` for 2-D; NaN where there is no positive.
    """
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target must be in (0, 1], got {target}")
    labels, probs = np.asarray(labels, dtype=np.float64), np.asarray(probs, dtype=np.float64)
    if labels.ndim == 2:
        return np.array([threshold_at_sensitivity(labels[:, j], probs[:, j], target) for j in range(labels.shape[1])])
    y, p = _valid(labels, probs)
    pos = np.sort(p[y == 1])[::-1]  # descending
    if len(pos) == 0:
        return float("nan")
    need = max(1, math.ceil(target * len(pos) - 1e-9))  # positives that must score >= t
    return float(pos[need - 1])


def _ratio(a: int, b: int) -> float:
    return a / b if b else float("nan")


def operating_points(
    labels: np.ndarray, probs: np.ndarray, findings: Sequence[str], thresholds: Sequence[float] | np.ndarray
) -> dict[str, dict[str, float | int]]:
    """Sensitivity, specificity, PPV and NPV of ``probs >= threshold`` per finding, on these labels.

    The thresholds must come from another split (:func:`zero_shot_metrics` fits them on ``val``): chosen and scored
    on the same labels, an operating point flatters the model.
    """
    thresholds = np.atleast_1d(np.asarray(thresholds, dtype=float))
    if len(thresholds) != len(findings):
        raise ValueError(f"{len(thresholds)} thresholds for {len(findings)} findings")
    out: dict[str, dict[str, float | int]] = {}
    for j, name in enumerate(findings):
        y, p = _valid(np.asarray(labels, float)[:, j], np.asarray(probs, float)[:, j])
        t = float(thresholds[j])
        row: dict[str, float | int] = {"threshold": t, "n_pos": int((y == 1).sum()), "n_neg": int((y == 0).sum())}
        if np.isfinite(t):
            pred = p >= t
            tp, fp = int((pred & (y == 1)).sum()), int((pred & (y == 0)).sum())
            fn, tn = int((~pred & (y == 1)).sum()), int((~pred & (y == 0)).sum())
            row |= {"sensitivity": _ratio(tp, tp + fn), "specificity": _ratio(tn, tn + fp)}
            row |= {"ppv": _ratio(tp, tp + fp), "npv": _ratio(tn, tn + fn)}
        out[name] = row
    return out


def zero_shot_metrics(
    labels: np.ndarray,
    probs: np.ndarray,
    findings: Sequence[str],
    val_labels: np.ndarray | None = None,
    val_probs: np.ndarray | None = None,
    target_sensitivity: float = 0.9,
    uncalibrated: np.ndarray | None = None,
) -> dict[str, Any]:
    """The zero-shot task's numbers: :func:`classification_metrics` on the scored split and, with a validation
    split, ``operating_point``: per finding the threshold reaching ``target_sensitivity`` on ``val``
    (:func:`threshold_at_sensitivity`) and what it gives on the scored split (:func:`operating_points`).

    With ``uncalibrated`` (the probabilities before calibration; ``probs`` are then the calibrated ones), the ECE
    before calibration is kept beside as ``mean_ece_uncalibrated`` and, per finding, ``ece_uncalibrated``.
    """
    out = classification_metrics(labels, probs, findings)
    out["calibrated"] = uncalibrated is not None
    if uncalibrated is not None:
        before = classification_metrics(labels, uncalibrated, findings)
        out["mean_ece_uncalibrated"] = before["mean_ece"]
        for name, m in before["per_finding"].items():
            out["per_finding"][name]["ece_uncalibrated"] = m["ece"]
    if val_labels is not None and val_probs is not None:
        thresholds = np.atleast_1d(threshold_at_sensitivity(val_labels, val_probs, target_sensitivity))
        out["operating_point"] = {
            "target_sensitivity": float(target_sensitivity),
            "fitted_on": "val",
            "per_finding": operating_points(labels, probs, findings, thresholds),
        }
    return out


def zero_shot_task(
    model: Any,
    val: Any,
    test: Any,
    findings: Sequence[str],
    calibration: Mapping[str, Any] | None = None,
    target_sensitivity: float = 0.9,
    prompts: PromptSpec | None = None,
) -> tuple[dict[str, Any], np.ndarray]:
    """The zero-shot task on split embeddings (:class:`medvlp.tasks.embed.SplitEmbeddings`): probabilities of the
    test images (calibrated when the model has a calibration, :mod:`medvlp.tasks.calibration`) and
    :func:`zero_shot_metrics`, the operating point fitted on ``val``.

    Args:
        prompts: the model's ``(templates, synonyms)`` (:func:`prompt_spec` of its ``cohort.json``); the default
            templates without synonyms when None.

    Returns:
        ``(metrics, probabilities [N, F])``.
    """
    from medvlp.tasks.calibration import apply_calibration
    from medvlp.tasks.prompt_forms import mined_prompts, mined_report_prototypes, prompt_form

    templates, synonyms = prompts or (None, None)
    form = prompt_form(calibration)  # the prompt form chosen on val with the calibration
    mined = mined_prompts(calibration)
    images = np.concatenate([val.image, test.image])
    raw = zero_shot_scores(
        model, images, findings, templates, synonyms, form, mined, mined_report_prototypes(calibration)
    )
    probs = apply_calibration(raw, findings, calibration)[0] if calibration else raw
    metrics, test_probs = val_test_metrics(
        probs, val, test, findings, target_sensitivity, uncalibrated=raw if calibration else None
    )
    metrics["prompts"] = {"templates": "cohort" if templates else "default", "synonyms": dict(synonyms or {})}
    metrics["prompts"]["form"] = form
    if form == "mined_reports":  # label-free: the training reports' mean embeddings (how many reports), no labels
        stored = (calibration or {}).get("mined_report_prototypes") or {}
        metrics["prompts"]["mined_reports"] = {f: stored[f].get("reports") for f in findings if f in stored}
        metrics["prompts"]["uses_training_labels"] = False
    elif form.startswith("mined") and mined is not None:  # label-free: the training reports' sentences, no labels
        metrics["prompts"]["mined"] = {f: mined[f] for f in findings if f in mined}
        metrics["prompts"]["uses_training_labels"] = False
    return metrics, test_probs


def val_test_metrics(
    probs: np.ndarray,
    val: Any,
    test: Any,
    findings: Sequence[str],
    target_sensitivity: float = 0.9,
    uncalibrated: np.ndarray | None = None,
) -> tuple[dict[str, Any], np.ndarray]:
    """:func:`zero_shot_metrics` of probabilities scored on the val rows then the test rows (``probs`` and
    ``uncalibrated`` are ``[N_val + N_test, F]``): the numbers on test, the operating point fitted on val when there
    is a val split. Returns ``(metrics, test probabilities)``."""
    n_val = len(val.image)
    has_val = n_val > 0
    metrics = zero_shot_metrics(
        test.labels,
        probs[n_val:],
        findings,
        val.labels if has_val else None,
        probs[:n_val] if has_val else None,
        target_sensitivity,
        uncalibrated=None if uncalibrated is None else uncalibrated[n_val:],
    )
    return metrics, probs[n_val:]
