"""`medvlp cohort build`: every record of a cohort -> preprocessed, pseudonymized cache.

One bad record never stops the build: it goes to ``quarantine.csv`` with its reason. Work is spread
over processes; each finished study is written atomically, so a killed build continues where it
stopped and a rerun redoes only the records whose file, report boxes or preprocessing changed (and
every quarantined one, so fixing a file is enough to bring it in).
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import multiprocessing as mp
import os
import re
import signal
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from medvlp.data.cache import (
    CACHE_VERSION,
    HAS_IMAGE,
    HAS_REPORT,
    atomic_save_npy,
    atomic_write_bytes,
    atomic_write_json,
    exclusive_build,
    remove_stale_temporaries,
)
from medvlp.data.cohort import Cohort, PreprocessSpec, load_cohort
from medvlp.data.image import ImageReadError
from medvlp.data.preprocess import body_shape, map_boxes, preprocess_image
from medvlp.data.privacy import load_or_create_key, pseudonym
from medvlp.data.readers import read_image
from medvlp.data.resolution import output_axes, proposal_from_items, resolve_auto_preprocess
from medvlp.data.validate import precheck

logger = logging.getLogger(__name__)

# Technical facts about the source image that may be kept; everything else from a header is dropped.
_SAFE_META = ("modality", "photometric_interpretation", "transfer_syntax", "n_files", "inverted", "color_converted")


@dataclass(frozen=True)
class BuildSummary:
    """What a build did. ``reused`` counts studies taken unchanged from an earlier (or interrupted) build."""

    out: Path
    ingested: int
    quarantined: int
    reused: int
    seconds: float


@dataclass(frozen=True)
class _Task:
    study: str
    row: int
    image: Path
    boxes: np.ndarray  # [N, 2D] in stored-image voxels
    preprocess: PreprocessSpec
    fingerprint: str
    out: Path


def _file_state(path: Path) -> list[Any]:
    """Size and modification time of a file, or of every file of a folder (a DICOM series)."""
    if path.is_dir():
        return sorted([p.name, *_file_state(p)] for p in path.iterdir() if p.is_file())
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def _fingerprint(spec: PreprocessSpec, image: Path, boxes: np.ndarray) -> str:
    state = {
        "cache_version": CACHE_VERSION,
        "preprocess": spec.model_dump(mode="json"),
        "image": str(image.resolve()),
        "file": _file_state(image),
        "boxes": np.round(boxes, 6).tolist(),
    }
    return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()


IDS_FILE = Path("secret") / "ids.csv"  # row, study pseudonym, original study_id: stays inside the hospital


def manifest_row(index: int) -> int:
    """The line of the manifest CSV holding record ``index`` (the header is line 1), as `cohort validate` says."""
    return int(index) + 2


def scrub_reason(message: str, image: Path) -> str:
    """A reason without the image's path or file names (which may carry a UID or a patient's name).

    The image (file or series folder), and any file inside a series folder, becomes ``image``.
    """
    for base in dict.fromkeys((str(image), str(image.resolve()) if image.exists() else str(image))):
        message = re.sub(re.escape(base) + r"(/[^\s:]*)?", "image", message)
    name = image.name
    if len(name) >= 3:
        message = message.replace(name, "image")
    return message


def _die_with_parent(parent: int) -> None:
    """Ask Linux to kill this worker when the build process dies (kill -9 included), so no orphan holds the lock."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):  # pragma: no cover - no prctl: the stale-lock check still holds
            logger.debug("prctl(PR_SET_PDEATHSIG) unavailable")
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)


def _init_worker(parent: int) -> None:
    _die_with_parent(parent)
    import torch

    torch.set_num_threads(1)


def _process(task: _Task) -> dict[str, Any]:
    """Decode, preprocess and write one study. Runs in a worker process; never raises."""
    try:
        if not task.image.exists():
            return {"study": task.study, "error": "image file not found"}
        image = read_image(task.image)
        out = preprocess_image(image, task.preprocess)
        if not np.isfinite(out.array).all():
            return {"study": task.study, "error": "image has no finite pixel values after preprocessing"}
        boxes = map_boxes(task.boxes, out.source_to_output, task.preprocess.size) if len(task.boxes) else task.boxes
    except (ImageReadError, ValueError, OSError) as exc:
        return {"study": task.study, "error": scrub_reason(str(exc), task.image)}
    except Exception as exc:
        reason = scrub_reason(f"could not decode or preprocess: {type(exc).__name__}: {exc}", task.image)
        return {"study": task.study, "error": reason}
    item = {
        "study": task.study,
        "fingerprint": task.fingerprint,
        "shape": list(out.array.shape),
        "source_shape": list(image.array.shape),
        "source_spacing": [float(s) for s in image.spacing],
        "source_axes": list(output_axes(image.affine, task.preprocess.orientation, len(image.spacing))),
        **({"body_shape": list(body_shape(image.array))} if task.preprocess.crop_foreground else {}),
        "source": {k: image.meta[k] for k in _SAFE_META if k in image.meta},
        "affine": out.affine.tolist(),
        "boxes": np.asarray(boxes, dtype=float).tolist(),
    }
    atomic_save_npy(task.out / "images" / f"{task.study}.npy", out.array)
    atomic_write_json(task.out / "items" / f"{task.study}.json", item)
    return item


def _read_item(out: Path, study: str, fingerprint: str) -> dict[str, Any] | None:
    path = out / "items" / f"{study}.json"
    if not path.is_file() or not (out / "images" / f"{study}.npy").is_file():
        return None
    try:
        item = json.loads(path.read_text())
    except (json.JSONDecodeError, OSError):
        return None
    return item if item.get("fingerprint") == fingerprint else None


def _setup_log(out: Path) -> logging.Handler:
    handler = logging.FileHandler(out / "build.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    return handler


def build_cohort(
    cohort: str | Path | Cohort,
    out: str | Path,
    workers: int | None = None,
    progress: bool | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> BuildSummary:
    """Build (or bring up to date) the cache of a cohort.

    Args:
        cohort: the cohort YAML, or an already loaded :class:`Cohort`.
        out: the cache folder; created if needed.
        workers: processes to decode with; default ``min(cpu_count, 8)``, 0 decodes in this process.
        progress: show a progress bar; default when stderr is a terminal (never when nothing is left to do).
        on_progress: ``on_progress(done, total)`` after each processed study (and once before the first); when
            given, no progress bar is drawn (the caller shows its own display).

    Raises:
        CohortError: when the cohort definition itself is wrong (nothing is built then).
    """
    t0 = time.perf_counter()
    cohort = cohort if isinstance(cohort, Cohort) else load_cohort(cohort)
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "items").mkdir(parents=True, exist_ok=True)
    with exclusive_build(out):
        remove_stale_temporaries(out)
        return _build_locked(cohort, out, workers, progress, t0, on_progress)


def _build_locked(
    cohort: Cohort,
    out: Path,
    workers: int | None,
    progress: bool | None,
    t0: float,
    on_progress: Callable[[int, int], None] | None = None,
) -> BuildSummary:
    spec, df = cohort.spec, cohort.manifest
    handler = _setup_log(out)
    try:
        key = load_or_create_key(out)
        pp = resolve_auto_preprocess(cohort)  # size: auto -> measured from the cohort; otherwise the YAML's
        box_cols = list(spec.box_columns)
        by_study = {s: g[box_cols].to_numpy(float) for s, g in cohort.grounding.groupby("study_id")}
        empty = np.zeros((0, len(box_cols)))

        quarantine: list[tuple[int, str, str]] = []  # (manifest row, study pseudonym, reason without identifiers)
        items: dict[str, dict[str, Any]] = {}
        reports: dict[str, str] = {}  # "" for an image-only study
        report_only: set[str] = set()  # studies with a report and no image: nothing to decode
        tasks: list[_Task] = []
        study_of: dict[str, str] = {}
        row_of: dict[str, int] = {}
        for index, row in zip(df.index, df.itertuples(index=False), strict=True):
            sid = row.study_id
            st = pseudonym(key, "st", sid)
            study_of[st], row_of[st] = sid, manifest_row(index)
            check = precheck(spec, row)
            if check.reason is not None:
                quarantine.append((row_of[st], st, check.reason))
                continue
            reports[st] = check.report
            if check.image is None:
                report_only.add(st)
                continue
            image = check.image
            boxes = by_study.get(sid, empty)
            fp = _fingerprint(pp, image, boxes)
            done = _read_item(out, st, fp)
            if done is not None:
                items[st] = done | {"reused": True}
            else:
                tasks.append(_Task(st, row_of[st], image, boxes, pp, fp, out))
        reused = len(items)
        logger.info("build %s: %d records, %d reused, %d to process", spec.name, len(df), reused, len(tasks))

        show = (sys.stderr.isatty() if progress is None else progress) and bool(tasks) and on_progress is None
        bar = tqdm(total=len(tasks), desc=f"cohort {spec.name}", unit="study", disable=not show)
        n_workers = min(os.cpu_count() or 1, 8) if workers is None else workers
        if on_progress is not None:
            on_progress(0, len(tasks))
        results = _run(tasks, n_workers, bar, on_progress)
        bar.close()
        for res in results:
            if "error" in res:
                quarantine.append((row_of[res["study"]], res["study"], res["error"]))
            else:
                items[res["study"]] = res
        for st in study_of:
            if st not in items:  # a quarantined study must not leave a stale image behind
                (out / "items" / f"{st}.json").unlink(missing_ok=True)
                (out / "images" / f"{st}.npy").unlink(missing_ok=True)
        quarantine.sort()
        for row_no, st, reason in quarantine:
            logger.warning("quarantined row %d (%s): %s", row_no, st, reason)

        _write_tables(out, cohort, key, items, reports, report_only)
        ingested = set(items) | report_only
        image_only = sum(1 for st in items if not reports[st])
        qdf = pd.DataFrame(quarantine, columns=["row", "study", "reason"])
        atomic_write_bytes(out / "quarantine.csv", qdf.to_csv(index=False).encode())
        _write_ids(out, [(row_of[st], st, sid) for st, sid in study_of.items()])
        seconds = time.perf_counter() - t0
        summary = {
            "cache_version": CACHE_VERSION,
            "cohort": spec.name,
            "modality": spec.modality,
            "spatial_dims": spec.spatial_dims,
            "findings": spec.findings,
            "covariates": spec.covariates,
            "survival": spec.survival is not None,
            "survival_columns": spec.survival.model_dump() if spec.survival else None,
            "preprocess": pp.model_dump(mode="json"),
            "prompts": spec.prompts.model_dump(mode="json") if spec.prompts else None,
            "records": len(df),
            "ingested": len(ingested),
            "paired": len(ingested) - image_only - len(report_only),
            "image_only": image_only,
            "report_only": len(report_only),
            "quarantined": len(quarantine),
            "reused": reused,
            "processed": len(tasks),
            "splits": {
                s: int(n)
                for s, n in df[df["study_id"].isin(set(study_of[s] for s in ingested))]["split"].value_counts().items()
            },
            "seconds": round(seconds, 3),
            "resolution_proposal": _proposal(cohort, study_of, items),
        }
        atomic_write_json(out / "summary.json", summary)
        logger.info(
            "built %s: %d ingested (%d image-only, %d report-only), %d quarantined in %.1f s",
            spec.name,
            len(ingested),
            image_only,
            len(report_only),
            len(quarantine),
            seconds,
        )
        return BuildSummary(out, len(ingested), len(quarantine), reused, seconds)
    finally:
        logger.removeHandler(handler)
        handler.close()


def _proposal(cohort: Cohort, study_of: dict[str, str], items: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """The resolution the cohort's own spacings, extents and smallest boxes call for (see medvlp.data.resolution)."""
    box_cols = list(cohort.spec.box_columns)
    by_study = {s: g[box_cols].to_numpy(float) for s, g in cohort.grounding.groupby("study_id")}
    chosen = [st for st in sorted(items) if "source_shape" in items[st] and "source_spacing" in items[st]]
    boxes = [by_study.get(study_of[st], np.zeros((0, len(box_cols)))) for st in chosen]
    try:
        asked = cohort.spec.preprocessing  # the YAML's voxel_budget and min_lesion_voxels (defaults without auto)
        proposal = proposal_from_items(
            [items[st] for st in chosen], boxes, budget=asked.voxel_budget, min_voxels=asked.min_lesion_voxels
        )
    except (ValueError, IndexError, KeyError, TypeError) as exc:  # an advisory key never costs the build
        logger.warning("no resolution proposal: %s", exc)
        return None
    if proposal is not None:
        logger.info("resolution proposal: spacing %s mm, size %s", proposal.spacing, proposal.size)
    return None if proposal is None else proposal.to_dict()


def _run(
    tasks: list[_Task], workers: int, bar: tqdm, on_progress: Callable[[int, int], None] | None = None
) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []

    def done() -> None:
        bar.update()
        if on_progress is not None:
            on_progress(len(results), len(tasks))

    if workers <= 1 or len(tasks) <= 1:
        for t in tasks:
            results.append(_process(t))
            done()
        return results
    ctx = mp.get_context("fork" if sys.platform == "linux" else "spawn")
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker, initargs=(os.getpid(),))
    with pool:
        futures = {pool.submit(_process, t): t for t in tasks}
        for fut in as_completed(futures):
            try:
                results.append(fut.result())
            except Exception as exc:
                results.append({"study": futures[fut].study, "error": f"worker failed: {type(exc).__name__}: {exc}"})
            done()
    return results


def _write_ids(out: Path, rows: list[tuple[int, str, str]]) -> None:
    """``secret/ids.csv``: manifest row, study pseudonym and original study_id, readable by the owner only."""
    data = pd.DataFrame(sorted(rows), columns=["row", "study", "study_id"]).to_csv(index=False).encode()
    path = out / IDS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def _write_tables(
    out: Path,
    cohort: Cohort,
    key: bytes,
    items: dict[str, dict[str, Any]],
    reports: dict[str, str],
    report_only: set[str],
) -> None:
    """records.parquet and grounding.parquet, keyed by pseudonyms only (``has_image`` / ``has_report`` per study)."""
    spec, df = cohort.spec, cohort.manifest
    keep = [*spec.findings, *spec.covariates]
    if spec.survival:
        keep += [spec.survival.time, spec.survival.event]
    studies = df["study_id"].map(lambda s: pseudonym(key, "st", s))
    ok = studies.isin(items.keys() | report_only).to_numpy()
    records = pd.DataFrame(
        {
            "study": studies[ok].to_numpy(),
            "subject": df.loc[ok, "subject_id"].map(lambda s: pseudonym(key, "sb", s)).to_numpy(),
            "split": df.loc[ok, "split"].to_numpy(),
            "report": [reports[s] for s in studies[ok]],
            HAS_IMAGE: [s in items for s in studies[ok]],
            HAS_REPORT: [bool(reports[s]) for s in studies[ok]],
        }
    )
    for c in keep:
        records[c] = df.loc[ok, c].to_numpy()
    atomic_write_bytes(out / "records.parquet", records.to_parquet(index=False))

    box_cols = list(spec.box_columns)
    rows = []
    for sid, g in cohort.grounding.groupby("study_id", sort=False):
        item = items.get(pseudonym(key, "st", sid))
        if item is None:
            continue
        for (cat, text), box in zip(
            g[["category_name", "label_text"]].itertuples(index=False), item["boxes"], strict=True
        ):
            rows.append([item["study"], cat, text, *box])
    gdf = pd.DataFrame(rows, columns=["study", "category_name", "label_text", *box_cols])
    atomic_write_bytes(out / "grounding.parquet", gdf.to_parquet(index=False))
