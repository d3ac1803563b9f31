"""Calibration of zero-shot probabilities: a temperature and a bias per finding, fitted on ``val``.

The zero-shot probability of a finding is ``sigmoid(z)`` with ``z = scale * (cos(image, positive prompt) -
cos(image, negative prompt))``; calibration replaces it by ``sigmoid(a * z + b)`` with ``a > 0`` (a temperature, so
the ranking and the AUROC are unchanged) and ``b`` fitted per finding by minimising the log-loss on the validation
split (Platt scaling). A sigmoid cannot bend, so with ``isotonic`` (config
``stages.stage2-align.calibration_isotonic``) a finding with at least :data:`ISOTONIC_MIN_PER_CLASS` studies of
each class on ``val`` then also gets an isotonic map fitted on the same studies (``isotonic``: its knots, as
scikit-learn's ``IsotonicRegression`` finds them, interpolated linearly). The answer is ``(1 - w) * platt + w *
isotonic(platt)`` with ``w`` = :data:`ISOTONIC_WEIGHT`: the small Platt share keeps the map strictly increasing, so
flat isotonic steps never tie two studies, and the ranking and AUROC stay those of the raw scores. It is stored in
the model folder as ``calibration.json`` and applied by the evaluation card, the notebooks, the server and the ONNX
scorer alike; a finding without both classes on ``val`` keeps ``a = 1, b = 0``, and a calibration written before
the isotonic step (no ``isotonic`` entry) is applied as Platt scaling alone.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import minimize
from scipy.special import expit

__all__ = [
    "CALIBRATION_FILE",
    "ISOTONIC_MIN_PER_CLASS",
    "ISOTONIC_WEIGHT",
    "apply_calibration",
    "calibrate_model_dir",
    "ece_floor",
    "fit_calibration",
    "load_calibration",
    "save_calibration",
]

CALIBRATION_FILE = "calibration.json"  # in the model folder
ISOTONIC_MIN_PER_CLASS = 10  # val studies of each class a finding needs for its isotonic step
ISOTONIC_WEIGHT = 0.98  # the isotonic map's share; the Platt share keeps the answer strictly increasing
_EPS = 1e-12


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), _EPS, 1 - _EPS)
    return np.log(p) - np.log1p(-p)


def _fit_one(z: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    def loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
        a, b = np.exp(theta[0]), theta[1]
        s = a * z + b
        p = expit(s)
        nll = float(np.mean(np.logaddexp(0.0, s) - y * s))
        g = p - y  # d nll / d s
        return nll, np.array([float(np.mean(g * z)) * a, float(np.mean(g))])

    res = minimize(loss, np.zeros(2), jac=True, method="L-BFGS-B", bounds=[(-10.0, 10.0), (-50.0, 50.0)])
    return float(np.exp(res.x[0])), float(res.x[1])


def fit_calibration(
    labels: np.ndarray, probs: np.ndarray, findings: Sequence[str], isotonic: bool = False
) -> dict[str, Any]:
    """Per finding ``a`` and ``b`` from validation labels ``[N, F]`` (1/0; -1 and NaN left out) and probabilities,
    and with ``isotonic`` the isotonic step's knots where a finding has enough studies of each class.

    Returns:
        ``{"fitted_on": "val", "findings": {name: {"a", "b", "n"}}}``; a finding without both classes is not listed.
    """
    labels = np.asarray(labels, dtype=np.float64).reshape(len(labels), -1)
    probs = np.asarray(probs, dtype=np.float64).reshape(len(probs), -1)
    if labels.shape != probs.shape or labels.shape[1] != len(findings):
        raise ValueError(f"labels {labels.shape}, probs {probs.shape} and {len(findings)} findings do not agree")
    out: dict[str, Any] = {"fitted_on": "val", "findings": {}}
    for j, name in enumerate(findings):
        keep = np.isin(labels[:, j], (0.0, 1.0)) & np.isfinite(probs[:, j])
        y, z = labels[keep, j], _logit(probs[keep, j])
        if len(np.unique(y)) < 2:
            continue
        a, b = _fit_one(z, y)
        out["findings"][str(name)] = {"a": a, "b": b, "n": int(keep.sum())}
        if isotonic and min(int(y.sum()), int(len(y) - y.sum())) >= ISOTONIC_MIN_PER_CLASS:
            out["findings"][str(name)]["isotonic"] = _fit_isotonic(expit(a * z + b), y)
    return out


def _fit_isotonic(p: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """The knots of the isotonic regression of the labels on the Platt probabilities, and its weight."""
    from sklearn.isotonic import IsotonicRegression

    fitted = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(p, y)
    return {
        "x": [float(v) for v in fitted.X_thresholds_],
        "y": [float(v) for v in fitted.y_thresholds_],
        "weight": ISOTONIC_WEIGHT,
    }


def apply_calibration(
    probs: np.ndarray, findings: Sequence[str], calibration: Mapping[str, Any] | None
) -> tuple[np.ndarray, list[bool]]:
    """Calibrated ``[N, F]`` probabilities, and per finding whether a calibration was applied."""
    probs = np.asarray(probs, dtype=np.float64)
    fitted = (calibration or {}).get("findings") or {}
    out = probs.copy()
    applied = []
    for j, name in enumerate(findings):
        c = fitted.get(name)
        applied.append(c is not None)
        if c is not None:
            platt = expit(float(c["a"]) * _logit(probs[..., j]) + float(c["b"]))
            iso = c.get("isotonic")
            if iso:
                w = float(iso["weight"])
                platt = (1.0 - w) * platt + w * np.interp(platt, np.asarray(iso["x"]), np.asarray(iso["y"]))
            out[..., j] = platt
    return out, applied


def save_calibration(model_dir: str | Path, calibration: Mapping[str, Any]) -> Path:
    """Write ``calibration.json`` into a model folder (atomically)."""
    from medvlp.data.cache import atomic_write_json

    path = Path(model_dir) / CALIBRATION_FILE
    atomic_write_json(path, dict(calibration))
    return path


def load_calibration(model_dir: str | Path) -> dict[str, Any] | None:
    """The model folder's calibration, or None when it has none."""
    path = Path(model_dir) / CALIBRATION_FILE
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or not isinstance(data.get("findings"), dict):
        raise ValueError(f"{path} is not a calibration file (expected a 'findings' mapping)")
    return data


def calibrate_model_dir(
    model_dir: str | Path,
    cache: Any,
    sections: Sequence[str],
    forms: Sequence[str] = ("sentence",),
    isotonic: bool = False,
    topic_readers: Sequence[str] | None = None,
) -> dict[str, Any] | None:
    """Fit the calibration of a model folder on its cohort's ``val`` split and write it there.

    With several prompt ``forms`` (:mod:`medvlp.tasks.prompt_forms`), the one with the best mean zero-shot AUROC on
    ``val`` is chosen first (an earlier one wins ties) and stored as ``prompt_form``, with every candidate's val
    AUROC beside it; the temperatures and biases are then fitted to that form's probabilities.

    The probabilities are those of the model's own prompts (:func:`medvlp.tasks.zeroshot.prompt_spec` of the model
    folder's ``cohort.json``, else of the cache's ``summary.json``), the ones evaluation and the server answer with.

    ``topic_readers`` (:mod:`medvlp.tasks.mined_prompts`; its default when None) read the training sentences' topics
    for the mined forms, and are stored as ``mining_topic_readers`` when a mined form is a candidate.

    Returns:
        The calibration, or None when the cohort has no validation studies (nothing is written then).
    """
    import logging

    from medvlp.data.cache import COHORT_RECORD
    from medvlp.models import MedVLP
    from medvlp.tasks.embed import embed_split
    from medvlp.tasks.prompt_forms import choose_prompt_form, mined_report_prototypes
    from medvlp.tasks.zeroshot import classification_metrics, prompt_spec, zero_shot_scores

    if cache.split("val").empty or not cache.findings:
        logging.getLogger(__name__).warning("no validation studies (or no findings): the model stays uncalibrated")
        return None
    model = MedVLP.from_pretrained(model_dir).eval()
    val = embed_split(model, cache, "val", sections)
    record_path = Path(model_dir) / COHORT_RECORD
    record = json.loads(record_path.read_text()) if record_path.is_file() else cache.summary
    templates, synonyms = prompt_spec(record)
    from medvlp.tasks.mined_prompts import DEFAULT_TOPIC_READERS

    readers = list(DEFAULT_TOPIC_READERS if topic_readers is None else topic_readers)
    mined, stored = _mine(model, cache, sections, templates, synonyms, forms, readers)
    prototypes = mined_report_prototypes({"mined_report_prototypes": stored})
    scores = {
        f: zero_shot_scores(model, val.image, cache.findings, templates, synonyms, f, mined, prototypes) for f in forms
    }
    aurocs = {f: classification_metrics(val.labels, s, cache.findings)["mean_auroc"] for f, s in scores.items()}
    form = choose_prompt_form(aurocs)
    calibration = fit_calibration(val.labels, scores[form], cache.findings, isotonic=isotonic)
    calibration |= {
        "prompt_form": form,
        "prompt_form_candidates": list(forms),  # in order: an earlier one wins ties
        "prompt_form_val_auroc": {f: float(a) for f, a in aurocs.items()},
    }
    if mined is not None or stored is not None:
        calibration["mining_topic_readers"] = readers
    if mined is not None:  # kept whichever form won, so the record shows what the mined form would have said
        calibration["mined_prompts"] = mined
    if stored is not None:
        calibration["mined_report_prototypes"] = stored
    save_calibration(model_dir, calibration)
    return calibration


def _mine(
    model: Any,
    cache: Any,
    sections: Sequence[str],
    templates: Any,
    synonyms: Any,
    forms: Sequence[str],
    topic_readers: Sequence[str],
) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """What the candidate ``forms`` need from the training split's reports (no labels read): the ``mined`` forms'
    sentences and the ``mined_reports`` form's prototypes, each None when no candidate needs it."""
    from medvlp.tasks.mined_prompts import mine_prompts, mine_report_prototypes
    from medvlp.tasks.prompt_forms import MINED_FORMS, REPORT_PROTOTYPE_FORM

    wants_sentences, wants_prototypes = any(f in MINED_FORMS for f in forms), REPORT_PROTOTYPE_FORM in forms
    if not (wants_sentences or wants_prototypes):
        return None, None
    train = cache.split("train")
    reports = list(train["report"])
    subjects = list(train["subject"]) if "subject" in train.columns else None
    args = (model, reports, cache.findings, templates, synonyms, subjects, sections)
    sentences = None
    if wants_sentences:
        mined = mine_prompts(*args, topic_readers=topic_readers)
        sentences = {f: {k: e[k] for k in ("positive", "negative", "fallback")} for f, e in mined.items()}
    return sentences, mine_report_prototypes(*args, topic_readers=topic_readers) if wants_prototypes else None


def ece_floor(labels: np.ndarray, probs: np.ndarray, draws: int = 1000, seed: int = 0) -> np.ndarray:
    """Per finding, the ECE that a perfectly calibrated model with these probabilities would show on these studies.

    Labels are drawn from the probabilities themselves (``y ~ Bernoulli(p)``), ``draws`` times, on the rows that
    carry a 0/1 label in ``labels`` (as :func:`~medvlp.tasks.zeroshot.expected_calibration_error` scores), and the
    mean ECE is returned: the finite-sample noise of the metric. A measured ECE near its floor cannot be told from
    perfect calibration on this test split; a goal below the floor cannot be shown on it.

    Returns:
        ``[F]`` float64; NaN for a finding without labelled rows.
    """
    from medvlp.tasks.zeroshot import expected_calibration_error

    labels = np.asarray(labels, dtype=np.float64).reshape(len(labels), -1)
    probs = np.asarray(probs, dtype=np.float64).reshape(len(probs), -1)
    rng = np.random.default_rng(seed)
    out = np.full(probs.shape[1], np.nan)
    for j in range(probs.shape[1]):
        p = probs[np.isin(labels[:, j], (0.0, 1.0)) & np.isfinite(probs[:, j]), j]
        if len(p):
            drawn = rng.random((draws, len(p))) < p  # [draws, N]
            out[j] = float(np.mean([expected_calibration_error(y.astype(np.float64), p) for y in drawn]))
    return out
