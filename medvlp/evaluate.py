"""`medvlp evaluate`: every downstream task on the cohort's test split, written as a card folder.

Each number comes from its task's one function in :mod:`medvlp.tasks` (the notebooks call the same ones):
zero-shot diagnosis (:func:`~medvlp.tasks.zeroshot.zero_shot_metrics`, the operating point fitted on ``val``),
report retrieval (:func:`~medvlp.tasks.retrieval.retrieval_metrics`, ties against the model, identical reports one
answer), phrase grounding (:func:`~medvlp.tasks.grounding.grounding_summary`, one score per study and phrase over
the union of its boxes), survival (:func:`~medvlp.tasks.survival_compare.survival_task`, the cohort's own columns)
and linear probes. Beside zero-shot, ``prompt_prototype`` scores the same images against prompts taken from the
training split's own sentences (:func:`~medvlp.tasks.prompts.prompt_prototype_task`); it uses the training labels,
so it is not zero-shot and says so (``"uses_training_labels": true``). With ``baselines`` the same architecture is
also evaluated untrained and after alignment alone (stage 2 without stage 1, trained here from the run's own config),
so the card shows what each stage buys.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medvlp.artifacts import ALIGN_ONLY_RUN, CARD_METRICS, RunDir
from medvlp.data.cache import CachedCohort
from medvlp.models import MedVLP
from medvlp.tasks import grounding, probe, retrieval, robustness, survival_compare, zeroshot
from medvlp.tasks.calibration import ece_floor
from medvlp.tasks.embed import SplitEmbeddings, embed_split, load_images
from medvlp.tasks.prompts import PROMPT_MODES, prompt_prototype_task

logger = logging.getLogger(__name__)
BASELINES = ("untrained", "align_only")
ALIGN_ONLY_DIR = ALIGN_ONLY_RUN  # inside the card folder
PROTOCOL = {
    "split": "test; every tuned choice (calibration, operating points) fitted on val",
    "retrieval": "ties count against the model; identical normalized reports are one answer",
    "grounding": "one score per (study, phrase) against the union of its boxes; mIoU at cosine 0.1-0.5; "
    "cnr_control: the same phrase and boxes on a test image without the finding",
    "survival": "Cox fitted on train; risk groups cut at the training median; bootstrap by subject",
    "robustness": "true finding sentence vs its negated and laterality-swapped twins; absence: the negated sentence vs "
    "the affirmative on a study without the finding; ties count as misses",
    "prompt_prototype": "prompts chosen from the train split's report sentences with its labels: not zero-shot",
    "zero_shot_prompts": "the prompt form chosen on val; the mined forms read the train split's report text, never "
    "its labels",
    "ece_floor": "mean ECE of labels drawn from the answered probabilities themselves (1000 seeded draws): the ECE "
    "a perfectly calibrated model would show on this test split",
}

__all__ = ["BASELINES", "SplitEmbeddings", "embed_split", "evaluate", "evaluate_model", "train_align_only"]


def _survival(cache: CachedCohort, train: SplitEmbeddings, test: SplitEmbeddings) -> tuple[Any, ...]:
    try:
        return survival_compare.survival_task(cache, train, test)
    except ValueError as exc:  # e.g. too few subjects with follow-up: the card says so, the other tasks stand
        logger.warning("survival not evaluated: %s", exc)
        return {"error": str(exc), "c_index": None}, None, None


def _plots(model: MedVLP, cache: CachedCohort, plot_dir: Path, found: dict[str, Any]) -> None:
    from medvlp.viz import figures

    test, probs, zs = found["test"], found["probs"], found["zero_shot"]
    findings = cache.findings
    points = (zs.get("operating_point") or {}).get("per_finding")
    figures.save_png(
        figures.roc_figure(test.labels, probs, findings, points, "Zero-shot ROC (test)"), plot_dir / "roc_zero_shot.png"
    )
    figures.save_png(figures.calibration_figure(test.labels, probs, findings), plot_dir / "calibration_zero_shot.png")
    if found.get("prototype_probs") is not None:  # --prompts auto: the prototype classifier's plots beside
        pp, pm = found["prototype_probs"], found["prompt_prototype"]
        points = (pm.get("operating_point") or {}).get("per_finding")
        title = "Prompt-prototype ROC (test; uses training labels)"
        figures.save_png(
            figures.roc_figure(test.labels, pp, findings, points, title), plot_dir / "roc_prompt_prototype.png"
        )
        figures.save_png(
            figures.calibration_figure(test.labels, pp, findings), plot_dir / "calibration_prompt_prototype.png"
        )
    scores = found["grounding_scores"]
    for k, i in enumerate(scores.sort_values("cnr", ascending=False).index[:4]):
        row = scores.loc[i]
        images = load_images(cache, [row["study"]])
        maps = grounding.similarity_maps(model, images, [row["phrase"]])
        title = f"{row['phrase']} (CNR {row['cnr']:.2f})"
        fig = figures.grounding_figure(images, maps, [title], [row["boxes"]], [cache.affine(row["study"])])
        figures.save_png(fig, plot_dir / f"grounding_{k}.png")
    data, result = found["survival_data"], found["survival_result"]
    if data is not None and result is not None:
        fig = figures.kaplan_meier_figure(data.time_test, data.event_test, result.groups)
        figures.save_png(fig, plot_dir / "kaplan_meier.png")


def evaluate_model(
    model: MedVLP,
    cache: CachedCohort,
    sections: list[str],
    plot_dir: Path | None = None,
    calibration: dict[str, Any] | None = None,
    record: dict[str, Any] | None = None,
    prompts: str = "templates",
) -> dict[str, Any]:
    """All tasks for one model on the test split (tuned choices, the calibration included, on val); plots go to
    ``plot_dir`` when given.

    Args:
        record: the model's ``cohort.json`` (its prompts, :func:`~medvlp.tasks.zeroshot.prompt_spec`); the cache's
            ``summary.json`` when None.
        prompts: ``"templates"`` or ``"auto"``; both report ``zero_shot`` (the cohort's templates and synonyms,
            true zero-shot) and ``prompt_prototype`` (uses training labels); ``"auto"`` also draws the prototype
            classifier's ROC and calibration plots and marks its section ``"chosen": true``.
    """
    if prompts not in PROMPT_MODES:
        raise ValueError(f"prompts must be one of {', '.join(PROMPT_MODES)}, got {prompts!r}")
    if plot_dir is not None:
        plot_dir.mkdir(parents=True, exist_ok=True)
    spec = zeroshot.prompt_spec(cache.summary if record is None else record)
    train, val, test = (embed_split(model, cache, s, sections) for s in ("train", "val", "test"))
    zs, probs = zeroshot.zero_shot_task(model, val, test, cache.findings, calibration, prompts=spec)
    _add_ece_floor(zs, test.labels, probs, cache.findings)
    proto, proto_probs = prompt_prototype_task(model, train, val, test, cache.findings, sections, spec)
    proto["chosen"] = prompts == "auto"
    scores = grounding.grounding_scores(model, cache, grounding.grounding_pairs(cache, "test"))
    surv, sdata, sresult = _survival(cache, train, test)
    pr = probe.linear_probe(train.image, train.labels, test.image, test.labels, cache.findings)
    metrics = {
        "zero_shot": zs,
        "prompt_prototype": proto,
        "retrieval": retrieval.retrieval_metrics(test.image, test.text, labels=test.labels, texts=test.reports),
        "grounding": grounding.grounding_summary(scores),
        "robustness": robustness.robustness_suite(model, cache, test.image, list(test.records["study"])),
        "survival": surv,
        "linear_probe": {
            "mean_auroc": pr["curve"].get(1.0),
            "curve": pr["curve"],
            "fractions": pr["fractions"],
            "skipped": pr["skipped"],
        },
    }
    if plot_dir is not None:
        found = {"test": test, "probs": probs, "zero_shot": zs, "grounding_scores": scores, "prompt_prototype": proto}
        found["prototype_probs"] = proto_probs if prompts == "auto" else None
        _plots(model, cache, plot_dir, found | {"survival_data": sdata, "survival_result": sresult})
    return metrics


def _add_ece_floor(zs: dict[str, Any], labels: np.ndarray, probs: np.ndarray, findings: list[str]) -> None:
    """``ece_floor`` per finding and ``mean_ece_floor`` (over the findings the mean ECE averages) beside the ECE:
    what a perfectly calibrated model would score on this test split (:func:`~medvlp.tasks.calibration.ece_floor`)."""
    floors = ece_floor(labels, probs)
    for name, floor in zip(findings, floors, strict=True):
        zs["per_finding"][name]["ece_floor"] = float(floor)
    scored = [
        float(f) for name, f in zip(findings, floors, strict=True) if np.isfinite(zs["per_finding"][name]["auroc"])
    ]
    zs["mean_ece_floor"] = float(np.mean(scored)) if scored else float("nan")


def _untrained(model: MedVLP) -> MedVLP:
    """The same architecture with no pretraining: random image tower, the generic (not adapted) text tower, no image
    refit (an unfitted one is the identity on the embedding and would give every cell of the tokens the same one)."""
    update = {"text_encoder": None, "image_checkpoint": None, "text_num_layers": model.text_encoder.num_layers}
    cfg = model.config.model_copy(update=update | {"image_refit": None, "image_refit_cell": None})
    with torch.random.fork_rng(devices=[]):  # a fixed draw, without touching the caller's random state
        torch.manual_seed(0)
        return MedVLP(cfg)


def evaluate(
    model_path: str | Path,
    cohort_yaml: str | Path,
    out: str | Path,
    baselines: bool | Sequence[str] = False,
    cache_dir: str | Path | None = None,
    prompts: str = "templates",
) -> dict[str, Any]:
    """Evaluate a run (or model folder) on a cohort's test split; write ``out/metrics.json``, plots and the card.

    The cohort's cache must be built (``medvlp cohort build`` or ``medvlp train``); it is found, never built here.
    Zero-shot uses the model's own prompts (its ``cohort.json``); ``prompts="auto"`` also plots the prompt-prototype
    classifier (see :func:`evaluate_model`).

    ``baselines``: True for both, or a list of ``"untrained"`` (same architecture, random image tower and
    projections, generic text tower) and ``"align_only"`` (stage 2 alone, trained here with the run's settings).
    """
    from medvlp.viz import figures

    wanted = set(BASELINES if baselines is True else baselines or ())
    if wanted - set(BASELINES):
        raise ValueError(f"unknown baseline(s) {sorted(wanted - set(BASELINES))}; known: {', '.join(BASELINES)}")
    if prompts not in PROMPT_MODES:
        raise ValueError(f"prompts must be one of {', '.join(PROMPT_MODES)}, got {prompts!r}")
    out = Path(out)
    run = RunDir.open(model_path)
    cache = run.open_cache(cohort_yaml, cache_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = run.load_model()
    sections = run.report_sections
    record = run.cohort_record()
    metrics = evaluate_model(model, cache, sections, out, run.calibration(), record, prompts)
    metrics["cohort"] = {
        "name": cache.summary["cohort"],
        "test_studies": len(cache.split("test")),
        "findings": cache.findings,
    }
    metrics["protocol"] = dict(PROTOCOL)
    # the model's image refit and its fit record; None without one
    metrics["image_refit"] = None if model.image_refit is None else (run.image_refit() or {})
    if metrics.get("robustness") is not None:  # the model's side edit and its fit record; None without one
        edit, record = model.side_edit, run.side_edit() or {}
        metrics["robustness"]["side_edit"] = (
            None if edit is None else {**record, "texts": edit.texts, "strength": round(float(edit.strength), 6)}
        )
        check, record = model.side_check, run.side_check() or {}
        metrics["robustness"]["side_check"] = (
            None
            if check is None
            else {
                **record,
                "axis": check.axis,
                "orientation": float(check.orientation),
                "strength": round(float(check.strength), 6),
            }
        )
    if metrics.get("grounding") is not None:  # a model that trained on the phrase boxes was told where they are
        # None: a bare model folder, whose training config is not known
        cfg = run.config
        metrics["grounding"]["supervised"] = None if cfg is None else cfg.stages.stage2_align.box_weight > 0
    curves = {"model": metrics["linear_probe"]["curve"]}
    if wanted:
        metrics["baselines"] = {}
        if "untrained" in wanted:
            metrics["baselines"]["untrained"] = evaluate_model(_untrained(model), cache, sections, record=record)
        if "align_only" in wanted and run.config is not None:
            align_run = train_align_only(run.config, cohort_yaml, cache.root, out)
            baseline = RunDir.open(align_run)
            metrics["baselines"]["align_only"] = evaluate_model(
                baseline.load_model(),
                cache,
                sections,
                calibration=baseline.calibration(),
                record=baseline.cohort_record(),
            )
        curves |= {k: v["linear_probe"]["curve"] for k, v in metrics["baselines"].items()}
    figures.save_png(figures.data_efficiency_figure(curves), out / "data_efficiency.png")
    (out / CARD_METRICS).write_text(json.dumps(_jsonable(metrics), indent=2) + "\n")
    from medvlp.card import write_model_card

    write_model_card(out, metrics, Path(model_path))
    return metrics


def train_align_only(
    cfg: Any,
    cohort_yaml: str | Path,
    cache_path: Path,
    out: Path,
    progress: Callable[[str, int, int], None] | None = None,
) -> Path:
    """Stage 2 alone from the generic towers, with the run's own stage-2 settings, into ``out/baselines/align-only``.

    Resumable: a card folder whose align-only run is already trained (``medvlp demo`` trains it under its own
    progress display) is evaluated without training again. Returns the run folder.
    """
    from medvlp.train.run import train

    run = out / ALIGN_ONLY_DIR
    train(cfg, cohort_yaml, run, stages=["stage2-align"], cache_dir=cache_path, resume=True, progress=progress)
    return run


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, np.generic):
        return _jsonable(x.item())
    if isinstance(x, float) and not np.isfinite(x):
        return None
    return x
