"""Figures of the joint embedding space: the modality gap and a 2-D map coloured by finding."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from medvlp.tasks.embeddings import _unit, modality_gap

__all__ = ["embedding_map_figure", "modality_gap_figure"]


def modality_gap_figure(image_emb: np.ndarray, text_emb: np.ndarray) -> Figure:
    """Histograms of cosine similarity (matched pairs, other pairs, within each modality) and a PCA of both."""
    from sklearn.decomposition import PCA

    img, txt = _unit(image_emb), _unit(text_emb)
    n = len(img)
    off = ~np.eye(n, dtype=bool)
    cross = img @ txt.T
    fig = Figure(figsize=(11, 4), dpi=90, layout="constrained")
    hist, scatter = fig.subplots(1, 2)
    bins = np.linspace(-1, 1, 41)
    for values, label in (
        (np.diag(cross), "image vs own report"),
        (cross[off], "image vs other reports"),
        ((img @ img.T)[off], "image vs image"),
        ((txt @ txt.T)[off], "report vs report"),
    ):
        hist.hist(values, bins=bins, density=True, histtype="step", lw=1.5, label=label)
    gap = modality_gap(image_emb, text_emb)["gap"]
    hist.set(xlabel="cosine similarity", ylabel="density", title=f"Similarities (modality gap {gap:.3f})")
    hist.legend(fontsize="small")
    z = PCA(n_components=2, random_state=0).fit_transform(np.vstack([img, txt]))
    for i in range(n):
        scatter.plot(z[[i, n + i], 0], z[[i, n + i], 1], color="lightgrey", lw=0.6, zorder=0)
    scatter.scatter(z[:n, 0], z[:n, 1], s=14, label="images")
    scatter.scatter(z[n:, 0], z[n:, 1], s=14, marker="^", label="reports")
    scatter.set(xlabel="PC 1", ylabel="PC 2", title="Both modalities, PCA (grey: true pairs)")
    scatter.legend(fontsize="small")
    return fig


def embedding_map_figure(coords: pd.DataFrame, labels: np.ndarray, findings: Sequence[str], ncols: int = 4) -> Figure:
    """One panel per finding: the map coloured positive / negative / uncertain or unknown, marker by modality."""
    lab = np.asarray(labels, dtype=np.float64).reshape(-1, len(findings))
    ncols = max(1, min(ncols, len(findings)))
    nrows = -(-len(findings) // ncols)
    fig = Figure(figsize=(3.6 * ncols, 3.4 * nrows), dpi=90, layout="constrained")
    axs = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    colors = {"positive": "tab:red", "negative": "tab:blue", "uncertain/unknown": "lightgrey"}
    markers = {"image": "o", "report": "^"}
    for j, (ax, name) in enumerate(zip(axs, findings, strict=False)):
        y = lab[coords["item"].to_numpy(), j]
        status = np.where(y == 1, "positive", np.where(y == 0, "negative", "uncertain/unknown"))
        for modality, marker in markers.items():
            for s, color in colors.items():
                m = (coords["modality"].to_numpy() == modality) & (status == s)
                if m.any():
                    ax.scatter(coords["x"][m], coords["y"][m], s=14, c=color, marker=marker)
        ax.set_title(name, fontsize="small")
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axs[len(findings) :]:
        ax.set_axis_off()
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], ls="", marker=m, color="grey", label=k) for k, m in markers.items()]
    handles += [Line2D([], [], ls="", marker="s", color=c, label=k) for k, c in colors.items()]
    fig.legend(handles=handles, loc="outside right center", fontsize="small")
    return fig
