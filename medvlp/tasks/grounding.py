"""Phrase grounding: patch-phrase similarity maps and their agreement with annotated boxes (2D and 3D).

Coordinates follow the cache (:mod:`medvlp.data.cache`): arrays are ``(X, Y[, Z])`` after the channel, and a box
``(x, y[, z], w, h[, d])`` is a voxel corner and size in floats, where voxel ``i`` spans ``[i, i + 1)`` (a box
starting at 3 with width 2 covers voxels 3 and 4).

Metrics follow BioViL / MS-CXR (Boecking et al., "Making the Most of Text Semantics to Improve Biomedical
Vision-Language Processing", ECCV 2022): the contrast-to-noise ratio of the similarity map between the box
interior and exterior, the IoU of the min-max thresholded map with the box, and the mIoU of the raw cosine map
thresholded at fixed values (0.1 to 0.5) and averaged, as MS-CXR grounding results are usually reported.

One score per (study, phrase): a phrase annotated with several boxes (a bilateral effusion) is scored against the
union of its boxes, so the other side's box never counts as "outside". :func:`grounding_pairs`,
:func:`grounding_scores` and :func:`grounding_summary` are the task: the card, the notebooks and the benchmarks call
them, nothing else computes a grounding number.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "MIOU_THRESHOLDS",
    "box_mask",
    "boxes_from_frame",
    "cnr",
    "control_studies",
    "grounding_examples",
    "grounding_metrics",
    "grounding_pairs",
    "grounding_scores",
    "grounding_summary",
    "iou",
    "miou",
    "similarity_map",
    "similarity_maps",
]

MIOU_THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5)  # on the raw cosine similarity map

_MODES = {1: "linear", 2: "bilinear", 3: "trilinear"}


@torch.no_grad()
def similarity_map(
    patch_tokens: Tensor,
    grid: Sequence[int],
    phrase_emb: Tensor,
    image_size: Sequence[int],
) -> Tensor:
    """Cosine similarity of each patch token with a phrase, upsampled to the image.

    Args:
        patch_tokens: ``[N, E]`` or ``[B, N, E]``, flattened row-major over ``grid``.
        grid: the token grid ``(X', Y'[, Z'])``, ``prod(grid) == N``.
        phrase_emb: ``[E]`` or ``[B, E]`` (one phrase per image).
        image_size: ``(X, Y[, Z])``.

    Returns:
        ``[*image_size]`` for unbatched input, else ``[B, *image_size]``; float32 cosine similarities,
        (bi/tri)linearly interpolated with ``align_corners=False``.
    """
    grid, image_size = tuple(int(g) for g in grid), tuple(int(s) for s in image_size)
    if len(grid) != len(image_size) or len(grid) not in _MODES:
        raise ValueError(f"grid {grid} and image_size {image_size} must have the same 1-3 dimensions")
    single = patch_tokens.ndim == 2
    tokens = patch_tokens[None] if single else patch_tokens  # [B, N, E]
    phrase = phrase_emb.reshape(-1, phrase_emb.shape[-1]).to(tokens.device)  # [B or 1, E]
    if tokens.shape[1] != int(np.prod(grid)):
        raise ValueError(f"{tokens.shape[1]} tokens do not fill the grid {grid}")
    tokens = F.normalize(tokens.float(), dim=-1)
    phrase = F.normalize(phrase.float(), dim=-1)
    sim = torch.einsum("bne,be->bn", tokens, phrase.expand(tokens.shape[0], -1))  # [B, N]
    sim = sim.reshape(sim.shape[0], 1, *grid)  # [B, 1, *grid]
    out = F.interpolate(sim, size=image_size, mode=_MODES[len(grid)], align_corners=False)[:, 0]  # [B, *size]
    return out[0] if single else out


def _boxes(box: Any) -> np.ndarray:
    """One box or a list of boxes -> ``[K, 2D]`` floats."""
    arr = np.asarray(box, dtype=np.float64)
    return arr.reshape(1, -1) if arr.ndim == 1 else arr.reshape(len(arr), -1)


def box_mask(box: Sequence[float] | Sequence[Sequence[float]], image_size: Sequence[int]) -> np.ndarray:
    """Voxels whose centre lies inside the box (or any of several boxes).

    Args:
        box: ``(x, y[, z], w, h[, d])`` voxel corner + size, or a list of such boxes (union).
        image_size: ``(X, Y[, Z])``.

    Returns:
        bool ``[*image_size]``; voxel ``i`` (centre ``i + 0.5``) is inside when ``x <= i + 0.5 < x + w``. A box
        narrower than a voxel may hold no voxel centre (a 4 mm stone mapped onto 6 mm voxels): it covers the voxel
        that holds its own centre, so an annotated lesion is never scored against an empty mask. A box whose centre
        lies outside the grid and that holds no voxel centre covers nothing.
    """
    size = tuple(int(s) for s in image_size)
    d = len(size)
    mask = np.zeros(size, dtype=bool)
    for b in _boxes(box):
        if len(b) != 2 * d:
            raise ValueError(f"a {d}D box has {2 * d} numbers (corner + size), got {len(b)}")
        inside = np.ones(size, dtype=bool)
        for a in range(d):
            centres = np.arange(size[a]) + 0.5
            along = (centres >= b[a]) & (centres < b[a] + b[d + a])  # [size[a]]
            inside &= along.reshape([-1 if i == a else 1 for i in range(d)])
        if not inside.any():
            centre = tuple(int(np.floor(b[a] + b[d + a] / 2)) for a in range(d))
            if all(0 <= c < n for c, n in zip(centre, size, strict=True)):
                inside[centre] = True
        mask |= inside
    return mask


def _np(x: Tensor | np.ndarray) -> np.ndarray:
    return x.detach().float().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x, dtype=np.float64)


def cnr(sim_map: Tensor | np.ndarray, mask: np.ndarray) -> float:
    """Contrast-to-noise ratio of a similarity map between the box interior and exterior (BioViL, MS-CXR).

    ``CNR = |mean_in - mean_out| / sqrt(var_in + var_out)`` (Boecking et al. 2022, Sec. 4.3), with population
    variances of the raw (un-thresholded) map inside and outside the mask; NaN values are ignored.

    Returns:
        The CNR; NaN when either region is empty, ``inf`` when both variances are 0 and the means differ, 0 when
        the map is constant.
    """
    values, mask = _np(sim_map), np.asarray(mask, dtype=bool)
    if values.shape != mask.shape:
        raise ValueError(f"map {values.shape} and mask {mask.shape} differ")
    finite = np.isfinite(values)
    inside, outside = values[mask & finite], values[~mask & finite]
    if inside.size == 0 or outside.size == 0:
        return float("nan")
    diff = abs(float(inside.mean()) - float(outside.mean()))
    noise = float(np.sqrt(inside.var() + outside.var()))
    if noise == 0.0:
        return float("inf") if diff > 0 else 0.0
    return diff / noise


def iou(sim_map: Tensor | np.ndarray, mask: np.ndarray, threshold: float = 0.5) -> float:
    """IoU of the thresholded map with the box mask.

    The map is min-max rescaled to [0, 1] per image (a constant map becomes all 0) and the prediction is
    ``rescaled >= threshold``.

    Returns:
        ``|pred & mask| / |pred | mask|``; NaN when both are empty.
    """
    values, mask = _np(sim_map), np.asarray(mask, dtype=bool)
    if values.shape != mask.shape:
        raise ValueError(f"map {values.shape} and mask {mask.shape} differ")
    finite = np.isfinite(values)
    lo, hi = (float(values[finite].min()), float(values[finite].max())) if finite.any() else (0.0, 0.0)
    scaled = (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)
    pred = finite & (scaled >= threshold)
    union = np.logical_or(pred, mask).sum()
    return float(np.logical_and(pred, mask).sum() / union) if union else float("nan")


def miou(sim_map: Tensor | np.ndarray, mask: np.ndarray, thresholds: Sequence[float] = MIOU_THRESHOLDS) -> float:
    """Mean over ``thresholds`` of the IoU of ``sim_map >= t`` (raw cosine similarities, no rescaling) with the mask.

    A threshold at which neither the map nor the mask has a voxel scores 0 (only a box outside the grid has an empty
    mask: :func:`box_mask` gives a sub-voxel box the voxel of its centre).
    """
    values, mask = _np(sim_map), np.asarray(mask, dtype=bool)
    if values.shape != mask.shape:
        raise ValueError(f"map {values.shape} and mask {mask.shape} differ")
    finite = np.isfinite(values)
    scores = []
    for t in thresholds:
        pred = finite & (values >= t)
        union = np.logical_or(pred, mask).sum()
        scores.append(float(np.logical_and(pred, mask).sum() / union) if union else 0.0)
    return float(np.mean(scores))


def boxes_from_frame(frame: pd.DataFrame, spatial_dims: int) -> list[tuple[float, ...]]:
    """Box tuples ``(x, y[, z], w, h[, d])`` from a cache ``grounding`` frame, row by row."""
    cols = ["x", "y", "z", "w", "h", "d"] if spatial_dims == 3 else ["x", "y", "w", "h"]
    return [tuple(float(v) for v in row) for row in frame[cols].itertuples(index=False)]


@torch.no_grad()
def grounding_metrics(
    model: Any,
    images: Tensor | np.ndarray,
    phrases: Sequence[str],
    boxes: Sequence[Any],
    categories: Sequence[str] | None = None,
    iou_threshold: float = 0.5,
    batch_size: int = 16,
) -> pd.DataFrame:
    """CNR and IoU of the model's similarity map for each (image, phrase, box) triple.

    Args:
        model: a :class:`~medvlp.models.MedVLP`.
        images: ``[B, 1, X, Y(, Z)]`` at the model's input size.
        phrases: ``B`` phrases, one per image.
        boxes: ``B`` boxes ``(x, y[, z], w, h[, d])`` on the image grid, or lists of boxes (their union).
        categories: ``B`` category names (default: empty strings).
        iou_threshold: see :func:`iou`.
        batch_size: images per forward pass.

    Returns:
        One row per phrase: ``phrase, category, cnr, iou, miou``.
    """
    images = torch.as_tensor(images)
    n = images.shape[0]
    if not len(phrases) == len(boxes) == n:
        raise ValueError(f"{n} images, {len(phrases)} phrases and {len(boxes)} boxes must agree")
    categories = list(categories) if categories is not None else [""] * n
    size = tuple(int(s) for s in images.shape[2:])
    was_training = getattr(model, "training", False)
    model.eval()
    rows: list[dict[str, Any]] = []
    try:
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            x = images[start:stop].to(model.device, torch.float32)  # [b, 1, *size]
            out = model.forward_image(x)
            text = phrase_embeddings(model, phrases[start:stop])  # [b, E]
            maps = similarity_map(out.tokens, out.grid, text, size).cpu()  # [b, *size]
            for j, i in enumerate(range(start, stop)):
                mask = box_mask(boxes[i], size)
                rows.append(
                    {
                        "phrase": phrases[i],
                        "category": categories[i],
                        "cnr": cnr(maps[j], mask),
                        "iou": iou(maps[j], mask, iou_threshold),
                        "miou": miou(maps[j], mask),
                    }
                )
    finally:
        if was_training:
            model.train()
    return pd.DataFrame(rows, columns=["phrase", "category", "cnr", "iou", "miou"])


def phrase_embeddings(model: Any, phrases: Sequence[str]) -> Tensor:
    """``[B, E]`` unit phrase embeddings that the image tokens are compared with: the towers alone, without the
    model's side edit (:mod:`medvlp.models.side_edit`), whose directions were fitted on the global image embedding, not
    on its tokens (measured with the edit on the phrases: mIoU down on two 2D styles of three)."""
    return model.forward_text(list(phrases)).embedding


@torch.no_grad()
def similarity_maps(model: Any, images: Tensor, phrases: Sequence[str]) -> np.ndarray:
    """``[B, *size]`` patch-phrase cosine similarity of each image ``[B, 1, *size]`` with its phrase."""
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        out = model.forward_image(torch.as_tensor(images).to(model.device, torch.float32))
        text = phrase_embeddings(model, phrases)
        return similarity_map(out.tokens, out.grid, text, tuple(images.shape[2:])).cpu().numpy()
    finally:
        if was_training:
            model.train()


def grounding_pairs(cache: Any, split: str = "test") -> pd.DataFrame:
    """The split's annotated phrases: one row per (study, phrase) with the list of all its boxes in ``boxes``.

    Columns ``study, finding, phrase, boxes``; boxes are ``(x, y[, z], w, h[, d])`` on the cached grid.
    """
    studies = set(cache.split(split)["study"])
    g = cache.grounding[cache.grounding["study"].isin(studies)]
    cols = ["x", "y", "z", "w", "h", "d"] if cache.spatial_dims == 3 else ["x", "y", "w", "h"]
    rows = [
        {"study": study, "finding": cat, "phrase": text, "boxes": part[cols].to_numpy(float).tolist()}
        for (study, cat, text), part in g.groupby(["study", "category_name", "label_text"], sort=False)
    ]
    return pd.DataFrame(rows, columns=["study", "finding", "phrase", "boxes"])


def control_studies(cache: Any, pairs: pd.DataFrame, split: str = "test") -> list[str | None]:
    """For each pair of :func:`grounding_pairs`, a study of the same split labelled without the pair's finding.

    The k-th pair of a finding takes the k-th such study (cycling, in the split's order), so the draw needs no seed.
    None where the finding is not a label column of the cohort or every study has it.
    """
    records = cache.split(split)
    negatives = {
        f: records.loc[records[f] == 0, "study"].tolist() for f in set(pairs["finding"]) if f in records.columns
    }
    seen: dict[str, int] = {}
    out: list[str | None] = []
    for finding in pairs["finding"]:
        pool = negatives.get(finding) or []
        k = seen[finding] = seen.get(finding, -1) + 1
        out.append(pool[k % len(pool)] if pool else None)
    return out


def grounding_scores(model: Any, cache: Any, pairs: pd.DataFrame, split: str = "test") -> pd.DataFrame:
    """CNR, IoU and mIoU of every (study, phrase) of :func:`grounding_pairs` against the union of its boxes, and the
    control ``cnr_control``: the CNR of the same phrase and boxes on an image without the finding
    (:func:`control_studies`). A map that lights the boxes as well there knows the anatomy the phrase names (a left
    kidney, the liver), not the lesion; NaN where there is no such image.

    Returns:
        ``pairs`` with ``cnr, iou, miou, cnr_control`` added (same index).
    """
    from medvlp.tasks.embed import load_images

    out = pairs.copy()
    if pairs.empty:
        cols = ("cnr", "iou", "miou", "cnr_control")
        return out.assign(**{c: pd.Series(dtype=float) for c in cols})
    images = load_images(cache, list(pairs["study"]))
    df = grounding_metrics(model, images, list(pairs["phrase"]), list(pairs["boxes"]), list(pairs["finding"]))
    for col in ("cnr", "iou", "miou"):
        out[col] = df[col].to_numpy()
    controls = control_studies(cache, pairs, split)
    have = [k for k, c in enumerate(controls) if c is not None]
    control = np.full(len(pairs), np.nan)
    if have:
        sub = pairs.iloc[have]
        images = load_images(cache, [controls[k] for k in have])
        control[have] = grounding_metrics(model, images, list(sub["phrase"]), list(sub["boxes"]))["cnr"].to_numpy()
    out["cnr_control"] = control
    return out


def grounding_summary(scores: pd.DataFrame) -> dict[str, Any]:
    """``n`` (study, phrase) pairs, ``mean_cnr``, ``mean_iou``, ``mean_miou`` (and ``mean_cnr_control``, the CNR on
    images without the finding) and their means per finding.

    A pair whose CNR is not finite (a box covering the whole image) is left out of that mean, and counted.
    """
    if scores.empty:
        return {"n": 0, "mean_cnr": None, "mean_iou": None, "mean_miou": None, "per_category": {}}

    def mean(col: pd.Series) -> float | None:
        v = col.to_numpy(float)
        v = v[np.isfinite(v)]
        return float(v.mean()) if len(v) else None

    names = [m for m in ("cnr", "iou", "miou", "cnr_control") if m in scores.columns]
    per = {
        str(f): {m: (None if (x := mean(part[m])) is None else round(x, 4)) for m in names} | {"n": len(part)}
        for f, part in scores.groupby("finding", sort=True)
    }
    out = {
        "n": len(scores),
        "n_unscored": int((~np.isfinite(scores["cnr"].to_numpy(float))).sum()),
        "mean_cnr": mean(scores["cnr"]),
        "mean_iou": mean(scores["iou"]),
        "mean_miou": mean(scores["miou"]),
        "per_category": per,
    }
    if "cnr_control" in scores.columns:
        out["mean_cnr_control"] = mean(scores["cnr_control"])
    return out


def grounding_examples(cache: Any, scores: pd.DataFrame, split: str = "test", n: int = 4) -> pd.DataFrame:
    """``study, phrase, boxes`` to show: the ``n`` annotated phrases with the highest CNR, or, in a cohort without
    phrase boxes, the first ``n`` studies of the split with the first sentence of their report (no boxes)."""
    from medvlp.data.reports import report_sentences

    if len(scores):
        return scores.sort_values("cnr", ascending=False).head(n)[["study", "phrase", "boxes"]]
    rec = cache.split(split).head(n)
    first = [(report_sentences(r) or [" ".join(r.split())])[0] for r in rec["report"]]
    return pd.DataFrame({"study": rec["study"], "phrase": first, "boxes": [[] for _ in first]})
