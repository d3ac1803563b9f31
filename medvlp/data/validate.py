"""Per-record checks that need no decoding, shared by `medvlp cohort validate` and the build."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medvlp.data.cohort import Cohort, CohortSpec


def resolve_report(spec: CohortSpec, value: str) -> str:
    """The report column holds the text itself or the path of a ``.txt`` file (relative to the YAML).

    Raises:
        FileNotFoundError: when the column names a ``.txt`` file that does not exist.
    """
    value = value or ""
    stripped = value.strip()
    if stripped.lower().endswith(".txt") and "\n" not in stripped:
        path = spec.resolve(stripped)
        if not path.is_file():
            raise FileNotFoundError("report file not found")  # no file name: it may carry an identifier
        return path.read_text(errors="replace").strip()
    return stripped


PAIRED, IMAGE_ONLY, REPORT_ONLY = "paired", "image_only", "report_only"


@dataclass(frozen=True)
class RecordCheck:
    """What a manifest row holds before decoding: its report text, its image path, or why it is quarantined.

    Attributes:
        report: the report text, ``""`` when the row has none (an image-only study).
        image: the image path, ``None`` when the row has none (a report-only study).
        reason: why the row is quarantined, ``None`` when it is worth using.
    """

    report: str = ""
    image: Path | None = None
    reason: str | None = None

    @property
    def pairing(self) -> str:
        """``paired``, ``image_only`` or ``report_only`` (what stage 1 and stage 2 may use it for)."""
        if self.image is None:
            return REPORT_ONLY
        return PAIRED if self.report else IMAGE_ONLY


def precheck(spec: CohortSpec, row: Any) -> RecordCheck:
    """The report and image of a record worth using, or the reason to quarantine it.

    A row with an empty ``report`` is an image-only study, one with an empty ``image`` a report-only study: both
    are used for training only (stage 1), so they must be in the ``train`` split (a blank split means train). A row
    with neither is quarantined; so is a row whose named image or report file is missing (a broken link is an error,
    not an unpaired study).
    """
    try:
        report = resolve_report(spec, row.report)
    except OSError as exc:
        return RecordCheck(reason=str(exc))
    named = str(row.image or "").strip()
    image = spec.resolve(named) if named else None
    if not report and image is None:
        return RecordCheck(reason="empty report and no image")
    if image is not None and not image.exists():
        return RecordCheck(reason="image file not found")
    check = RecordCheck(report=report, image=image)
    if check.pairing != PAIRED and row.split != "train":
        what = "image-only" if image is not None else "report-only"
        return RecordCheck(
            reason=f"{what} study in split {row.split!r}: unpaired studies serve training only (set split to train)"
        )
    return check


def record_problems(cohort: Cohort) -> list[tuple[str, str]]:
    """``(study_id, reason)`` for every record a build would quarantine without even decoding it."""
    out = []
    for row in cohort.manifest.itertuples(index=False):
        reason = precheck(cohort.spec, row).reason
        if reason is not None:
            out.append((row.study_id, reason))
    return out


def pairing_counts(cohort: Cohort) -> dict[str, int]:
    """How many usable records are ``paired``, ``image_only`` and ``report_only`` (quarantined ones left out)."""
    counts = dict.fromkeys((PAIRED, IMAGE_ONLY, REPORT_ONLY), 0)
    for row in cohort.manifest.itertuples(index=False):
        check = precheck(cohort.spec, row)
        if check.reason is None:
            counts[check.pairing] += 1
    return counts


#: A box whose peak stands this many robust spreads (1.4826 x MAD) from its surroundings' median survives the grid.
VISIBLE_CONTRAST = 3.0


def peak_contrast(array: Any, box: Any, margin: int = 2) -> float:
    """How far a box's most extreme voxel stands from its surroundings, in robust spreads of those surroundings.

    Args:
        array: a preprocessed image ``[X, Y[, Z]]``.
        box: ``(corner, size)`` in voxels of ``array`` (as :func:`~medvlp.data.preprocess.map_boxes` gives); the
            voxels whose centres lie within half a voxel of it (where resampling spreads a lesion), one at least.
        margin: the surroundings are the voxels within ``margin`` voxels of the box, the box itself left out.

    Returns:
        ``max |box - median(ring)| / (1.4826 * MAD(ring))``, the MAD floored at 1e-3 of the range [0, 1] (a flat
        background); ``nan`` when the box lies outside the array. On the built-in CT at 6 x 6 x 8 mm a 4 mm stone
        (two thirds of a voxel) mostly stands 8 to 19 spreads out; at 16 x 16 x 20 mm, averaged into the kidney,
        under 3.
    """
    import numpy as np
    from scipy.stats import median_abs_deviation

    a = np.asarray(array, dtype=np.float32)
    dims = a.ndim
    corner, size = np.asarray(box[:dims], float), np.asarray(box[dims:], float)
    # the box's edges lie at corner - 0.5 and corner + size - 0.5 in voxel centres; the voxels whose centres lie within
    # half a voxel of it are the neighbours that resampling spreads a sub-voxel lesion into
    lo = np.clip(np.floor(corner).astype(int), 0, a.shape)
    hi = np.clip(np.maximum(np.ceil(corner + size).astype(int), lo + 1), 0, a.shape)
    if (hi <= lo).any():
        return float("nan")
    inner = tuple(slice(int(x), int(y)) for x, y in zip(lo, hi, strict=True))
    outer = tuple(slice(max(0, int(x) - margin), int(y) + margin) for x, y in zip(lo, hi, strict=True))
    ring_mask = np.ones(a[outer].shape, bool)
    ring_mask[tuple(slice(i.start - o.start, i.stop - o.start) for i, o in zip(inner, outer, strict=True))] = False
    ring = a[outer][ring_mask]
    if ring.size == 0:
        return float("nan")
    median = float(np.median(ring))
    spread = max(float(median_abs_deviation(ring, scale="normal")), 1e-3)
    return float(np.abs(a[inner] - median).max() / spread)


def lesion_warnings(cohort: Cohort, min_voxels: float = 1.0) -> list[str]:
    """A warning for every grounding box that the cohort's preprocessing shrinks below ``min_voxels`` on an axis.

    Each annotated study is decoded and preprocessed exactly as `cohort build` does (so orientation, spacing, crop
    and resize all count); studies that cannot be read are left to :func:`record_problems`. Each warning gives the
    box's :func:`peak_contrast` in the preprocessed image: under :data:`VISIBLE_CONTRAST` the lesion is erased;
    above it, it survives as a partial-volume dot (a calcification denser than its voxel), but its extent is lost.

    Returns:
        One line per shrunk box, naming the grounding CSV row, its study_id and category, the box's size before
        and after preprocessing, its contrast and the cohort's preprocessing.
    """
    import numpy as np

    from medvlp.data.image import ImageReadError
    from medvlp.data.preprocess import map_boxes, preprocess_image
    from medvlp.data.readers import read_image
    from medvlp.data.resolution import resolve_auto_preprocess

    if cohort.grounding.empty:
        return []
    try:
        pp = resolve_auto_preprocess(cohort)  # size: auto is checked as the build will resolve it
    except ValueError:  # no readable image: record_problems says why
        return []
    spec = cohort.spec
    name = spec.grounding_path.name if spec.grounding_path is not None else "grounding"
    box_cols = list(spec.box_columns)
    images = dict(zip(cohort.manifest["study_id"], cohort.manifest["image"], strict=True))
    where = f"spacing {list(pp.spacing) if pp.spacing else 'as stored'}, size {list(pp.size)}"
    out = []
    for sid, group in cohort.grounding.groupby("study_id", sort=False):
        if not str(images.get(sid, "")).strip():  # a report-only study: no image to shrink a box in
            continue
        try:
            image = read_image(spec.resolve(images[sid]))
            done = preprocess_image(image, pp)
        except (ImageReadError, ValueError, OSError, KeyError):
            continue
        dims = len(pp.size)
        mapped = map_boxes(group[box_cols].to_numpy(float), done.source_to_output, (np.inf,) * dims)  # not clipped
        for i, src, box in zip(group.index, group[box_cols].to_numpy(float), mapped, strict=True):
            after = box[dims:]
            if after.min() < min_voxels - 1e-6:
                before = "x".join(f"{v:g}" for v in src[dims:])
                mm = "x".join(f"{v * s:.3g}" for v, s in zip(src[dims:], image.spacing, strict=True))
                contrast = peak_contrast(done.array[0], box)
                if not np.isfinite(contrast):
                    fate = "the box lies outside the preprocessed image, so its lesion is lost"
                else:
                    fate = f"its peak stands {contrast:.1f} spreads from its surroundings: " + (
                        "it survives as a partial-volume dot, but its extent is lost"
                        if contrast >= VISIBLE_CONTRAST
                        else "the lesion is erased"
                    )
                out.append(
                    f"{name} row {i + 2} (study_id {sid}, {group.at[i, 'category_name']}): a box of {before} voxels "
                    f"({mm} mm) spans {'x'.join(f'{v:.2f}' for v in after)} voxels after preprocessing ({where}); "
                    f"under {min_voxels:g} voxel {fate}: use a finer spacing (see resolution_proposal in the cache's "
                    "summary.json)"
                )
    return out
