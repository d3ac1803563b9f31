"""What a served model needs besides its weights: the training preprocessing, its findings, the report corpus, the card.

The served preprocessing must be the training one, so it is never guessed. It is taken, in this order, from

1. ``cohort.json`` in the run folder or the model folder (``{"cohort", "modality", "spatial_dims", "findings",
   "preprocess", "prompts"}``: the subset of the cache's ``summary.json`` a model needs; see :func:`cohort_record`),
2. the ``summary.json`` of the cache named in the run folder's ``run.json`` (written by ``medvlp train``),
3. the ``summary.json`` of the cache given with ``--cache`` or found for ``--cohort`` (never built here),
4. the preprocessing of the ``--cohort`` YAML itself,

and a server with none of them refuses to start. The zero-shot prompts (the cohort's synonyms and templates) come
from the same record, through :func:`medvlp.tasks.zeroshot.prompt_spec`. The report corpus for retrieval is the
training split of the cache (from ``--cache``, ``--cohort`` or ``run.json``); without one, retrieval answers 409.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medvlp.artifacts import RunDir, find_card
from medvlp.data.cache import COHORT_RECORD, cohort_record
from medvlp.data.cohort import PreprocessSpec
from medvlp.tasks.zeroshot import PromptSpec, prompt_spec

logger = logging.getLogger(__name__)

__all__ = ["COHORT_RECORD", "ServingContext", "cohort_record", "find_card", "resolve_context"]


@dataclass
class ServingContext:
    """Everything about the training cohort the server needs; no study, no patient.

    Attributes:
        cohort: ``{"cohort", "modality", "spatial_dims", "findings", "preprocess"}``.
        preprocess: the training preprocessing.
        findings: the model's own finding names (the default of ``/v1/diagnose``).
        report_sections: the report sections the text tower was trained on.
        cache_dir: the training cohort cache (the retrieval corpus), when there is one.
        metrics_path: the evaluation card's ``metrics.json``, when there is one.
        calibration: the model's zero-shot calibration (``calibration.json``), when it has one.
        prompts: ``(templates, synonyms)`` of the model's prompts (:func:`medvlp.tasks.zeroshot.prompt_spec`).
        source: where ``cohort`` came from (for the log and ``/v1/model``).
    """

    cohort: dict[str, Any]
    preprocess: PreprocessSpec
    findings: list[str]
    report_sections: list[str] = field(default_factory=lambda: ["findings", "impression"])
    cache_dir: Path | None = None
    metrics_path: Path | None = None
    calibration: dict[str, Any] | None = None
    prompts: PromptSpec = (None, None)
    source: str = ""


def resolve_context(
    run: RunDir, *, cohort_yaml: Path | None = None, cache_dir: Path | None = None, card: Path | None = None
) -> ServingContext:
    """Find the training cohort's record, corpus and card for a run folder (or a bare model folder).

    Args:
        run: the opened run (or model) folder.
        cohort_yaml: the training cohort; its cache (built by ``medvlp cohort build`` or ``medvlp train``) is the
            retrieval corpus, and its YAML the preprocessing when no record is found.
        cache_dir: the training cohort's cache folder.
        card: an evaluation card folder or its ``metrics.json``.

    Raises:
        ValueError: no record of the training preprocessing anywhere.
        FileNotFoundError: ``card`` or ``cache_dir`` given but missing.
    """
    from medvlp.data.cohort import load_spec

    if cache_dir is not None or cohort_yaml is not None:
        try:
            cache_dir = run.find_cache(cohort_yaml, cache_dir)
        except FileNotFoundError:
            if cache_dir is not None:
                raise
            logger.warning("no cache for the cohort: retrieval is unavailable (`medvlp cohort build` makes one)")
            cache_dir = None
    run_cache = run.recorded_cache()
    if cache_dir is None:
        cache_dir = run_cache

    record, source = run.cohort_record(), "cohort.json"
    for cache in (run_cache, cache_dir):
        if record is None and cache is not None:
            summary = json.loads((cache / "summary.json").read_text())
            record, source = cohort_record(summary), str(cache / "summary.json")
    if record is None and cohort_yaml is not None:
        spec = load_spec(cohort_yaml)
        record = {
            "cohort": spec.name,
            "modality": spec.modality,
            "spatial_dims": spec.spatial_dims,
            "findings": list(spec.findings),
            "preprocess": spec.preprocessing.model_dump(mode="json"),
            "prompts": spec.prompts.model_dump(mode="json") if spec.prompts else None,
        }
        source = str(cohort_yaml)
    if not record or "preprocess" not in record:
        raise ValueError(
            f"{run.root}: no record of the training preprocessing ({COHORT_RECORD} in the run or model folder, or "
            "the cohort cache named in run.json); give the training cohort with --cohort COHORT.yaml or --cache DIR"
        )
    return ServingContext(
        cohort=record,
        preprocess=PreprocessSpec.model_validate(record["preprocess"]),
        findings=[str(f) for f in record.get("findings") or []],
        report_sections=run.report_sections,
        cache_dir=cache_dir,
        metrics_path=run.card(card),
        calibration=run.calibration(),
        prompts=prompt_spec(record),
        source=source,
    )
