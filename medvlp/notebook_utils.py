"""Helpers behind the notebooks in ``notebooks/``: open a run, and the tables and figures the notebooks show.

The notebooks stay thin: each cell calls one function here or in :mod:`medvlp.tasks`. Figures are
``matplotlib.figure.Figure`` objects built without pyplot (a notebook shows them with ``display(fig)``); a figure
the evaluation already draws (:mod:`medvlp.tasks.plots`) is shown as the same PNG with :func:`png`.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from medvlp.config import TrainConfig
from medvlp.data.cache import CachedCohort
from medvlp.evaluate import SplitEmbeddings, embed_split
from medvlp.models import MedVLP, load_model
from medvlp.tasks import grounding, zeroshot

__all__ = [
    "RunContext",
    "calibration_png",
    "ground",
    "grounding_examples",
    "grounding_figure",
    "grounding_pairs",
    "grounding_scores",
    "grounding_scores_figure",
    "image_figure",
    "load_run",
    "metrics_table",
    "operating_points",
    "png",
    "prompt_sensitivity",
    "prompt_sensitivity_figure",
    "report_sentences",
    "roc_figure",
    "similarity_maps",
    "study_boxes",
    "study_images",
    "template_variants",
    "zero_shot",
]

DEFAULT_SECTIONS = ["findings", "impression"]


@dataclass
class RunContext:
    """A trained model with the cohort cache it is evaluated on.

    Attributes:
        run: the run (or model) folder given.
        model: the model, in eval mode.
        cache: the cohort cache.
        sections: the report sections the text tower was trained on.
        config: the run's resolved training config, when the folder has one.
    """

    run: Path
    model: MedVLP
    cache: CachedCohort
    sections: list[str]
    config: TrainConfig | None

    def embed(self, split: str = "test") -> SplitEmbeddings:
        """Image and report embeddings of one split (see :func:`medvlp.evaluate.embed_split`)."""
        return embed_split(self.model, self.cache, split, self.sections)


def _run_file(run: Path, name: str) -> Path | None:
    """``name`` in a run folder, or in the run folder above a model folder (``RUN/<stage>/model``)."""
    from medvlp.config import STAGES

    folders = [run]
    if run.name == "model" and run.parent.name in STAGES:
        folders.append(run.parent.parent)
    return next((f / name for f in folders if (f / name).is_file()), None)


def _cache_path(run: Path, cohort: Path | None, cache: Path | None) -> Path:
    from medvlp.data.build import build_cohort
    from medvlp.train.run import default_cache_dir

    if cache is not None:
        return cache
    info_path = _run_file(run, "run.json")
    info = json.loads(info_path.read_text()) if info_path else {}
    recorded = Path(info["cache"]) if info.get("cache") else None
    same_cohort = cohort is None or (info.get("cohort") and Path(info["cohort"]).resolve() == cohort.resolve())
    if recorded is not None and same_cohort and (recorded / "summary.json").is_file():
        return recorded
    if cohort is None:
        raise ValueError(f"{run} records no usable cohort cache: pass the cohort YAML (or the cache folder)")
    path = default_cache_dir(cohort)
    build_cohort(cohort, path)  # brings the cache up to date; nothing to do when it is
    return path


def load_run(
    run: str | Path, cohort: str | Path | None = None, cache: str | Path | None = None, device: str = "cpu"
) -> RunContext:
    """Open a run (or model) folder with the cohort cache it is evaluated on.

    Args:
        run: a run folder (``medvlp train --out``) or a model folder.
        cohort: the cohort YAML; None takes the cohort cache recorded in the run's ``run.json``.
        cache: the cache folder, when it is not the one recorded or the default beside the cohort.
        device: where the model runs.

    Raises:
        ValueError: no cohort given and the run records no usable cache.
    """
    from medvlp.config import load_config

    run = Path(run)
    cfg_path = _run_file(run, "config.yaml")
    cfg = load_config(cfg_path) if cfg_path is not None else None
    path = _cache_path(run, Path(cohort) if cohort else None, Path(cache) if cache else None)
    model = load_model(run, map_location=device).eval()
    sections = list(cfg.data.report_sections) if cfg is not None else list(DEFAULT_SECTIONS)
    return RunContext(run, model, CachedCohort.open(path), sections, cfg)


def png(plot: Callable[..., Path], *args: Any, **kwargs: Any) -> Any:
    """Run a :mod:`medvlp.tasks.plots` function (which writes a PNG) and return the PNG for a notebook to show."""
    from IPython.display import Image

    with tempfile.TemporaryDirectory() as tmp:
        path = plot(*args, path=Path(tmp) / "figure.png", **kwargs)
        return Image(data=Path(path).read_bytes(), format="png")


def calibration_png(labels: np.ndarray, probs: np.ndarray, findings: Sequence[str], title: str = "Calibration") -> Any:
    """The evaluation's reliability diagram, as a PNG to show."""
    from medvlp.tasks import plots

    return png(plots.plot_calibration, labels, probs, list(findings), title=title)


# ------------------------------------------------------------------------------------------------- zero-shot
def zero_shot(
    ctx: RunContext, emb: SplitEmbeddings, templates: Mapping[str, Sequence[str]] | None = None
) -> np.ndarray:
    """``[N, F]`` zero-shot probabilities of a split's images (prompt ensembles; default templates when None)."""
    prompts = zeroshot.build_prompt_embeddings(ctx.model, ctx.cache.findings, templates)
    return zeroshot.zero_shot_probabilities(emb.image, prompts, zeroshot.model_logit_scale(ctx.model))


def metrics_table(labels: np.ndarray, probs: np.ndarray, findings: Sequence[str]) -> pd.DataFrame:
    """Per-finding AUROC, AUPRC, F1, ECE and counts, one row per finding."""
    m = zeroshot.classification_metrics(labels, probs, list(findings))
    return pd.DataFrame(m["per_finding"]).T.rename_axis("finding")


def _valid(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    keep = np.isin(y, (0.0, 1.0)) & np.isfinite(p)
    return y[keep].astype(int), p[keep]


def _ratio(a: int, b: int) -> float:
    return a / b if b else float("nan")


def operating_points(
    labels: np.ndarray, probs: np.ndarray, findings: Sequence[str], target: float = 0.9
) -> pd.DataFrame:
    """Per finding, the highest threshold reaching ``target`` sensitivity and what it gives on these labels.

    Returns:
        Columns ``threshold, sensitivity, specificity, ppv, npv, n_pos, n_neg`` (NaN for a finding without
        positives, which has no such threshold).
    """
    thresholds = np.atleast_1d(zeroshot.threshold_at_sensitivity(labels, probs, target))
    rows = []
    for j, name in enumerate(findings):
        y, p = _valid(np.asarray(labels, float)[:, j], np.asarray(probs, float)[:, j])
        t = float(thresholds[j])
        row: dict[str, Any] = {
            "finding": name,
            "threshold": t,
            "n_pos": int((y == 1).sum()),
            "n_neg": int((y == 0).sum()),
        }
        if np.isfinite(t):
            pred = p >= t
            tp, fp = int((pred & (y == 1)).sum()), int((pred & (y == 0)).sum())
            fn, tn = int((~pred & (y == 1)).sum()), int((~pred & (y == 0)).sum())
            row |= {"sensitivity": _ratio(tp, tp + fn), "specificity": _ratio(tn, tn + fp)}
            row |= {"ppv": _ratio(tp, tp + fp), "npv": _ratio(tn, tn + fn)}
        rows.append(row)
    cols = ["finding", "threshold", "sensitivity", "specificity", "ppv", "npv", "n_pos", "n_neg"]
    return pd.DataFrame(rows).reindex(columns=cols).set_index("finding")


def _grid(n: int, ncols: int = 4, size: float = 3.2) -> tuple[Figure, np.ndarray]:
    ncols = max(1, min(ncols, n))
    nrows = max(1, -(-n // ncols))
    fig = Figure(figsize=(size * ncols, size * nrows), dpi=90, layout="constrained")
    axs = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    for ax in axs[n:]:
        ax.set_axis_off()
    return fig, axs


def roc_figure(
    labels: np.ndarray, probs: np.ndarray, findings: Sequence[str], points: pd.DataFrame | None = None
) -> Figure:
    """One ROC panel per finding, with the operating point of :func:`operating_points` marked when given."""
    from sklearn.metrics import roc_auc_score, roc_curve

    fig, axs = _grid(len(findings))
    for j, (ax, name) in enumerate(zip(axs, findings, strict=False)):
        y, p = _valid(np.asarray(labels, float)[:, j], np.asarray(probs, float)[:, j])
        ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1)
        if len(np.unique(y)) == 2:
            fpr, tpr, _ = roc_curve(y, p)
            ax.plot(fpr, tpr, lw=1.5)
            ax.set_title(f"{name}\nAUROC {roc_auc_score(y, p):.3f} (n={len(y)})", fontsize="small")
        else:
            ax.set_title(f"{name}\none class only (n={len(y)})", fontsize="small")
        if (
            points is not None
            and name in points.index
            and np.isfinite(points.loc[name, ["threshold", "specificity"]]).all()
        ):
            pt = points.loc[name]
            ax.plot(1 - pt["specificity"], pt["sensitivity"], "o", color="red", label=f"t = {pt['threshold']:.3f}")
            ax.legend(loc="lower right", fontsize="x-small")
        ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="1 - specificity", ylabel="sensitivity")
    return fig


def template_variants(
    templates: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, dict[str, list[str]]]:
    """Every single positive/negative template pair (by position), plus the full ensemble as ``"ensemble"``."""
    t = zeroshot.DEFAULT_TEMPLATES if templates is None else templates
    pos, neg = list(t["positive"]), list(t["negative"])
    out = {f"{p} | {n}": {"positive": [p], "negative": [n]} for p, n in zip(pos, neg, strict=False)}
    out["ensemble"] = {"positive": pos, "negative": neg}
    return out


def prompt_sensitivity(
    ctx: RunContext, emb: SplitEmbeddings, variants: Mapping[str, Mapping[str, Sequence[str]]] | None = None
) -> pd.DataFrame:
    """AUROC per finding (columns) for each prompt template set (rows, see :func:`template_variants`)."""
    variants = template_variants() if variants is None else variants
    rows = {}
    for name, templates in variants.items():
        m = zeroshot.classification_metrics(emb.labels, zero_shot(ctx, emb, templates), ctx.cache.findings)
        rows[name] = {f: v["auroc"] for f, v in m["per_finding"].items()} | {"mean": m["mean_auroc"]}
    return pd.DataFrame(rows).T.rename_axis("templates")


def prompt_sensitivity_figure(table: pd.DataFrame) -> Figure:
    """AUROC across template sets, one column of points per finding; the ensemble drawn as a red bar."""
    fig = Figure(figsize=(1.6 * table.shape[1] + 2, 4), dpi=90, layout="constrained")
    ax = fig.add_subplot()
    single = table.drop(index="ensemble", errors="ignore")
    for j, col in enumerate(table.columns):
        vals = single[col].to_numpy(float)
        ax.scatter(np.full(len(vals), j) + np.linspace(-0.15, 0.15, len(vals)), vals, s=18, color="tab:blue")
        if "ensemble" in table.index:
            ax.hlines(table.at["ensemble", col], j - 0.3, j + 0.3, color="red", lw=2)
    ax.axhline(0.5, ls="--", color="grey", lw=1)
    ax.set_xticks(range(table.shape[1]), list(table.columns), rotation=20)
    ax.set(ylabel="AUROC", title="Prompt sensitivity: single template pairs (dots) vs ensemble (red)")
    return fig


# ------------------------------------------------------------------------------------------------- grounding
def grounding_pairs(cache: CachedCohort, split: str = "test") -> pd.DataFrame:
    """The split's annotated phrases, one row per (study, phrase) with all of its boxes (a list) in ``boxes``."""
    studies = set(cache.split(split)["study"])
    g = cache.grounding[cache.grounding["study"].isin(studies)].reset_index(drop=True)
    cols = ["x", "y", "z", "w", "h", "d"] if cache.spatial_dims == 3 else ["x", "y", "w", "h"]
    rows = []
    for (study, cat, text), part in g.groupby(["study", "category_name", "label_text"], sort=False):
        rows.append({"study": study, "finding": cat, "phrase": text, "boxes": part[cols].to_numpy(float).tolist()})
    return pd.DataFrame(rows, columns=["study", "finding", "phrase", "boxes"])


def study_images(cache: CachedCohort, studies: Sequence[str]) -> torch.Tensor:
    """``[B, 1, *size]`` float32 cached images of the given studies."""
    arrays = [np.asarray(cache.load_image(s), dtype=np.float32) for s in studies]
    return torch.from_numpy(np.stack(arrays)) if arrays else torch.zeros(0)


def grounding_scores(ctx: RunContext, pairs: pd.DataFrame) -> pd.DataFrame:
    """CNR and IoU of every phrase's similarity map against its boxes (``pairs`` from :func:`grounding_pairs`)."""
    if pairs.empty:
        return pd.DataFrame(columns=["phrase", "finding", "cnr", "iou"])
    images = study_images(ctx.cache, list(pairs["study"]))
    df = grounding.grounding_metrics(
        ctx.model, images, list(pairs["phrase"]), list(pairs["boxes"]), list(pairs["finding"])
    )
    return df.rename(columns={"category": "finding"})


def study_boxes(pairs: pd.DataFrame, study: str) -> list[list[float]]:
    """Every annotated box of one study (all of its phrases)."""
    return [b for boxes in pairs.loc[pairs["study"] == study, "boxes"] for b in boxes]


def grounding_examples(
    cache: CachedCohort, pairs: pd.DataFrame, scores: pd.DataFrame, split: str = "test", n: int = 4
) -> pd.DataFrame:
    """``study, phrase, boxes`` to show: the ``n`` annotated phrases with the highest CNR, or, in a cohort without
    phrase boxes, the first ``n`` studies of the split with the first sentence of their report (no boxes)."""
    if len(pairs):
        return pairs.loc[scores.sort_values("cnr", ascending=False).index[:n], ["study", "phrase", "boxes"]]
    rec = cache.split(split).head(n)
    first = [(report_sentences(r) or [" ".join(r.split())])[0] for r in rec["report"]]
    return pd.DataFrame({"study": rec["study"], "phrase": first, "boxes": [[] for _ in first]})


@torch.no_grad()
def similarity_maps(model: MedVLP, images: torch.Tensor, phrases: Sequence[str]) -> np.ndarray:
    """``[B, *size]`` patch-phrase cosine similarity of each image with its phrase (one phrase per image)."""
    model.eval()
    out = model.forward_image(images.to(model.device, torch.float32))
    text = model.encode_text(list(phrases))
    return grounding.similarity_map(out.tokens, out.grid, text, images.shape[2:]).cpu().numpy()


def report_sentences(report: str, sections: Sequence[str] = ("findings", "impression")) -> list[str]:
    """The sentences of a report's chosen sections (what a user might ask the model to ground)."""
    from medvlp.data.reports import report_text

    text = report_text(report, list(sections))
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if len(s.strip()) > 3]


def _planes(image: np.ndarray, sim: np.ndarray, boxes: np.ndarray) -> list[tuple[str, np.ndarray, np.ndarray, list]]:
    """2D: the image itself; 3D: the axial, coronal and sagittal slices through the map's peak."""
    if image.ndim == 2:
        return [("", image, sim, [(b, True) for b in boxes])]
    peak = np.unravel_index(int(np.nanargmax(sim)), sim.shape)
    out = []
    for axis, name in ((2, "axial"), (1, "coronal"), (0, "sagittal")):
        keep = [a for a in range(3) if a != axis]
        sl = tuple(int(peak[axis]) if a == axis else slice(None) for a in range(3))
        centre = peak[axis] + 0.5
        pb = [
            ((b[keep[0]], b[keep[1]], b[3 + keep[0]], b[3 + keep[1]]), b[axis] <= centre < b[axis] + b[3 + axis])
            for b in boxes
        ]
        out.append((f"{name} {'XYZ'[axis]}={peak[axis]}", image[sl], sim[sl], pb))
    return out


def grounding_figure(
    images: torch.Tensor | np.ndarray,
    maps: np.ndarray,
    titles: Sequence[str],
    boxes: Sequence[Any] | None = None,
    ncols: int = 4,
) -> Figure:
    """Similarity heatmaps over images, boxes in green (dotted: a 3D box the slice does not cross).

    2D images fill a grid; each 3D image gets a row of three slices through the peak of its map.
    """
    from matplotlib.patches import Rectangle

    if len(maps) == 0:
        raise ValueError("no similarity maps to draw")
    imgs = np.asarray(images, dtype=np.float32).reshape(len(maps), *maps.shape[1:])
    d = maps.ndim - 1
    panels = [
        _planes(imgs[i], maps[i], np.asarray(boxes[i] if boxes is not None else [], float).reshape(-1, 2 * d))
        for i in range(len(maps))
    ]
    per = len(panels[0]) if panels else 1
    if per == 1:
        fig, axs = _grid(len(panels), ncols)
        axs = axs[: len(panels)].reshape(-1, 1)
    else:
        fig = Figure(figsize=(10, 3.4 * len(panels)), dpi=90, layout="constrained")
        axs = np.asarray(fig.subplots(len(panels), per, squeeze=False))
    overlay = None
    lo, hi = float(np.nanmin(maps)), float(np.nanmax(maps))  # one colour scale for every panel
    for i, row in enumerate(panels):
        for k, (label, im, sm, pbs) in enumerate(row):
            ax = axs[i, k]
            extent = (0, im.shape[0], im.shape[1], 0)  # X across, Y down
            ax.imshow(im.T, cmap="gray", extent=extent, interpolation="nearest")
            overlay = ax.imshow(sm.T, cmap="jet", alpha=0.45, extent=extent, interpolation="bilinear", vmin=lo, vmax=hi)
            for (x, y, w, h), solid in pbs:
                ax.add_patch(Rectangle((x, y), w, h, fill=False, ec="lime", lw=1.5, ls="-" if solid else ":"))
            ax.set_xticks([])
            ax.set_yticks([])
            title = titles[i] if k == 0 else ""
            ax.set_title("\n".join(filter(None, [_wrap(title), label])), fontsize="small")
    if overlay is not None:
        fig.colorbar(overlay, ax=list(np.ravel(axs)), shrink=0.6, label="cosine similarity")
    return fig


def _wrap(text: str, width: int = 40) -> str:
    import textwrap

    return textwrap.fill(text, width) if text else ""


def image_figure(images: torch.Tensor | np.ndarray, titles: Sequence[str], ncols: int = 4) -> Figure:
    """Cached images ``[B, 1, *size]`` side by side (a 3D volume shows its middle axial slice)."""
    arr = np.asarray(images, dtype=np.float32)
    fig, axs = _grid(len(arr), ncols)
    for ax, im, title in zip(axs, arr, titles, strict=False):
        im = im[0]
        if im.ndim == 3:
            im = im[:, :, im.shape[2] // 2]
        ax.imshow(im.T, cmap="gray", extent=(0, im.shape[0], im.shape[1], 0), interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(_wrap(title), fontsize="small")
    return fig


def ground(
    ctx: RunContext, studies: Sequence[str], phrases: Sequence[str], boxes: Sequence[Any] | None = None
) -> Figure:
    """Heatmaps of each phrase over its study's image (one phrase per study; a study may repeat)."""
    images = study_images(ctx.cache, list(studies))
    maps = similarity_maps(ctx.model, images, list(phrases))
    return grounding_figure(images, maps, list(phrases), None if boxes is None else list(boxes))


def grounding_scores_figure(scores: pd.DataFrame) -> Figure:
    """CNR and IoU of every annotated phrase, one column of points per finding, the mean as a red bar."""
    findings = sorted(scores["finding"].unique())
    fig = Figure(figsize=(max(6.0, 2.2 * len(findings) + 2), 3.6), dpi=90, layout="constrained")
    for ax, metric in zip(fig.subplots(1, 2), ("cnr", "iou"), strict=True):
        for j, name in enumerate(findings):
            vals = scores.loc[scores["finding"] == name, metric].to_numpy(float)
            vals = vals[np.isfinite(vals)]
            ax.scatter(np.full(len(vals), j) + np.linspace(-0.15, 0.15, len(vals)), vals, s=14, color="tab:blue")
            if len(vals):
                ax.hlines(vals.mean(), j - 0.3, j + 0.3, color="red", lw=2)
        ax.set_xticks(range(len(findings)), findings, rotation=20)
        ax.set(ylabel=metric.upper(), title=f"{metric.upper()} per annotated phrase")
    return fig
