"""PNG figures for evaluation reports: ROC curves, reliability diagrams, grounding overlays, label efficiency.

Figures are built with matplotlib's object API on the Agg canvas (no pyplot state, no display), so they are
never left open. The PNG is ``figsize * dpi`` pixels. Arrays are ``(X, Y[, Z])`` as in the cache; images are
shown with X across and Y down, voxel ``i`` spanning ``[i, i + 1)`` so boxes ``(x, y, w, h)`` draw as given.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from sklearn.metrics import roc_auc_score, roc_curve

__all__ = ["plot_calibration", "plot_data_efficiency", "plot_grounding_overlay", "plot_roc_curves"]


def _figure(figsize: tuple[float, float], dpi: int, layout: str | None = None) -> Figure:
    fig = Figure(figsize=figsize, dpi=dpi, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=fig.dpi, format="png")
    fig.clear()
    return path


def _valid(labels: np.ndarray, probs: np.ndarray, j: int) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels, dtype=np.float64)[:, j]
    p = np.asarray(probs, dtype=np.float64)[:, j]
    keep = np.isin(y, (0.0, 1.0)) & np.isfinite(p)
    return y[keep].astype(int), p[keep]


def plot_roc_curves(
    labels: np.ndarray,
    probs: np.ndarray,
    findings: Sequence[str],
    path: str | Path,
    title: str = "ROC",
    figsize: tuple[float, float] = (6.0, 6.0),
    dpi: int = 100,
) -> Path:
    """One ROC curve per finding (rows labelled 1/0 only), AUROC in the legend; findings with one class omitted."""
    fig = _figure(figsize, dpi)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1)
    for j, name in enumerate(findings):
        y, p = _valid(labels, probs, j)
        if len(np.unique(y)) < 2:
            continue
        fpr, tpr, _ = roc_curve(y, p)
        ax.plot(fpr, tpr, lw=1.5, label=f"{name} ({roc_auc_score(y, p):.3f})")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="1 - specificity", ylabel="sensitivity", title=title)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    return _save(fig, path)


def plot_calibration(
    labels: np.ndarray,
    probs: np.ndarray,
    findings: Sequence[str],
    path: str | Path,
    n_bins: int = 15,
    title: str = "Calibration",
    figsize: tuple[float, float] = (6.0, 7.0),
    dpi: int = 100,
) -> Path:
    """Reliability diagram (fraction positive vs mean probability, equal-width bins) and probability histograms."""
    fig = _figure(figsize, dpi)
    ax, hist = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1)
    edges = np.linspace(0, 1, n_bins + 1)
    for j, name in enumerate(findings):
        y, p = _valid(labels, probs, j)
        if len(y) == 0:
            continue
        idx = np.minimum((p * n_bins).astype(int), n_bins - 1)
        counts = np.bincount(idx, minlength=n_bins)
        nz = counts > 0
        frac = np.bincount(idx, weights=y, minlength=n_bins)[nz] / counts[nz]
        conf = np.bincount(idx, weights=p, minlength=n_bins)[nz] / counts[nz]
        (line,) = ax.plot(conf, frac, marker="o", ms=3, lw=1.2, label=name)
        hist.hist(p, bins=edges, histtype="step", color=line.get_color())
    ax.set(xlim=(0, 1), ylim=(0, 1), ylabel="fraction positive", title=title)
    hist.set(xlabel="predicted probability", ylabel="count")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left", fontsize="small")
    fig.tight_layout()
    return _save(fig, path)


def _numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _show(ax: Any, image: np.ndarray, sim: np.ndarray, boxes: list[tuple[float, ...]], solid: list[bool]) -> Any:
    """Image plane ``[A, B]`` (A across, B down), similarity overlay, box rectangles; returns the overlay."""
    a, b = image.shape
    extent = (0, a, b, 0)
    ax.imshow(image.T, cmap="gray", extent=extent, interpolation="nearest")
    overlay = ax.imshow(sim.T, cmap="jet", alpha=0.4, extent=extent, interpolation="bilinear")
    for (x, y, w, h), full in zip(boxes, solid, strict=True):
        ax.add_patch(Rectangle((x, y), w, h, fill=False, ec="lime", lw=1.5, ls="-" if full else ":"))
    ax.set_xticks([])
    ax.set_yticks([])
    return overlay


def plot_grounding_overlay(
    image: Any,
    sim_map: Any,
    box: Sequence[float] | Sequence[Sequence[float]] | None,
    path: str | Path,
    title: str = "",
    views: str = "all",
    figsize: tuple[float, float] | None = None,
    dpi: int = 100,
) -> Path:
    """The image with the similarity map overlaid and the box(es) drawn.

    Args:
        image: ``[X, Y]`` or ``[X, Y, Z]`` (a leading channel of 1 is dropped); array or tensor.
        sim_map: same spatial shape as ``image``.
        box: ``(x, y[, z], w, h[, d])``, a list of boxes, or None.
        path: PNG to write.
        title: figure title.
        views: 3D only: ``"all"`` (the three planes through the map's peak) or ``"axial"`` (the X-Y plane).
        figsize: default ``(5, 5)`` for one panel, ``(12, 4.5)`` for three.
        dpi: dots per inch.

    In 3D, each panel is the slice through the peak of ``sim_map``; a box is drawn solid where the slice crosses
    it and dotted (its projection) where it does not.
    """
    img, sim = np.squeeze(_numpy(image)), np.squeeze(_numpy(sim_map))
    if img.shape != sim.shape or img.ndim not in (2, 3):
        raise ValueError(f"image {img.shape} and sim_map {sim.shape} must be the same 2D or 3D shape")
    d = img.ndim
    boxes = [] if box is None else [tuple(float(v) for v in b) for b in np.asarray(box, float).reshape(-1, 2 * d)]
    if d == 2:
        planes = [("", img, sim, list(boxes), [True] * len(boxes))]
    else:
        peak = np.unravel_index(np.nanargmax(sim), sim.shape)
        names = {2: "axial", 1: "coronal", 0: "sagittal"}  # plane orthogonal to Z, Y, X
        axes = [2] if views == "axial" else [2, 1, 0]
        planes = []
        for axis in axes:
            keep = [a for a in range(3) if a != axis]
            sl = [slice(None)] * 3
            sl[axis] = int(peak[axis])
            centre = peak[axis] + 0.5
            plane_boxes = [(b[keep[0]], b[keep[1]], b[3 + keep[0]], b[3 + keep[1]]) for b in boxes]
            solid = [b[axis] <= centre < b[axis] + b[3 + axis] for b in boxes]
            label = f"{names[axis]} {'XYZ'[axis]}={peak[axis]}"
            planes.append((label, img[tuple(sl)], sim[tuple(sl)], plane_boxes, solid))
    if figsize is None:
        figsize = (5.0, 5.0) if len(planes) == 1 else (12.0, 4.5)
    fig = _figure(figsize, dpi, layout="constrained")
    axs = np.atleast_1d(fig.subplots(1, len(planes)))
    overlay = None
    for ax, (label, im, sm, pb, solid) in zip(axs, planes, strict=True):
        overlay = _show(ax, im, sm, pb, solid)
        if label:
            ax.set_title(label, fontsize="small")
    fig.colorbar(overlay, ax=list(axs), shrink=0.8, label="similarity")
    if title:
        fig.suptitle(textwrap.fill(title, 60), fontsize="medium")
    return _save(fig, path)


def plot_data_efficiency(
    curve: Mapping[str, Mapping[float, float]],
    path: str | Path,
    title: str = "Label efficiency",
    ylabel: str = "mean AUROC",
    figsize: tuple[float, float] = (6.0, 4.5),
    dpi: int = 100,
) -> Path:
    """Mean AUROC against the fraction of training labels (log scale), one line per model; NaN points dropped."""
    fig = _figure(figsize, dpi)
    ax = fig.add_subplot()
    for model, points in curve.items():
        xs = np.array(sorted(points), dtype=np.float64)
        ys = np.array([points[x] for x in sorted(points)], dtype=np.float64)
        ok = np.isfinite(ys) & (xs > 0)
        ax.plot(xs[ok] * 100, ys[ok], marker="o", label=str(model))
    ax.set_xscale("log")
    ax.set(xlabel="training labels (%)", ylabel=ylabel, title=title)
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
    fig.tight_layout()
    return _save(fig, path)
