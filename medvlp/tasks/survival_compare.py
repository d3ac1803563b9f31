"""The survival task: does the image add information? Cox models on image components plus covariates.

The image embeddings are reduced to their first principal components (fitted on the training split), a Cox model
is fitted on the training split for each feature set (image+covariates, covariates, image), and the test split
gives, per model: Harrell's C with a subject-level bootstrap interval, Uno's C truncated at an explicit ``tau``,
the mean time-dependent AUC, the integrated Brier score and the log-rank test of two risk groups cut at the
*training* median risk; plus a paired bootstrap of the gain in C from adding the image. Each metric is computed on
its own: one that cannot be (too few events, say) is recorded with its reason and logged, the others stand.

Time, event and covariate columns are the cohort's own (``survival: {time: followup_days, event: deceased}`` in
its YAML), read from the cache. The card, the notebook and the benchmarks all call :func:`survival_task`.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from medvlp.tasks.bootstrap import bootstrap_ci
from medvlp.tasks.survival import CoxPH, logrank_test
from medvlp.tasks.survival_metrics import (
    concordance_index,
    integrated_brier_score,
    time_dependent_auc,
    uno_c_index,
)

logger = logging.getLogger(__name__)

__all__ = ["SurvivalData", "SurvivalResult", "compare_models", "survival_columns", "survival_data", "survival_task"]

MODELS = ("image+covariates", "covariates", "image")
GAIN = "gain from image"
UNO_TAU_QUANTILE = 0.9  # Uno's C is truncated at this quantile of the training follow-up times


@dataclass
class SurvivalData:
    """Train and test design matrices (image components ``pc1..pck`` and covariates), times, events, subjects."""

    x_train: pd.DataFrame
    x_test: pd.DataFrame
    time_train: np.ndarray
    event_train: np.ndarray
    time_test: np.ndarray
    event_test: np.ndarray
    image_features: list[str]
    covariates: list[str]
    subject_test: np.ndarray | None = None

    def feature_sets(self) -> dict[str, list[str]]:
        """The models compared: image+covariates, covariates, image (a set left out when it is empty)."""
        sets = {
            MODELS[0]: self.image_features + self.covariates,
            MODELS[1]: self.covariates,
            MODELS[2]: self.image_features,
        }
        return {k: v for k, v in sets.items() if v}


@dataclass
class SurvivalResult:
    """What :func:`compare_models` found: the table, and per model the test risks, risk groups and fitted model."""

    table: pd.DataFrame
    risks: dict[str, np.ndarray] = field(default_factory=dict)
    groups: dict[str, np.ndarray] = field(default_factory=dict)
    models: dict[str, CoxPH] = field(default_factory=dict)


def survival_columns(summary: dict[str, Any]) -> tuple[str, str] | None:
    """The cohort's ``(time, event)`` columns from a cache's ``summary.json``; None for a cohort without survival."""
    cols = summary.get("survival_columns")
    if isinstance(cols, dict):
        return str(cols["time"]), str(cols["event"])
    return ("time", "event") if summary.get("survival") else None


def survival_data(
    train_image: np.ndarray,
    train_records: pd.DataFrame,
    test_image: np.ndarray,
    test_records: pd.DataFrame,
    covariates: Sequence[str],
    n_components: int = 8,
    time: str = "time",
    event: str = "event",
    subject: str = "subject",
) -> SurvivalData:
    """Design matrices from image embeddings ``[N, E]`` and the records' covariate, time and event columns.

    Rows missing a time, event or covariate are left out. The PCA is fitted on the training rows only.

    Raises:
        ValueError: a named column is missing, or too few subjects have survival data.
    """
    from sklearn.decomposition import PCA

    cov = list(covariates)
    for name, rec in (("train", train_records), ("test", test_records)):
        missing = [c for c in (time, event, *cov) if c not in rec.columns]
        if missing:
            raise ValueError(f"the {name} records have no column(s) {missing} (survival time, event, covariates)")
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

    subjects = test_records.loc[ok_te, subject].to_numpy() if subject in test_records.columns else None
    return SurvivalData(
        frame(train_image, train_records, ok_tr),
        frame(test_image, test_records, ok_te),
        train_records.loc[ok_tr, time].to_numpy(float),
        train_records.loc[ok_tr, event].to_numpy(float),
        test_records.loc[ok_te, time].to_numpy(float),
        test_records.loc[ok_te, event].to_numpy(float),
        feats,
        cov,
        subjects,
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


def _eval_times(data: SurvivalData) -> np.ndarray:
    t, e = data.time_test, data.event_test
    if (e == 1).sum() < 4:
        raise ValueError(f"{int((e == 1).sum())} test events: too few for time-dependent metrics (4 needed)")
    times = np.unique(np.quantile(t[e == 1], [0.25, 0.5, 0.75]))
    times = times[(times > t.min()) & (times < min(data.time_train.max(), t.max()))]
    if len(times) < 2:
        raise ValueError("fewer than two evaluation times inside the shared follow-up")
    return times


def _one_model(data: SurvivalData, cols: list[str], penalizer: float, boot: dict[str, Any]) -> tuple[dict, ...]:
    t, e = data.time_test, data.event_test
    cox = CoxPH(penalizer=penalizer).fit(data.x_train[cols], data.time_train, data.event_train)
    risk = cox.predict_risk(data.x_test[cols])
    cut = float(np.median(cox.predict_risk(data.x_train[cols])))
    groups = (risk > cut).astype(int)
    row: dict[str, Any] = {"n_features": len(cols), "risk_cut": cut}
    errors: dict[str, str] = {}

    def attempt(name: str, fn: Callable[[], dict[str, Any]]) -> None:
        try:
            row.update(fn())
        except (ValueError, np.linalg.LinAlgError) as exc:
            errors[name] = str(exc)

    def harrell() -> dict[str, Any]:
        (c, lo, hi), used = _bootstrap(concordance_index, t, risk, e, groups=data.subject_test, **boot)
        return {"c_index": c, "ci_low": lo, "ci_high": hi, "resamples": used}

    def uno() -> dict[str, Any]:
        tau = float(np.quantile(data.time_train, UNO_TAU_QUANTILE))
        return {"uno_c_index": uno_c_index(data.time_train, data.event_train, t, risk, e, tau=tau), "uno_tau": tau}

    def td_auc() -> dict[str, Any]:
        times = _eval_times(data)
        return {"td_auc_mean": time_dependent_auc(data.time_train, data.event_train, t, risk, e, times)[1]}

    def brier() -> dict[str, Any]:
        times = _eval_times(data)
        surv = cox.predict_survival(data.x_test[cols], times)
        return {"integrated_brier": integrated_brier_score(data.time_train, data.event_train, t, e, surv, times)}

    def logrank() -> dict[str, Any]:
        if len(np.unique(groups)) < 2:
            raise ValueError("every test subject falls on one side of the training median risk")
        return {"logrank_p": logrank_test(t, e, groups)["p_value"]}

    for name, fn in (("c_index", harrell), ("uno_c_index", uno), ("td_auc_mean", td_auc)):
        attempt(name, fn)
    attempt("integrated_brier", brier)
    attempt("logrank_p", logrank)
    return row, errors, risk, groups, cox


def compare_models(
    data: SurvivalData, penalizer: float = 0.1, n_boot: int = 500, alpha: float = 0.05, seed: int = 0
) -> SurvivalResult:
    """Fit a Cox model per feature set on the training split and score it on the test split.

    Returns:
        A :class:`SurvivalResult` whose table has one row per model (``c_index, ci_low, ci_high, resamples,
        uno_c_index, uno_tau, td_auc_mean, integrated_brier, logrank_p, n_features, risk_cut, errors``) and, when
        both exist, a row ``"gain from image"``: image+covariates minus covariates, paired bootstrap by subject.
    """
    boot = {"n_boot": n_boot, "alpha": alpha, "seed": seed}
    res = SurvivalResult(pd.DataFrame())
    rows: dict[str, dict[str, Any]] = {}
    for name, cols in data.feature_sets().items():
        row, errors, risk, groups, cox = _one_model(data, cols, penalizer, boot)
        for metric, reason in errors.items():
            logger.warning("survival %s: %s not computed: %s", name, metric, reason)
        rows[name] = row | {"errors": errors}
        res.risks[name], res.groups[name], res.models[name] = risk, groups, cox
    if {MODELS[0], MODELS[1]} <= set(res.risks):
        t, e = data.time_test, data.event_test

        def gain(time: np.ndarray, r1: np.ndarray, r0: np.ndarray, event: np.ndarray) -> float:
            return concordance_index(time, r1, event) - concordance_index(time, r0, event)

        try:
            (d, lo, hi), used = _bootstrap(
                gain, t, res.risks[MODELS[0]], res.risks[MODELS[1]], e, groups=data.subject_test, **boot
            )
            rows[GAIN] = {"c_index": d, "ci_low": lo, "ci_high": hi, "resamples": used, "errors": {}}
        except ValueError as exc:
            logger.warning("survival: the gain from the image not computed: %s", exc)
            rows[GAIN] = {"errors": {"c_index": str(exc)}}
    res.table = pd.DataFrame(rows).T.rename_axis("model")
    return res


def survival_task(
    cache: Any,
    train: Any,
    test: Any,
    n_components: int = 8,
    penalizer: float = 0.1,
    n_boot: int = 200,
    seed: int = 0,
) -> tuple[dict[str, Any] | None, SurvivalData | None, SurvivalResult | None]:
    """The survival numbers of a cohort cache's split embeddings (:class:`medvlp.tasks.embed.SplitEmbeddings`).

    Returns:
        ``(metrics, data, result)``: ``metrics`` as ``metrics.json`` keeps them (``n_train``, ``n_test``,
        ``features``, ``columns``, one entry per model with its numbers and ``errors``, ``gain_from_image``, and
        ``c_index`` of image+covariates, or of the image alone without covariates); all None for a cohort without
        survival data.
    """
    cols = survival_columns(cache.summary)
    if cols is None:
        return None, None, None
    covariates = list(cache.summary.get("covariates") or [])
    data = survival_data(
        train.image, train.records, test.image, test.records, covariates, n_components, time=cols[0], event=cols[1]
    )
    result = compare_models(data, penalizer=penalizer, n_boot=n_boot, seed=seed)
    metrics: dict[str, Any] = {
        "n_train": len(data.time_train),
        "n_test": len(data.time_test),
        "features": data.image_features + data.covariates,
        "columns": {"time": cols[0], "event": cols[1], "covariates": covariates},
    }
    for name, row in result.table.iterrows():
        clean = {k: v for k, v in row.items() if not (isinstance(v, float) and np.isnan(v))}
        metrics["gain_from_image" if name == GAIN else str(name)] = clean
    head = metrics.get(MODELS[0]) or metrics.get(MODELS[2]) or {}
    metrics["c_index"] = head.get("c_index")
    return metrics, data, result
