"""Does the image add information? Cox models on image-embedding components plus covariates, against covariates.

The image embeddings are reduced to their first principal components (fitted on the training split), a Cox model
is fitted on the training split for each feature set, and the test split gives Harrell's C with a percentile
bootstrap interval, plus a paired bootstrap of the difference in C between the image+covariates and the
covariates-only model (the same resamples for both, so the interval is that of the gain itself).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from medvlp.tasks.survival import CoxPH, bootstrap_ci, concordance_index, logrank_test, plot_kaplan_meier, risk_groups

__all__ = ["SurvivalData", "c_index_figure", "compare_models", "kaplan_meier_figure", "survival_data"]


@dataclass
class SurvivalData:
    """Train and test design matrices (image components ``pc1..pck`` and covariates) with times and events."""

    x_train: pd.DataFrame
    x_test: pd.DataFrame
    time_train: np.ndarray
    event_train: np.ndarray
    time_test: np.ndarray
    event_test: np.ndarray
    image_features: list[str]
    covariates: list[str]

    def feature_sets(self) -> dict[str, list[str]]:
        """The models compared: image+covariates, covariates, image (a set left out when it is empty)."""
        sets = {
            "image+covariates": self.image_features + self.covariates,
            "covariates": self.covariates,
            "image": self.image_features,
        }
        return {k: v for k, v in sets.items() if v}


def survival_data(
    train_image: np.ndarray,
    train_records: pd.DataFrame,
    test_image: np.ndarray,
    test_records: pd.DataFrame,
    covariates: Sequence[str],
    n_components: int = 8,
    time: str = "time",
    event: str = "event",
) -> SurvivalData:
    """Design matrices from image embeddings ``[N, E]`` and the records' covariate, time and event columns.

    Rows missing a time, event or covariate are left out. The PCA is fitted on the training rows only.
    """
    from sklearn.decomposition import PCA

    cov = list(covariates)
    ok_tr = train_records[[time, event, *cov]].notna().all(axis=1).to_numpy()
    ok_te = test_records[[time, event, *cov]].notna().all(axis=1).to_numpy()
    if ok_tr.sum() < 3 or ok_te.sum() < 2:
        raise ValueError(f"too few subjects with survival data: {int(ok_tr.sum())} train, {int(ok_te.sum())} test")
    k = max(0, min(int(n_components), train_image.shape[1], int(ok_tr.sum()) - 1))
    feats = [f"pc{i + 1}" for i in range(k)]
    pca = PCA(n_components=k, random_state=0).fit(train_image[ok_tr]) if k else None

    def frame(image: np.ndarray, rec: pd.DataFrame, ok: np.ndarray) -> pd.DataFrame:
        z = pd.DataFrame(pca.transform(image[ok]) if pca is not None else np.zeros((ok.sum(), 0)), columns=feats)
        return pd.concat([z, rec.loc[ok, cov].reset_index(drop=True).astype(float)], axis=1)

    return SurvivalData(
        frame(train_image, train_records, ok_tr),
        frame(test_image, test_records, ok_te),
        train_records.loc[ok_tr, time].to_numpy(float),
        train_records.loc[ok_tr, event].to_numpy(float),
        test_records.loc[ok_te, time].to_numpy(float),
        test_records.loc[ok_te, event].to_numpy(float),
        feats,
        cov,
    )


def _bootstrap(fn: Callable[..., float], *arrays: np.ndarray, **kwargs: Any) -> tuple[tuple[float, ...], int]:
    """:func:`bootstrap_ci`, with the number of usable resamples instead of a warning about the dropped ones."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        out = bootstrap_ci(fn, *arrays, **kwargs)
    dropped = 0
    for w in caught:
        m = re.match(r"(\d+) of \d+ bootstrap resamples were dropped", str(w.message))
        if m:
            dropped = int(m.group(1))
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return out, int(kwargs["n_boot"]) - dropped


def compare_models(
    data: SurvivalData, penalizer: float = 0.1, n_boot: int = 500, alpha: float = 0.05, seed: int = 0
) -> tuple[pd.DataFrame, dict[str, np.ndarray], dict[str, CoxPH]]:
    """Fit a Cox model per feature set; C-index on the test split with bootstrap intervals.

    Returns:
        A table (one row per model: ``c_index, ci_low, ci_high``, ``resamples`` (bootstrap resamples usable: one
        without a comparable pair is dropped), ``logrank_p`` of a median split, ``n_features``; and, when both
        exist, a row ``"gain from image"``: image+covariates minus covariates, paired bootstrap), the test risks
        per model, and the fitted models.
    """
    t, e = data.time_test, data.event_test
    rows, risks, models = {}, {}, {}
    for name, cols in data.feature_sets().items():
        cox = CoxPH(penalizer=penalizer).fit(data.x_train[cols], data.time_train, data.event_train)
        risk = cox.predict_risk(data.x_test[cols])
        (c, lo, hi), used = _bootstrap(concordance_index, t, risk, e, n_boot=n_boot, alpha=alpha, seed=seed)
        p = logrank_test(t, e, risk_groups(risk, 2))["p_value"] if len(np.unique(risk)) > 1 else float("nan")
        rows[name] = {"c_index": c, "ci_low": lo, "ci_high": hi, "resamples": used, "logrank_p": p}
        rows[name]["n_features"] = len(cols)
        risks[name], models[name] = risk, cox
    if {"image+covariates", "covariates"} <= set(risks):

        def gain(time: np.ndarray, r1: np.ndarray, r0: np.ndarray, event: np.ndarray) -> float:
            return concordance_index(time, r1, event) - concordance_index(time, r0, event)

        (d, lo, hi), used = _bootstrap(
            gain, t, risks["image+covariates"], risks["covariates"], e, n_boot=n_boot, alpha=alpha, seed=seed
        )
        rows["gain from image"] = {"c_index": d, "ci_low": lo, "ci_high": hi, "resamples": used}
    return pd.DataFrame(rows).T.rename_axis("model"), risks, models


def c_index_figure(table: pd.DataFrame) -> Figure:
    """C-index with its bootstrap interval per model (the gain row on its own axis, 0 = no gain)."""
    models = table.drop(index="gain from image", errors="ignore")
    has_gain = "gain from image" in table.index
    fig = Figure(figsize=(9 if has_gain else 5.5, 3.6), dpi=90, layout="constrained")
    axs = fig.subplots(1, 2 if has_gain else 1, squeeze=False, gridspec_kw={"width_ratios": [3, 1.4][: 1 + has_gain]})
    ax = axs[0, 0]
    y = np.arange(len(models))
    c = models["c_index"].to_numpy(float)
    err = np.abs(np.vstack([c - models["ci_low"].to_numpy(float), models["ci_high"].to_numpy(float) - c]))
    ax.errorbar(c, y, xerr=err, fmt="o", capsize=4)
    ax.axvline(0.5, ls="--", color="grey", lw=1)
    ax.set_yticks(y, list(models.index))
    ax.set(xlabel="Harrell's C (test split)", title="C-index with bootstrap interval")
    if has_gain:
        g = table.loc["gain from image"]
        gx = axs[0, 1]
        gx.errorbar([g["c_index"]], [0], xerr=[[g["c_index"] - g["ci_low"]], [g["ci_high"] - g["c_index"]]], fmt="o")
        gx.axvline(0.0, ls="--", color="grey", lw=1)
        gx.set_yticks([0], ["image+cov\n- cov"])
        gx.set(xlabel="difference in C", title="Gain from the image")
    return fig


def kaplan_meier_figure(
    time: np.ndarray, event: np.ndarray, risks: Mapping[str, np.ndarray], n_groups: int = 2
) -> Figure:
    """Kaplan-Meier curves of risk groups (median split by default) per model, log-rank p in each title."""
    names = [n for n in risks if len(np.unique(risks[n])) > 1]
    fig = Figure(figsize=(5.2 * max(1, len(names)), 4), dpi=90, layout="constrained")
    axs = np.atleast_1d(fig.subplots(1, max(1, len(names)), squeeze=False)).ravel()
    labels = ["low risk", "high risk"] if n_groups == 2 else [f"risk group {k + 1}" for k in range(n_groups)]
    for ax, name in zip(axs, names, strict=False):
        groups = risk_groups(risks[name], n_groups)
        present = [labels[g] for g in np.unique(groups)]
        plot_kaplan_meier(time, event, groups, ax=ax, labels=present)
        ax.set_title(f"{name}\n{ax.get_title()}", fontsize="small")
    return fig
