"""Batch prediction: score every study of a cohort split or of a folder with a trained model (``medvlp predict``).

Probabilities come from the server's own code, :meth:`medvlp.serve.service.DiagnosisService.run_images` (the
model's preprocessing, prompts and :func:`medvlp.tasks.zeroshot.zero_shot_probabilities`), so a study scores the
same here as over HTTP. The output folder is the one owner of this layout::

    OUT/predictions.parquet, predictions.csv   study (pseudonym), finding, probability
    OUT/quarantine.csv                           study, reason (no path, no identifier)
    OUT/studies/<study>.json                     one finished study (what a rerun skips)
    OUT/sr/<study>.dcm                           with --sr: the DICOM SR of a DICOM study
    OUT/heatmaps/<study>/<finding>.png           with --heatmaps: grounding overlays
    OUT/secret/pseudonym.key                     with --images: the key of the study pseudonyms (keep it inside)

Studies are named by pseudonyms (``st-...``): with ``--cohort``, the same as in the cohort's cache; with
``--images``, an HMAC of the entry's name under a key kept in ``OUT/secret``. A rerun skips finished studies and
retries quarantined ones.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from medvlp.data.cache import atomic_write_bytes, atomic_write_json
from medvlp.data.privacy import load_or_create_key, pseudonym
from medvlp.serve.errors import ApiError
from medvlp.serve.service import DiagnosisService, ImageJob

logger = logging.getLogger(__name__)

__all__ = ["PREDICTIONS", "PredictSummary", "Study", "find_studies", "predict", "read_predictions"]

PREDICTIONS = "predictions.parquet"
COLUMNS = ("study", "finding", "probability")
IMAGE_SUFFIXES = (".dcm", ".dicom", ".ima", ".nii", ".nii.gz", ".png", ".jpg", ".jpeg")  # and names without a suffix


@dataclass(frozen=True)
class Study:
    """One study to score: its pseudonym and the file or series folder to read."""

    study: str
    path: Path


@dataclass
class PredictSummary:
    scored: int  # studies scored in this call
    reused: int  # finished in an earlier call
    quarantined: int
    seconds: float
    out: Path


def _is_image_entry(p: Path) -> bool:
    if p.name.startswith(".") or p.name == "secret":
        return False
    if p.is_dir():
        return True
    name = p.name.lower()
    return name.endswith(IMAGE_SUFFIXES) or "." not in name


def find_studies(
    *, cohort: Path | None = None, split: str | None = "test", images: Path | None = None, out: Path
) -> list[Study]:
    """The studies of a cohort split (``split`` None: all) or of a folder (each file or series folder in it).

    Raises:
        ValueError: neither or both of ``cohort`` and ``images``, an unknown split, or an empty folder.
    """
    if (cohort is None) == (images is None):
        raise ValueError("give exactly one of a cohort (--cohort) and a folder of studies (--images)")
    if cohort is not None:
        from medvlp.data.cohort import SPLITS, load_cohort
        from medvlp.train.run import default_cache_dir

        if split is not None and split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        c = load_cohort(cohort)
        key = load_or_create_key(default_cache_dir(cohort))
        rows = c.manifest if split is None else c.manifest[c.manifest["split"] == split]
        return [Study(pseudonym(key, "st", str(r.study_id)), c.spec.resolve(r.image)) for r in rows.itertuples()]
    assert images is not None
    if not images.is_dir():
        raise ValueError(f"--images must be a folder of studies, got {images}")
    entries = sorted(p for p in images.iterdir() if _is_image_entry(p))
    if not entries:
        raise ValueError(f"{images} holds no study (DICOM files, series folders, NIfTI or PNG files)")
    key = load_or_create_key(out)
    return [Study(pseudonym(key, "st", p.name), p) for p in entries]


def _scrub(message: str, study: Study) -> str:
    """An error message without the study's path or file name (they may carry identifiers)."""
    for text in (str(study.path), str(study.path.parent), study.path.name):
        if text and text not in (".", "/"):
            message = message.replace(text, study.study)
    return re.sub(r"(/[^\s:]+)+", "<path>", message)


def _slug(finding: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", finding.lower()).strip("-")[:60] or "finding"


def _batches(items: list[Study], size: int) -> Iterator[list[Study]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _write_extras(out: Path, study: Study, answer: dict[str, Any], service: DiagnosisService, sr: bool) -> None:
    if "image_png" in answer:
        folder = out / "heatmaps" / study.study
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(folder / "image.png", base64.b64decode(answer["image_png"]))
        for pred in answer["predictions"]:
            atomic_write_bytes(folder / f"{_slug(pred['finding'])}.png", base64.b64decode(pred["heatmap_png"]))
    if sr:
        from medvlp.hospital.sr import algorithm_of, build_sr, read_source_headers
        from medvlp.hospital.stow import dicom_bytes

        sources = read_source_headers(study.path)
        if sources:
            report = build_sr(sources, answer["predictions"], algorithm_of(service.model, service.context.cohort))
            (out / "sr").mkdir(exist_ok=True)
            atomic_write_bytes(out / "sr" / f"{study.study}.dcm", dicom_bytes(report))
        else:
            answer.setdefault("warnings", []).append("no DICOM source: no SR written")


def predict(
    service: DiagnosisService,
    studies: list[Study],
    out: Path,
    *,
    sr: bool = False,
    heatmaps: bool = False,
    batch_size: int = 8,
    progress: bool | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> PredictSummary:
    """Score ``studies`` into ``out`` (see the module docstring); finished studies are skipped.

    Args:
        service: the loaded model (:func:`medvlp.serve.server.load_service`).
        studies: from :func:`find_studies`.
        out: the output folder.
        sr: write a DICOM SR per DICOM study.
        heatmaps: write the grounding heatmaps.
        batch_size: studies per forward pass.
        progress: show a progress bar (default: when stderr is a terminal).
        on_progress: ``on_progress(done, total)`` after each batch.

    Raises:
        ValueError: ``batch_size`` < 1, or two studies with the same pseudonym.
    """
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if len({s.study for s in studies}) != len(studies):
        raise ValueError("two studies have the same pseudonym (the same study listed twice?)")
    t0 = time.perf_counter()
    (out / "studies").mkdir(parents=True, exist_ok=True)
    done_dir = out / "studies"
    todo = [s for s in studies if not (done_dir / f"{s.study}.json").is_file()]
    reused = len(studies) - len(todo)
    quarantine: dict[str, str] = {}
    show = sys.stderr.isatty() if progress is None else progress
    bar = tqdm(total=len(studies), initial=reused, unit="study", desc="predict", disable=not show)
    work = Path(tempfile.mkdtemp(prefix="medvlp-predict-"))
    scored = 0
    try:
        for batch in _batches(todo, batch_size):
            jobs = [ImageJob(s.path, work, heatmaps=heatmaps, peaks=sr) for s in batch]
            for study, result in zip(batch, service.run_images(jobs), strict=True):
                if isinstance(result, BaseException):
                    reason = result.message if isinstance(result, ApiError) else type(result).__name__
                    quarantine[study.study] = _scrub(reason, study)
                    continue
                try:
                    _write_extras(out, study, result, service, sr)
                except (ValueError, OSError) as exc:
                    quarantine[study.study] = _scrub(f"SR or heatmaps could not be written: {exc}", study)
                    continue
                record = {
                    "study": study.study,
                    "predictions": [
                        {"finding": p["finding"], "probability": p["probability"]} for p in result["predictions"]
                    ],
                    "warnings": result.get("warnings", []),
                }
                atomic_write_json(done_dir / f"{study.study}.json", record)
                scored += 1
            bar.update(len(batch))
            if on_progress is not None:
                on_progress(reused + scored + len(quarantine), len(studies))
    finally:
        bar.close()
        shutil.rmtree(work, ignore_errors=True)
    _write_tables(out, [s.study for s in studies], quarantine)
    for study, reason in quarantine.items():
        logger.warning("quarantined %s: %s", study, reason)
    return PredictSummary(scored, reused, len(quarantine), time.perf_counter() - t0, out)


def _write_tables(out: Path, order: list[str], quarantine: dict[str, str]) -> None:
    rows = []
    for study in order:
        path = out / "studies" / f"{study}.json"
        if not path.is_file():
            continue
        rec = json.loads(path.read_text())
        rows += [(study, p["finding"], float(p["probability"])) for p in rec["predictions"]]
    df = pd.DataFrame(rows, columns=list(COLUMNS))
    df.to_parquet(out / PREDICTIONS, index=False)
    df.to_csv(out / "predictions.csv", index=False)
    q = pd.DataFrame(sorted(quarantine.items()), columns=["study", "reason"])
    q.to_csv(out / "quarantine.csv", index=False)


def read_predictions(out: Path) -> pd.DataFrame:
    """The ``study, finding, probability`` table of a prediction folder."""
    return pd.read_parquet(out / PREDICTIONS)
