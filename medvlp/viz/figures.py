"""Every figure of the card and the notebooks, as ``matplotlib.figure.Figure`` objects (no pyplot, no global state).

The card saves them with :func:`save_png`; a notebook shows them with ``display(fig)``. Images go through
:func:`medvlp.viz.orient.planes`, the one orientation rule.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from medvlp.viz.orient import VIEWS, Plane, planes

__all__ = [
    "c_index_figure",
    "calibration_figure",
    "data_efficiency_figure",
    "grounding_figure",
    "grounding_scores_figure",
    "image_figure",
    "kaplan_meier_figure",
    "prompt_sensitivity_figure",
    "roc_figure",
    "save_png",
]


def _figure(width: float, height: float, dpi: int = 90) -> Figure:
    fig = Figure(figsize=(width, height), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _grid(n: int, ncols: int = 4, size: float = 3.2) -> tuple[Figure, np.ndarray]:
    ncols = max(1, min(ncols, n))
    nrows = max(1, -(-n // ncols))
    fig = _figure(size * ncols, size * nrows)
    axs = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    for ax in axs[n:]:
        ax.set_axis_off()
    return fig, axs


def save_png(fig: Figure, path: str | Path) -> Path:
    """Write a figure as PNG (folders created) and free it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=fig.dpi, format="png")
    fig.clear()
    return path


def _valid(labels: np.ndarray, probs: np.ndarray, j: int) -> tuple[np.ndarray, np.ndarray]:
    from medvlp.tasks.zeroshot import _valid as valid

    return valid(np.asarray(labels, float)[:, j], np.asarray(probs, float)[:, j])


def _wrap(text: str, width: int = 40) -> str:
    return textwrap.fill(text, width) if text else ""


def roc_figure(
    labels: np.ndarray,
    probs: np.ndarray,
    findings: Sequence[str],
    points: Mapping[str, Mapping[str, float]] | None = None,
    title: str = "",
) -> Figure:
    """One ROC panel per finding (rows labelled 1/0), AUROC in the title, an operating point marked when given
    (``points[finding]`` with ``threshold, sensitivity, specificity``, e.g. from
    :func:`medvlp.tasks.zeroshot.zero_shot_metrics`)."""
    from sklearn.metrics import roc_curve

    from medvlp.tasks.zeroshot import classification_metrics

    auroc = {f: m["auroc"] for f, m in classification_metrics(labels, probs, findings)["per_finding"].items()}
    fig, axs = _grid(len(findings))
    for j, (ax, name) in enumerate(zip(axs, findings, strict=False)):
        y, p = _valid(labels, probs, j)
        ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1)
        if len(np.unique(y)) == 2:
            fpr, tpr, _ = roc_curve(y, p)
            ax.plot(fpr, tpr, lw=1.5)
            ax.set_title(f"{name}\nAUROC {auroc[name]:.3f} (n={len(y)})", fontsize="small")
        else:
            ax.set_title(f"{name}\none class only (n={len(y)})", fontsize="small")
        pt = (points or {}).get(name) or {}
        if np.isfinite([pt.get(k, np.nan) for k in ("threshold", "sensitivity", "specificity")]).all():
            ax.plot(1 - pt["specificity"], pt["sensitivity"], "o", color="red", label=f"t = {pt['threshold']:.3f}")
            ax.legend(loc="lower right", fontsize="x-small")
        ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="1 - specificity", ylabel="sensitivity")
    if title:
        fig.suptitle(title)
    return fig


def calibration_figure(
    labels: np.ndarray, probs: np.ndarray, findings: Sequence[str], n_bins: int = 10, title: str = "Calibration"
) -> Figure:
    """Reliability diagram with bins of equal count (each point: the mean probability and the fraction positive of
    ``n_bins`` equally many studies, so no point rests on a handful) and the probability histogram per finding."""
    fig = _figure(6.0, 7.0, dpi=100)
    ax, hist = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1)
    for j, name in enumerate(findings):
        y, p = _valid(labels, probs, j)
        if len(y) == 0:
            continue
        order = np.argsort(p, kind="stable")
        parts = [part for part in np.array_split(order, min(n_bins, len(p))) if len(part)]
        conf = [float(p[part].mean()) for part in parts]
        frac = [float(y[part].mean()) for part in parts]
        (line,) = ax.plot(conf, frac, marker="o", ms=3, lw=1.2, label=f"{name} ({len(p) // len(parts)} per bin)")
        hist.hist(p, bins=np.linspace(0, 1, 21), histtype="step", color=line.get_color())
    ax.set(xlim=(0, 1), ylim=(0, 1), ylabel="fraction positive", title=title)
    hist.set(xlabel="predicted probability", ylabel="count")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left", fontsize="small")
    return fig


def data_efficiency_figure(curve: Mapping[str, Mapping[float, float]], title: str = "Label efficiency") -> Figure:
    """Mean AUROC against the fraction of training labels (log scale), one line per model; NaN points dropped."""
    fig = _figure(6.0, 4.5, dpi=100)
    ax = fig.add_subplot()
    for model, points in curve.items():
        xs = np.array(sorted(points), dtype=np.float64)
        ys = np.array([points[x] for x in sorted(points)], dtype=np.float64)
        ok = np.isfinite(ys) & (xs > 0)
        ax.plot(xs[ok] * 100, ys[ok], marker="o", label=str(model))
    ax.set_xscale("log")
    ax.set(xlabel="training labels (%)", ylabel="mean AUROC", title=title)
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
    return fig


def _draw(ax: Any, plane: Plane, lo: float | None = None, hi: float | None = None) -> Any:
    rows, cols = plane.image.shape
    extent = (0, cols, rows, 0)  # column across, row 0 at the top; voxel i spans [i, i + 1)
    ax.imshow(plane.image, cmap="gray", extent=extent, interpolation="nearest")
    overlay = None
    if plane.overlay is not None:
        overlay = ax.imshow(
            plane.overlay, cmap="jet", alpha=0.45, extent=extent, interpolation="bilinear", vmin=lo, vmax=hi
        )
    for (x, y, w, h), solid in zip(plane.boxes, plane.solid, strict=True):
        ax.add_patch(Rectangle((x, y), w, h, fill=False, ec="lime", lw=1.5, ls="-" if solid else ":"))
    ax.set_xticks([])
    ax.set_yticks([])
    return overlay


def grounding_figure(
    images: Any,
    maps: np.ndarray,
    titles: Sequence[str],
    boxes: Sequence[Any] | None = None,
    affines: Sequence[np.ndarray] | None = None,
    views: Sequence[str] = VIEWS,
    ncols: int = 4,
) -> Figure:
    """Similarity heatmaps over images, boxes in green (dotted: a 3D box the slice does not cross).

    Args:
        images: ``[B, 1, *size]`` or ``[B, *size]`` cached images.
        maps: ``[B, *size]`` similarity maps, one per image.
        titles: one per image.
        boxes: per image a list of boxes on the cached grid, or None.
        affines: per image its affine (required in 3D: slices are drawn in the radiological convention).
        views: 3D only: the views of each row (slices through the peak of its map).
        ncols: 2D only: panels per row.
    """
    maps = np.asarray(maps, dtype=np.float32)
    if len(maps) == 0:
        raise ValueError("no similarity maps to draw")
    imgs = np.asarray(images, dtype=np.float32).reshape(len(maps), *maps.shape[1:])
    rows = [
        planes(
            imgs[i],
            maps[i],
            None if boxes is None else boxes[i],
            None if affines is None else affines[i],
            views,
        )
        for i in range(len(maps))
    ]
    per = len(rows[0])
    if per == 1:
        fig, flat = _grid(len(rows), ncols)
        axs = flat[: len(rows)].reshape(-1, 1)
    else:
        fig = _figure(3.4 * per, 3.4 * len(rows))
        axs = np.asarray(fig.subplots(len(rows), per, squeeze=False))
    lo, hi = float(np.nanmin(maps)), float(np.nanmax(maps))  # one colour scale for every panel
    overlay = None
    for i, row in enumerate(rows):
        for k, plane in enumerate(row):
            overlay = _draw(axs[i, k], plane, lo, hi)
            title = titles[i] if k == 0 else ""
            axs[i, k].set_title("\n".join(filter(None, [_wrap(title), plane.label])), fontsize="small")
    if overlay is not None:
        fig.colorbar(overlay, ax=list(np.ravel(axs)), shrink=0.6, label="cosine similarity")
    return fig


def image_figure(
    images: Any, titles: Sequence[str], affines: Sequence[np.ndarray] | None = None, ncols: int = 4
) -> Figure:
    """Cached images side by side (a 3D volume shows its middle axial slice, radiological convention)."""
    arr = np.asarray(images, dtype=np.float32)
    fig, axs = _grid(len(arr), ncols)
    for i, (ax, im, title) in enumerate(zip(axs, arr, titles, strict=False)):
        plane = planes(im, affine=None if affines is None else affines[i], views=("axial",))[0]
        _draw(ax, plane)
        ax.set_title("\n".join(filter(None, [_wrap(title), plane.label])), fontsize="small")
    return fig


def _strip(ax: Any, labels: Sequence[str], values: Sequence[np.ndarray], means: Sequence[float] | None) -> None:
    for j, vals in enumerate(values):
        vals = np.asarray(vals, float)
        vals = vals[np.isfinite(vals)]
        ax.scatter(np.full(len(vals), j) + np.linspace(-0.15, 0.15, len(vals)), vals, s=14, color="tab:blue")
        mean = means[j] if means is not None else (vals.mean() if len(vals) else np.nan)
        if np.isfinite(mean):
            ax.hlines(mean, j - 0.3, j + 0.3, color="red", lw=2)
    ax.set_xticks(range(len(labels)), list(labels), rotation=20)


def grounding_scores_figure(scores: pd.DataFrame) -> Figure:
    """CNR, IoU and mIoU of every annotated (study, phrase), one column of points per finding, the mean in red."""
    findings = sorted(scores["finding"].unique())
    metrics = [m for m in ("cnr", "iou", "miou") if m in scores]
    fig = _figure(max(6.0, 2.2 * len(findings) + 2) * len(metrics) / 2, 3.6)
    for ax, metric in zip(np.atleast_1d(fig.subplots(1, len(metrics))), metrics, strict=True):
        _strip(ax, findings, [scores.loc[scores["finding"] == f, metric] for f in findings], None)
        ax.set(ylabel=metric.upper(), title=f"{metric.upper()} per annotated phrase")
    return fig


def prompt_sensitivity_figure(table: pd.DataFrame) -> Figure:
    """AUROC across template sets, one column of points per finding; the ensemble drawn as a red bar."""
    fig = _figure(1.6 * table.shape[1] + 2, 4)
    ax = fig.add_subplot()
    single = table.drop(index="ensemble", errors="ignore")
    means = [table.at["ensemble", c] for c in table.columns] if "ensemble" in table.index else None
    _strip(ax, list(table.columns), [single[c].to_numpy(float) for c in table.columns], means)
    ax.axhline(0.5, ls="--", color="grey", lw=1)
    ax.set(ylabel="AUROC", title="Prompt sensitivity: single template pairs (dots) vs ensemble (red)")
    return fig


def c_index_figure(table: pd.DataFrame) -> Figure:
    """C-index with its bootstrap interval per model (the gain row on its own axis, 0 = no gain)."""
    models = table.drop(index="gain from image", errors="ignore").dropna(subset=["c_index"])
    gain = table.loc["gain from image"] if "gain from image" in table.index else None
    has_gain = gain is not None and np.isfinite(float(gain.get("c_index", np.nan)))
    fig = _figure(9 if has_gain else 5.5, 3.6)
    axs = fig.subplots(1, 2 if has_gain else 1, squeeze=False, gridspec_kw={"width_ratios": [3, 1.4][: 1 + has_gain]})
    ax = axs[0, 0]
    y = np.arange(len(models))
    c = models["c_index"].to_numpy(float)
    err = np.abs(np.vstack([c - models["ci_low"].to_numpy(float), models["ci_high"].to_numpy(float) - c]))
    ax.errorbar(c, y, xerr=err, fmt="o", capsize=4)
    ax.axvline(0.5, ls="--", color="grey", lw=1)
    ax.set_yticks(y, list(models.index))
    ax.set(xlabel="Harrell's C (test split)", title="C-index with bootstrap interval (by subject)")
    if has_gain:
        d, lo, hi = (float(gain[k]) for k in ("c_index", "ci_low", "ci_high"))
        gx = axs[0, 1]
        gx.errorbar([d], [0], xerr=[[d - lo], [hi - d]], fmt="o")
        gx.axvline(0.0, ls="--", color="grey", lw=1)
        gx.set_yticks([0], ["image+cov\n- cov"])
        gx.set(xlabel="difference in C", title="Gain from the image")
    return fig


def kaplan_meier_figure(time: np.ndarray, event: np.ndarray, groups: Mapping[str, np.ndarray]) -> Figure:
    """Kaplan-Meier curves of each model's risk groups (cut at the training median), log-rank p in each title."""
    from medvlp.tasks.survival import plot_kaplan_meier

    names = [n for n in groups if len(np.unique(groups[n])) > 1]
    fig = _figure(5.2 * max(1, len(names)), 4)
    axs = np.atleast_1d(fig.subplots(1, max(1, len(names)), squeeze=False)).ravel()
    for ax, name in zip(axs, names, strict=False):
        plot_kaplan_meier(time, event, groups[name], ax=ax, labels={0: "low risk", 1: "high risk"})
        ax.set_title(f"{name}\n{ax.get_title()}", fontsize="small")
    return fig
