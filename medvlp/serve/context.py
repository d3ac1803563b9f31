"""What a served model needs besides its weights: the training preprocessing, its findings, the report corpus, the card.

The served preprocessing must be the training one, so it is never guessed. It is taken, in this order, from

1. ``cohort.json`` in the run folder or the model folder (``{"cohort", "modality", "spatial_dims", "findings",
   "preprocess"}``: the subset of the cache's ``summary.json`` a model needs; see :func:`cohort_record`),
2. the ``summary.json`` of the cache named in the run folder's ``run.json`` (written by ``medvlp train``),
3. the ``summary.json`` of the cache given with ``--cache`` or built from ``--cohort``,
4. the preprocessing of the ``--cohort`` YAML itself,

and a server with none of them refuses to start. The report corpus for retrieval is the training split of the
cache (from ``--cache``, ``--cohort`` or ``run.json``); without one, retrieval answers 409.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medvlp.data.cache import COHORT_RECORD, cohort_record
from medvlp.data.cohort import PreprocessSpec

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
        source: where ``cohort`` came from (for the log and ``/v1/model``).
    """

    cohort: dict[str, Any]
    preprocess: PreprocessSpec
    findings: list[str]
    report_sections: list[str] = field(default_factory=lambda: ["findings", "impression"])
    cache_dir: Path | None = None
    metrics_path: Path | None = None
    source: str = ""


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _run_cache(run: Path) -> Path | None:
    info = _read_json(run / "run.json")
    cache = Path(info["cache"]) if info and isinstance(info.get("cache"), str) else None
    return cache if cache is not None and (cache / "summary.json").is_file() else None


def find_card(run: Path, card: Path | None = None) -> Path | None:
    """The ``metrics.json`` of the run's evaluation card: ``card`` (a folder or the file itself), else
    ``RUN/card/metrics.json``, ``RUN/metrics.json`` or ``RUN/../card/metrics.json`` (the demo's layout)."""
    if card is not None:
        path = card / "metrics.json" if card.is_dir() else card
        if not path.is_file():
            raise FileNotFoundError(f"no evaluation card at {card} (expected metrics.json)")
        return path
    for cand in (run / "card" / "metrics.json", run / "metrics.json", run.parent / "card" / "metrics.json"):
        if cand.is_file():
            return cand
    return None


def _sections(run: Path) -> list[str]:
    from medvlp.config import ConfigError, load_config

    for cand in (run / "config.yaml", run.parent.parent / "config.yaml"):
        if cand.is_file():
            try:
                return list(load_config(cand).data.report_sections)
            except ConfigError:
                logger.warning("%s is not a valid training config; using the default report sections", cand)
    return ["findings", "impression"]


def resolve_context(
    run: Path,
    model_dir: Path,
    *,
    cohort_yaml: Path | None = None,
    cache_dir: Path | None = None,
    card: Path | None = None,
    build: bool = True,
) -> ServingContext:
    """Find the training cohort's record, corpus and card for a run folder (or a bare model folder).

    Args:
        run: what ``--model`` named (a run folder or a model folder).
        model_dir: the model folder inside it.
        cohort_yaml: the training cohort; its cache is built (or brought up to date) when ``build``.
        cache_dir: the training cohort's cache folder.
        card: an evaluation card folder or its ``metrics.json``.
        build: build the cohort's cache when ``cohort_yaml`` is given.

    Raises:
        ValueError: no record of the training preprocessing anywhere.
        FileNotFoundError: ``card`` or ``cache_dir`` given but missing.
    """
    from medvlp.data.cohort import load_spec

    if cache_dir is not None and not (cache_dir / "summary.json").is_file():
        raise FileNotFoundError(f"{cache_dir} is not a built cohort cache (no summary.json)")
    if cache_dir is None and cohort_yaml is not None:
        from medvlp.train.run import default_cache_dir

        cache_dir = default_cache_dir(cohort_yaml)
        if build:
            from medvlp.data.build import build_cohort

            build_cohort(cohort_yaml, cache_dir)
        if not (cache_dir / "summary.json").is_file():
            cache_dir = None
    run_cache = _run_cache(run)
    if cache_dir is None:
        cache_dir = run_cache

    record: dict[str, Any] | None = None
    source = ""
    for folder in (run, model_dir):
        record = _read_json(folder / COHORT_RECORD)
        if record is not None:
            source = str(folder / COHORT_RECORD)
            break
    for cache in (run_cache, cache_dir):
        if record is None and cache is not None:
            record, source = cohort_record(_read_json(cache / "summary.json") or {}), str(cache / "summary.json")
    if record is None and cohort_yaml is not None:
        spec = load_spec(cohort_yaml)
        record = {
            "cohort": spec.name,
            "modality": spec.modality,
            "spatial_dims": spec.spatial_dims,
            "findings": list(spec.findings),
            "preprocess": spec.preprocessing.model_dump(mode="json"),
        }
        source = str(cohort_yaml)
    if not record or "preprocess" not in record:
        raise ValueError(
            f"{run}: no record of the training preprocessing ({COHORT_RECORD} in the run or model folder, or the "
            "cohort cache named in run.json); give the training cohort with --cohort COHORT.yaml or --cache DIR"
        )
    preprocess = PreprocessSpec.model_validate(record["preprocess"])
    return ServingContext(
        cohort=record,
        preprocess=preprocess,
        findings=[str(f) for f in record.get("findings") or []],
        report_sections=_sections(run),
        cache_dir=cache_dir,
        metrics_path=find_card(run, card),
        source=source,
    )
