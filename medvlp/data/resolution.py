"""Preprocessing resolution from the cohort itself: a target spacing and size that keep lesions visible.

:func:`propose_resolution` is a pure function of the cohort's source spacings and extents and of its annotated
boxes (in mm): it proposes the coarsest spacing that keeps the smallest annotated box at least ``min_voxels``
across on every axis (never finer than the source), and the size that holds the cohort's field of view (with
``crop_foreground``, its bodies': the air is cropped before resampling) at that spacing; when that exceeds the voxel
budget, the spacing is coarsened uniformly until it fits, and the proposal says that the smallest box then falls below
``min_voxels`` (``fits: False``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_BUDGET", "ResolutionProposal", "output_axes", "propose_resolution", "resolve_auto_preprocess"]

DEFAULT_BUDGET = {2: 128 * 128, 3: 64 * 64 * 32}  # voxels per image, as today's CPU defaults
_WORLD_AXIS = {"R": 0, "L": 0, "A": 1, "P": 1, "S": 2, "I": 2}


@dataclass(frozen=True)
class ResolutionProposal:
    """A proposed preprocessing resolution (output axis order), with what limited it.

    Attributes:
        spacing: target spacing in mm per output axis.
        size: target size in voxels per output axis (a multiple of ``multiple``).
        voxels: ``prod(size)``, at most ``budget``.
        budget: the voxel budget it was made for.
        min_voxels: the number of voxels the smallest box should span on every axis.
        source_spacing: the cohort's median source spacing (mm).
        extent_mm: the field of view kept (the ``extent_quantile`` of the studies' extents, mm).
        smallest_box_mm: per axis, the smallest annotated box extent (mm); None without boxes.
        smallest_box_voxels: the smallest box's smallest extent at ``spacing`` (voxels); None without boxes.
        limited_by: ``"lesion"`` (the box sets the spacing), ``"source"`` (the source is already coarser than the box
            needs, or no boxes), or ``"budget"`` (coarsened to fit the budget).
        fits: whether the smallest box spans at least ``min_voxels`` (True without boxes).
    """

    spacing: tuple[float, ...]
    size: tuple[int, ...]
    voxels: int
    budget: int
    min_voxels: float
    source_spacing: tuple[float, ...]
    extent_mm: tuple[float, ...]
    smallest_box_mm: tuple[float, ...] | None
    smallest_box_voxels: float | None
    limited_by: str
    fits: bool

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (lists, rounded to 4 decimals)."""
        out = asdict(self)
        for key, value in out.items():
            if isinstance(value, tuple):
                out[key] = [round(float(v), 4) if isinstance(v, float) else v for v in value]
            elif isinstance(value, float):
                out[key] = round(value, 4)
        return out


def _sizes(extent: np.ndarray, spacing: np.ndarray, multiple: int) -> np.ndarray:
    """Voxels to hold ``extent`` at ``spacing``, rounded up to ``multiple`` (the 1e-9 absorbs float noise)."""
    return np.maximum(np.ceil(extent / (spacing * multiple) - 1e-9), 1).astype(int) * multiple


def propose_resolution(
    source_spacing: np.ndarray | Sequence[Sequence[float]],
    source_shape: np.ndarray | Sequence[Sequence[int]],
    boxes_mm: np.ndarray | Sequence[Sequence[float]] | None = None,
    *,
    budget: int | None = None,
    min_voxels: float = 3.0,
    multiple: int = 8,
    extent_quantile: float = 0.9,
) -> ResolutionProposal:
    """Propose a target spacing and size for a cohort.

    Args:
        source_spacing: ``[N, D]`` source voxel spacing (mm) of each study, in the output's axis order.
        source_shape: ``[N, D]`` source shape (voxels) of each study, same order.
        boxes_mm: ``[M, D]`` extents (mm) of every annotated box, same order; None or empty when there are none.
        budget: the most voxels per image; default 64*64*32 in 3D, 128*128 in 2D.
        min_voxels: voxels the smallest box should span on every axis.
        multiple: every size is rounded up to a multiple of this (token grids of strided encoders).
        extent_quantile: the field of view holds this quantile of the studies' extents (1.0: the largest).

    Raises:
        ValueError: on empty or mismatched inputs, non-positive spacings or shapes, or a bad option.
    """
    spacing = np.asarray(source_spacing, dtype=np.float64)
    shape = np.asarray(source_shape, dtype=np.float64)
    if spacing.ndim != 2 or spacing.shape[0] == 0 or spacing.shape != shape.shape or spacing.shape[1] not in (2, 3):
        raise ValueError(
            f"source_spacing {spacing.shape} and source_shape {shape.shape} must both be [N, 2 or 3] with N >= 1"
        )
    if (spacing <= 0).any() or (shape <= 0).any() or not np.isfinite(spacing).all():
        raise ValueError("source spacings and shapes must be positive")
    dims = spacing.shape[1]
    budget = DEFAULT_BUDGET[dims] if budget is None else int(budget)
    if budget < multiple**dims:
        raise ValueError(f"budget {budget} is below the smallest image ({multiple}^{dims} voxels)")
    if min_voxels <= 0:
        raise ValueError(f"min_voxels must be positive, got {min_voxels}")
    if multiple < 1:
        raise ValueError(f"multiple must be at least 1, got {multiple}")
    if not 0 < extent_quantile <= 1:
        raise ValueError(f"extent_quantile must be in (0, 1], got {extent_quantile}")

    src = np.median(spacing, axis=0)
    extent = np.quantile(shape * spacing, extent_quantile, axis=0)
    boxes = np.zeros((0, dims)) if boxes_mm is None else np.asarray(boxes_mm, dtype=np.float64).reshape(-1, dims)
    boxes = boxes[np.isfinite(boxes).all(axis=1) & (boxes > 0).all(axis=1)]
    smallest = boxes.min(axis=0) if len(boxes) else None
    target = src if smallest is None else np.maximum(src, smallest / min_voxels)
    limited_by = "source" if smallest is None or (target <= src).all() else "lesion"

    if np.prod(_sizes(extent, target, multiple)) > budget:
        # the smallest uniform coarsening that fits: sizes only change where extent / (target * f) = k * multiple
        steps = [
            extent[a] / (target[a] * k * multiple)
            for a in range(dims)
            for k in range(1, math.ceil(extent[a] / (target[a] * multiple)) + 1)
        ]
        f = min(f for f in steps if f >= 1 and np.prod(_sizes(extent, target * f, multiple)) <= budget)
        target, limited_by = target * f, "budget"
    size = _sizes(extent, target, multiple)
    box_voxels = None if smallest is None else float((smallest / target).min())
    return ResolutionProposal(
        spacing=tuple(float(s) for s in target),
        size=tuple(int(s) for s in size),
        voxels=int(np.prod(size)),
        budget=budget,
        min_voxels=float(min_voxels),
        source_spacing=tuple(float(s) for s in src),
        extent_mm=tuple(float(e) for e in extent),
        smallest_box_mm=None if smallest is None else tuple(float(s) for s in smallest),
        smallest_box_voxels=box_voxels,
        limited_by=limited_by,
        fits=box_voxels is None or box_voxels >= min_voxels - 1e-9,
    )


def output_axes(affine: np.ndarray, orientation: str | None, dims: int = 3) -> tuple[int, ...]:
    """For each output axis, the stored-image axis it comes from (preprocessing reorients to ``orientation``).

    Args:
        affine: the stored image's voxel -> RAS mm affine (4 x 4).
        orientation: the preprocessing's axis codes (e.g. ``"RAS"``), or None (axes kept as stored).
        dims: the image's spatial dims (2D images keep their axes).
    """
    affine = np.asarray(affine, dtype=np.float64)
    if orientation is None or dims != 3:
        return tuple(range(dims))
    linear = np.abs(affine[:3, :3])
    return tuple(int(np.argmax(linear[_WORLD_AXIS[c]])) for c in orientation.upper())


def proposal_from_items(
    items: Sequence[dict[str, Any]], source_boxes: Sequence[np.ndarray], **options: Any
) -> ResolutionProposal | None:
    """:func:`propose_resolution` from a cache's item records and the studies' boxes in stored-image voxels.

    Args:
        items: item records (``source_shape``, ``source_spacing`` and, when known, ``source_axes``; with
            ``body_shape``, the body's crop (``crop_foreground``), the field of view is the body's, not the scan's).
        source_boxes: for each item, its ``[N, 2 * D]`` boxes ``(corner, size)`` in stored-image voxels.
        **options: passed to :func:`propose_resolution`.

    Returns:
        The proposal, or None without items.
    """
    if not items:
        return None
    spacings, shapes, extents = [], [], []
    for item, boxes in zip(items, source_boxes, strict=True):
        spacing = np.asarray(item["source_spacing"], dtype=np.float64)
        axes = list(item.get("source_axes") or range(len(spacing)))
        spacings.append(spacing[axes])
        shapes.append(np.asarray(item.get("body_shape") or item["source_shape"], dtype=np.float64)[axes])
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 2 * len(spacing))
        extents.append((boxes[:, len(spacing) :] * spacing)[:, axes])
    return propose_resolution(spacings, shapes, np.concatenate(extents), **options)


def resolve_auto_preprocess(cohort: Any) -> Any:
    """The concrete :class:`~medvlp.data.cohort.PreprocessSpec` for a cohort whose YAML says ``size: auto``.

    Every study's geometry is read (decoded once more than the build itself needs; unreadable studies are left to
    the build's quarantine) and :func:`propose_resolution` chooses spacing and size, with ``crop_or_pad``; the
    YAML's orientation and intensity are kept. A cohort without ``size: auto`` is returned unchanged.

    Args:
        cohort: a loaded :class:`~medvlp.data.cohort.Cohort`.

    Raises:
        CohortError: when no study of the cohort can be read.
    """
    from medvlp.data.cohort import CohortError
    from medvlp.data.image import ImageReadError
    from medvlp.data.preprocess import body_shape
    from medvlp.data.readers import read_image

    spec, pp = cohort.spec, cohort.spec.preprocessing
    if not pp.auto:
        return pp
    box_cols = list(spec.box_columns)
    by_study = {s: g[box_cols].to_numpy(float) for s, g in cohort.grounding.groupby("study_id")}
    items, boxes = [], []
    for sid, image_path in zip(cohort.manifest["study_id"], cohort.manifest["image"], strict=True):
        try:
            image = read_image(spec.resolve(image_path))
        except (ImageReadError, ValueError, OSError):
            continue
        if image.spatial_dims != spec.spatial_dims:
            continue
        axes = output_axes(image.affine, pp.orientation, image.spatial_dims)
        item = {"source_shape": list(image.array.shape), "source_spacing": image.spacing, "source_axes": axes}
        if pp.crop_foreground:  # the air around the body is cropped before resampling: it costs no voxels
            item["body_shape"] = list(body_shape(image.array))
        items.append(item)
        boxes.append(by_study.get(sid, np.zeros((0, len(box_cols)))))
    proposal = proposal_from_items(items, boxes, budget=pp.voxel_budget, min_voxels=pp.min_lesion_voxels)
    if proposal is None:
        raise CohortError(spec.name, ["preprocess size: auto needs at least one readable image to measure"])
    logger.info("size: auto -> spacing %s mm, size %s (%s)", proposal.spacing, proposal.size, proposal.limited_by)
    fields = pp.model_dump(exclude={"size", "spacing", "fit", "voxel_budget", "min_lesion_voxels"})
    return type(pp).model_validate(
        {**fields, "size": proposal.size, "spacing": [round(s, 4) for s in proposal.spacing], "fit": "crop_or_pad"}
    )
