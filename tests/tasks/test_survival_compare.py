"""The survival task: the cohort's own columns, an explicit tau, metrics that fail alone, training-median risk
groups and intervals that resample subjects."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from medvlp.tasks.bootstrap import bootstrap_ci
from medvlp.tasks.survival_compare import UNO_TAU_QUANTILE, compare_models, survival_data, survival_task
from medvlp.tasks.survival_metrics import concordance_index


def _cohort(n: int = 160, events: bool = True, seed: int = 0) -> tuple[np.ndarray, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    image = rng.normal(size=(n, 6))
    hazard = np.exp(1.5 * image[:, 0])
    t = rng.exponential(1 / hazard)
    records = pd.DataFrame(
        {
            "followup_days": np.minimum(t, 2.0) * 365,
            "deceased": ((t < 2.0) & events).astype(float),
            "age_years": rng.normal(60, 10, n),
            "subject": [f"sb-{i // 2}" for i in range(n)],  # two studies per patient
        }
    )
    return image, records


def test_the_cohorts_own_columns_and_an_explicit_tau() -> None:
    image, rec = _cohort()
    data = survival_data(
        image[:100],
        rec[:100],
        image[100:],
        rec[100:].reset_index(drop=True),
        ["age_years"],
        3,
        time="followup_days",
        event="deceased",
    )
    result = compare_models(data, n_boot=50)
    row = result.table.loc["image+covariates"]
    assert row["uno_tau"] == pytest.approx(np.quantile(data.time_train, UNO_TAU_QUANTILE))
    assert 0.5 < row["uno_c_index"] <= 1 and row["errors"] == {}
    with pytest.raises(ValueError, match=r"no column\(s\) \['time', 'event'\]"):
        survival_data(image[:100], rec[:100], image[100:], rec[100:], ["age_years"], 3)


def test_risk_groups_are_cut_at_the_training_median() -> None:
    image, rec = _cohort()
    train, test = rec[:100], rec[100:].reset_index(drop=True)
    data = survival_data(image[:100], train, image[100:] + 3.0, test, [], 3, "followup_days", "deceased")
    result = compare_models(data, n_boot=20)
    cox = result.models["image"]
    cut = float(np.median(cox.predict_risk(data.x_train)))
    risk = result.risks["image"]
    assert np.array_equal(result.groups["image"], (risk > cut).astype(int))
    assert result.groups["image"].mean() != 0.5  # a median split of the test risks would give exactly half


def test_a_metric_that_cannot_be_computed_fails_alone(caplog: pytest.LogCaptureFixture) -> None:
    image, rec = _cohort()
    test = rec[100:].reset_index(drop=True).copy()
    test.loc[3:, "deceased"] = 0.0  # three events left in the test split: too few for td-AUC and Brier
    data = survival_data(image[:100], rec[:100], image[100:], test, ["age_years"], 3, "followup_days", "deceased")
    with caplog.at_level("WARNING"):
        result = compare_models(data, n_boot=20)
    row = result.table.loc["image+covariates"]
    assert set(row["errors"]) == {"td_auc_mean", "integrated_brier"}
    assert "too few" in row["errors"]["td_auc_mean"] and "not computed" in caplog.text
    assert math.isfinite(row["c_index"]) and math.isfinite(row["uno_c_index"]) and math.isfinite(row["logrank_p"])


def test_intervals_resample_subjects_not_studies() -> None:
    rng = np.random.default_rng(0)
    t = np.repeat(rng.exponential(1.0, 60), 4)  # every patient imaged four times: four identical rows
    risk = np.repeat(rng.normal(size=60), 4) - 0.5 * np.log(t)
    e = np.ones_like(t)
    subjects = np.repeat(np.arange(60), 4)
    _, lo_rows, hi_rows = bootstrap_ci(concordance_index, t, risk, e, n_boot=300, seed=1)
    est, lo, hi = bootstrap_ci(concordance_index, t, risk, e, n_boot=300, seed=1, groups=subjects)
    assert lo < est < hi and (hi - lo) > 1.5 * (hi_rows - lo_rows)  # studies of a patient are not independent
    with pytest.raises(ValueError, match="groups"):
        bootstrap_ci(concordance_index, t, risk, e, groups=subjects[:10])


def test_survival_task_reads_the_columns_from_the_cache() -> None:
    from types import SimpleNamespace

    image, rec = _cohort()
    rec["study"] = [f"st-{i}" for i in range(len(rec))]
    summary = {"survival": True, "survival_columns": {"time": "followup_days", "event": "deceased"}}
    cache = SimpleNamespace(summary=summary | {"covariates": ["age_years"]})
    train = SimpleNamespace(image=image[:100], records=rec[:100])
    test = SimpleNamespace(image=image[100:], records=rec[100:].reset_index(drop=True))
    metrics, _, _ = survival_task(cache, train, test, n_boot=20)
    assert metrics["columns"] == {"time": "followup_days", "event": "deceased", "covariates": ["age_years"]}
    assert metrics["c_index"] == metrics["image+covariates"]["c_index"] and "gain_from_image" in metrics
    cache.summary = {"survival": False}
    assert survival_task(cache, train, test) == (None, None, None)
