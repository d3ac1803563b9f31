"""The preprocessed cohort cache: what `medvlp cohort build` writes and training reads.

Layout of a cache folder::

    summary.json        counts, preprocessing, timings
    quarantine.csv      row, study, reason: every record that could not be used, by manifest row and pseudonym
    records.parquet     one row per ingested study: pseudonyms, split, report, has_image, has_report, labels,
                        covariates, survival (an image-only study has report "", a report-only one no .npy)
    grounding.parquet   phrase boxes mapped onto the cached grid (voxel corner + size, floats)
    images/<study>.npy  float16 [1, *size] in [0, 1], read memory-mapped
    items/<study>.json  per-study fingerprint, the resume marker (written after its .npy)
    build.log           what each build did, records named by row and pseudonym only
    secret/             the pseudonym key and ids.csv (row, study, original study_id): stays inside the hospital

One ``.npy`` per study, rather than one big array, makes the build parallel and resumable (a study is
done once its item file exists) and lets a rerun replace only what changed; reading a memory-mapped
``.npy`` costs one ``open`` + ``mmap``, measured in ``benchmarks/bench_cohort.py``.
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

CACHE_VERSION = 1
HAS_IMAGE, HAS_REPORT = "has_image", "has_report"  # records.parquet columns: what an unpaired study holds
NEEDS = {"image": HAS_IMAGE, "report": HAS_REPORT}
PAIRED = ("image", "report")
COHORT_RECORD = "cohort.json"  # what a trained model folder keeps of its cohort (no study, no patient)
_RECORD_KEYS = ("cohort", "modality", "spatial_dims", "findings", "preprocess", "prompts")


def cohort_record(summary: dict[str, Any]) -> dict[str, Any]:
    """The part of a cache's ``summary.json`` a trained model needs to be used on new images (``cohort.json``).

    The preprocessing, the findings, the modality and dimensionality: enough for ``medvlp serve`` to treat a new
    study exactly as the training ones, from a copied model folder alone.
    """
    return {k: summary[k] for k in _RECORD_KEYS if k in summary}


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file beside ``path`` and rename it in place, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def atomic_save_npy(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.save(fh, np.ascontiguousarray(array))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_stale_temporaries(root: Path) -> int:
    """Delete half-written files a killed build left behind (``.name.XXXX.tmp``); returns how many."""
    n = 0
    for sub in ("images", "items", "."):
        for p in (root / sub).glob(".*.tmp"):
            p.unlink(missing_ok=True)
            n += 1
    return n


def _process_start(pid: int) -> str | None:
    """The start time of a live process (clock ticks since boot), or None when it is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return "?"
        return "?"  # no /proc: alive, start unknown
    fields = stat[stat.rindex(")") + 2 :].split()
    return None if fields[0] in ("Z", "X") else fields[19]


def _owner_alive(text: str) -> bool:
    """Whether the ``pid start`` written in a lock file names a process that still runs (pid reuse included)."""
    try:
        pid_s, start = text.split()
        pid = int(pid_s)
    except ValueError:
        return True  # written by an older version, or mid-write: assume a live owner
    now = _process_start(pid)
    return now is not None and (now == start or "?" in (now, start))


@contextmanager
def exclusive_build(root: Path) -> Iterator[None]:
    """Hold the cache's build lock: a second build on the same folder fails at once instead of colliding.

    The lock file records its owner (pid and start time). A lock still held after its owner died (by a worker
    the killed build left behind) is stale: the file is replaced, and the new build takes the new one.
    """
    root.mkdir(parents=True, exist_ok=True)
    path = root / ".build.lock"
    for _ in range(3):
        fh = open(path, "a+")  # noqa: SIM115 - held for the whole build
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            fh.seek(0)
            owner = fh.read()
            fh.close()
            if _owner_alive(owner):
                raise RuntimeError(f"another `medvlp cohort build` is writing {root}; wait for it to finish") from exc
            path.unlink(missing_ok=True)  # the owner died (kill -9): whoever still holds the old file is an orphan
            continue
        try:
            same = os.fstat(fh.fileno()).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # another build replaced a stale lock between our open and flock
            fh.close()
            continue
        pid = os.getpid()
        fh.seek(0)
        fh.truncate()
        fh.write(f"{pid} {_process_start(pid)}")
        fh.flush()
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
            fh.close()
        return
    raise RuntimeError(f"cannot take the build lock of {root}: it keeps changing hands")


@dataclass
class CachedCohort:
    """Read side of a built cache.

    Attributes:
        root: the cache folder.
        summary: the content of ``summary.json``.
        records: one row per ingested study (column ``study`` is the pseudonym), paired or not: columns
            ``has_image`` and ``has_report`` say which; :meth:`split` selects by them.
        grounding: phrase boxes on the cached grid (``study, category_name, label_text, x, y[, z], w, h[, d]``).
    """

    root: Path
    summary: dict[str, Any]
    records: pd.DataFrame
    grounding: pd.DataFrame

    @classmethod
    def open(cls, root: str | Path) -> CachedCohort:
        root = Path(root)
        summary_path = root / "summary.json"
        if not summary_path.is_file():
            raise FileNotFoundError(f"{root} is not a built cohort cache (no summary.json): run `medvlp cohort build`")
        summary = json.loads(summary_path.read_text())
        if summary.get("cache_version") != CACHE_VERSION:
            raise ValueError(f"{root}: cache version {summary.get('cache_version')} != {CACHE_VERSION}; rebuild it")
        records = pd.read_parquet(root / "records.parquet")
        for col in (HAS_IMAGE, HAS_REPORT):  # a cache built before unpaired studies holds pairs only
            if col not in records.columns:
                records[col] = True
        return cls(root=root, summary=summary, records=records, grounding=pd.read_parquet(root / "grounding.parquet"))

    @property
    def findings(self) -> list[str]:
        return list(self.summary["findings"])

    @property
    def spatial_dims(self) -> int:
        return int(self.summary["spatial_dims"])

    def split(self, name: str, need: tuple[str, ...] | list[str] = PAIRED) -> pd.DataFrame:
        """Records of one split (train, val or test) that hold everything in ``need``, index reset.

        Args:
            name: the split.
            need: what each study must have: ``("image", "report")`` (the default: the pairs that stage 2 and every
                evaluation use), ``("image",)`` (every image, for stage1-image) or ``("report",)`` (every report,
                for stage1-text). Unpaired studies are only ever in ``train``.

        Raises:
            ValueError: for anything in ``need`` other than ``image`` and ``report``.
        """
        unknown = [n for n in need if n not in NEEDS]
        if unknown or isinstance(need, str):
            raise ValueError(f"need must list 'image' and/or 'report', got {need!r}")
        keep = self.records["split"] == name
        for n in need:
            keep &= self.records[NEEDS[n]].astype(bool)
        return self.records[keep].reset_index(drop=True)

    def image_path(self, study: str) -> Path:
        return self.root / "images" / f"{study}.npy"

    def affine(self, study: str) -> np.ndarray:
        """``[4, 4]`` voxel -> RAS+ mm affine of one study's cached array (from its item file)."""
        item = json.loads((self.root / "items" / f"{study}.json").read_text())
        return np.asarray(item["affine"], dtype=np.float64)

    def load_image(self, study: str, mmap: bool = True) -> np.ndarray:
        """The cached float16 array ``[1, *size]`` of one study (memory-mapped by default)."""
        return np.load(self.image_path(study), mmap_mode="r" if mmap else None)
