"""Per-record checks that need no decoding, shared by `medvlp cohort validate` and the build."""

from __future__ import annotations

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


def precheck(spec: CohortSpec, row: Any) -> tuple[str | None, str | None]:
    """``(report, None)`` for a record worth decoding, else ``(None, reason)`` to quarantine it."""
    try:
        report = resolve_report(spec, row.report)
    except OSError as exc:
        return None, str(exc)
    if not report:
        return None, "empty report"
    if not spec.resolve(row.image).exists():
        return None, "image file not found"
    return report, None


def record_problems(cohort: Cohort) -> list[tuple[str, str]]:
    """``(study_id, reason)`` for every record a build would quarantine without even decoding it."""
    out = []
    for row in cohort.manifest.itertuples(index=False):
        _, reason = precheck(cohort.spec, row)
        if reason is not None:
            out.append((row.study_id, reason))
    return out


def lesion_warnings(cohort: Cohort, min_voxels: float = 1.0) -> list[str]:
    """A warning for every grounding box that the cohort's preprocessing shrinks below ``min_voxels`` on an axis.

    Each annotated study is decoded and preprocessed exactly as `cohort build` does (so orientation, spacing, crop
    and resize all count); studies that cannot be read are left to :func:`record_problems`.

    Returns:
        One line per erased box, naming the grounding CSV row, its study_id and category, the box's size before
        and after preprocessing, and the cohort's preprocessing.
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
        try:
            image = read_image(spec.resolve(images[sid]))
            geometry = preprocess_image(image, pp).source_to_output
        except (ImageReadError, ValueError, OSError, KeyError):
            continue
        dims = len(pp.size)
        mapped = map_boxes(group[box_cols].to_numpy(float), geometry, (np.inf,) * dims)  # not clipped to the grid
        for i, src, box in zip(group.index, group[box_cols].to_numpy(float), mapped, strict=True):
            after = box[dims:]
            if after.min() < min_voxels - 1e-6:
                before = "x".join(f"{v:g}" for v in src[dims:])
                mm = "x".join(f"{v * s:.3g}" for v, s in zip(src[dims:], image.spacing, strict=True))
                out.append(
                    f"{name} row {i + 2} (study_id {sid}, {group.at[i, 'category_name']}): a box of {before} voxels "
                    f"({mm} mm) spans {'x'.join(f'{v:.2f}' for v in after)} voxels after preprocessing ({where}); "
                    f"under {min_voxels:g} voxel the lesion is erased: use a finer spacing (see resolution_proposal "
                    "in the cache's summary.json)"
                )
    return out
