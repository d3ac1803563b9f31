"""Survival analysis: parity with lifelines / scikit-survival / R on real datasets, exact metrics, bad inputs."""

from __future__ import annotations

import warnings
from itertools import product

import numpy as np
import pandas as pd
import pytest
from lifelines import CoxPHFitter, KaplanMeierFitter
from lifelines.datasets import load_gbsg2, load_lung, load_rossi
from lifelines.statistics import logrank_test as ll_logrank_test
from lifelines.statistics import multivariate_logrank_test
from lifelines.utils import concordance_index as ll_concordance_index
from scipy import stats
from sksurv.linear_model import CoxPHSurvivalAnalysis
from sksurv.metrics import (
    concordance_index_censored,
    concordance_index_ipcw,
    cumulative_dynamic_auc,
)
from sksurv.metrics import integrated_brier_score as sk_integrated_brier_score
from sksurv.util import Surv

from medvlp.tasks.survival import (
    CoxPH,
    bootstrap_ci,
    concordance_index,
    integrated_brier_score,
    kaplan_meier,
    logrank_test,
    plot_kaplan_meier,
    risk_groups,
    time_dependent_auc,
    uno_c_index,
)

LUNG_COLS = ["age", "sex", "ph.ecog", "ph.karno", "pat.karno", "meal.cal", "wt.loss"]
# lifelines' fit_options that make its Newton-Raphson (and its smoothed |b|) converge fully
TIGHT = {"precision": 1e-14, "r_precision": 1e-15, "max_steps": 1000}


def _rossi() -> tuple[pd.DataFrame, pd.Series, pd.Series]:
    df = load_rossi()
    return df.drop(columns=["week", "arrest"]), df["week"], df["arrest"]


def _lung() -> tuple[pd.DataFrame, pd.Series, pd.Series]:
    df = load_lung().dropna(subset=["time", "status", *LUNG_COLS])
    return df[LUNG_COLS], df["time"], df["status"]


def _gbsg2() -> tuple[pd.DataFrame, pd.Series, pd.Series]:
    df = load_gbsg2()
    df = df.assign(
        horTh=(df["horTh"] == "yes").astype(int),
        menostat=(df["menostat"] == "Post").astype(int),
        tgrade=df["tgrade"].map({"I": 1, "II": 2, "III": 3}).astype(int),
    )
    return df.drop(columns=["time", "cens"]), df["time"], df["cens"]


DATASETS = {"rossi": _rossi, "lung": _lung, "gbsg2": _gbsg2}


def _lifelines_fit(x: pd.DataFrame, t: pd.Series, e: pd.Series, **kw: object) -> CoxPHFitter:
    fit_options = kw.pop("fit_options", None)
    df = x.assign(_T=t.to_numpy(), _E=e.to_numpy())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return CoxPHFitter(**kw).fit(df, "_T", "_E", fit_options=fit_options)


# ----------------------------------------------------------------------------------------------- Cox: references
def test_rossi_matches_r_and_lifelines_documentation() -> None:
    # R (survival 3.x), Efron ties (R's default), Fox & Weisberg's recidivism example:
    #   coxph(Surv(week, arrest) ~ fin + age + race + wexp + mar + paro + prio, data = Rossi)
    #          coef exp(coef) se(coef)
    #   fin  -0.37942   0.68426  0.19138
    #   age  -0.05744   0.94418  0.02200
    #   race  0.31390   1.36875  0.30799
    #   wexp -0.14980   0.86088  0.21222
    #   mar  -0.43370   0.64810  0.38187
    #   paro -0.08487   0.91863  0.19576
    #   prio  0.09150   1.09581  0.02865
    #   Likelihood ratio test = 33.27 on 7 df
    # lifelines docs (CoxPHFitter quickstart on load_rossi): fin -0.38, age -0.06, race 0.31, wexp -0.15, mar -0.43,
    # paro -0.08, prio 0.09; log-likelihood = -658.75; Concordance = 0.64; log-likelihood ratio test = 33.27 on 7 df.
    x, t, e = _rossi()
    m = CoxPH().fit(x, t, e)
    r_coef = {"fin": -0.37942, "age": -0.05744, "race": 0.31390, "wexp": -0.14980, "mar": -0.43370, "paro": -0.08487,
              "prio": 0.09150}  # fmt: skip
    r_se = [0.19138, 0.02200, 0.30799, 0.21222, 0.38187, 0.19576, 0.02865]
    assert m.feature_names_ == list(r_coef)
    np.testing.assert_allclose(m.coef_, list(r_coef.values()), atol=1e-4, rtol=0)
    np.testing.assert_allclose(m.se_, r_se, atol=1e-4, rtol=0)
    assert m.log_likelihood_ == pytest.approx(-658.75, abs=5e-3)
    assert 2 * (m.log_likelihood_ - m.log_likelihood_null_) == pytest.approx(33.27, abs=5e-3)
    assert m.concordance_ == pytest.approx(0.64, abs=5e-3)
    assert m.converged_ and m.n_iter_ < 20
    assert list(m.summary.index) == list(r_coef)


@pytest.mark.parametrize(("name", "penalty"), list(product(DATASETS, [(0.0, 0.0), (0.1, 0.0), (0.1, 0.5)])))
def test_cox_matches_lifelines(name: str, penalty: tuple[float, float]) -> None:
    penalizer, l1_ratio = penalty
    x, t, e = DATASETS[name]()
    m = CoxPH(penalizer=penalizer, l1_ratio=l1_ratio).fit(x, t, e)
    ref = _lifelines_fit(x, t, e, penalizer=penalizer, l1_ratio=l1_ratio)
    # lifelines with its default stopping rule (relative log-lik change < 1e-9, ~1e-6 from the optimum here)
    np.testing.assert_allclose(m.coef_, ref.params_.to_numpy(), atol=1e-5, rtol=0)
    # lifelines reports the PENALISED log-likelihood; with l1_ratio > 0 its smoothed |b| needs more iterations
    ll = m.log_likelihood_ if penalizer == 0 else m.penalized_log_likelihood_
    if l1_ratio == 0:
        np.testing.assert_allclose(m.se_, ref.standard_errors_.to_numpy(), atol=1e-4, rtol=0)
        assert ll == pytest.approx(ref.log_likelihood_, abs=1e-6)
    # lifelines run to full convergence: same optimum, standard errors and objective
    tight = _lifelines_fit(x, t, e, penalizer=penalizer, l1_ratio=l1_ratio, fit_options=TIGHT)
    np.testing.assert_allclose(m.coef_, tight.params_.to_numpy(), atol=1e-8, rtol=0)
    np.testing.assert_allclose(m.se_, tight.standard_errors_.to_numpy(), atol=1e-5, rtol=0)
    assert ll == pytest.approx(tight.log_likelihood_, abs=1e-6)
    np.testing.assert_allclose(m.predict_risk(x), ref.predict_partial_hazard(x).to_numpy(), rtol=1e-4)
    np.testing.assert_allclose(
        m.baseline_cumulative_hazard_.to_numpy(), tight.baseline_cumulative_hazard_.to_numpy().ravel(), rtol=1e-6
    )
    assert m.concordance_ == pytest.approx(ll_concordance_index(t, -m.predict_risk(x), e), abs=1e-12)
    if l1_ratio == 0:  # exact zeros (ours) vs ~1e-13 (lifelines) can turn risk ties into non-ties
        assert m.concordance_ == pytest.approx(tight.concordance_index_, abs=1e-12)
    if l1_ratio > 0:
        assert (m.coef_ == 0).any(), "the exact L1 solution should zero some coefficients"


def test_cox_survival_prediction_matches_lifelines_and_sksurv() -> None:
    x, t, e = _rossi()
    m = CoxPH().fit(x, t, e)
    ref = _lifelines_fit(x, t, e, fit_options=TIGHT)
    times = np.unique(t)  # lifelines interpolates between training times; compare on them
    lp = ref.predict_survival_function(x.iloc[:50], times=times).to_numpy().T
    np.testing.assert_allclose(m.predict_survival(x.iloc[:50], times), lp, atol=1e-7)
    np.testing.assert_array_equal(m.baseline_cumulative_hazard_.index.to_numpy(), times)
    y = Surv.from_arrays(e.astype(bool), t)
    grid = np.linspace(t.min(), t.max(), 41)  # sksurv clips times before the first one, so start there
    for ties in ("efron", "breslow"):
        sk = CoxPHSurvivalAnalysis(ties=ties).fit(x.astype(float), y)
        mm = CoxPH(ties=ties).fit(x, t, e)
        np.testing.assert_allclose(mm.coef_, sk.coef_, atol=1e-6)
        sk_surv = np.array([f(grid) for f in sk.predict_survival_function(x.astype(float))])
        np.testing.assert_allclose(mm.predict_survival(x, grid), sk_surv, atol=1e-6)


def test_cox_array_input_penalized_constant_column_and_recovery() -> None:
    x, t, e = _rossi()
    m_df = CoxPH().fit(x, t, e)
    m_np = CoxPH().fit(x.to_numpy(), t.to_numpy(), e.to_numpy().astype(bool))
    np.testing.assert_allclose(m_np.coef_, m_df.coef_, atol=1e-12)
    assert m_np.feature_names_ == [f"x{j}" for j in range(7)]
    np.testing.assert_allclose(m_df.predict_risk(x[x.columns[::-1]]), m_df.predict_risk(x), rtol=1e-12)
    pen = CoxPH(penalizer=0.1).fit(x.assign(const=3.0), t, e)
    assert pen.coef_[-1] == 0 and np.isnan(pen.se_[-1])
    np.testing.assert_allclose(pen.coef_[:-1], CoxPH(penalizer=0.1).fit(x, t, e).coef_, atol=1e-10)
    # known hazard h(t|x) = exp(x @ beta), independent exponential censoring, times rounded (ties)
    rng = np.random.default_rng(1)
    beta = np.array([0.8, -0.5, 0.0, 0.3])
    z = rng.normal(size=(20_000, 4))
    tt, cc = rng.exponential(1 / np.exp(z @ beta)), rng.exponential(1.5, size=20_000)
    fit = CoxPH().fit(z, np.round(np.minimum(tt, cc), 2), tt <= cc)
    assert np.abs(fit.coef_ - beta).max() < 4 * fit.se_.max()


# ----------------------------------------------------------------------------------------------- concordance
def _brute_c(t: np.ndarray, r: np.ndarray, e: np.ndarray) -> float:
    num = den = 0.0
    for i in np.flatnonzero(e):
        comp = (t > t[i]) | ((t == t[i]) & ~e)
        den += comp.sum()
        num += (r[i] > r[comp]).sum() + 0.5 * (r[i] == r[comp]).sum()
    return num / den


def test_concordance_hand_computed() -> None:
    # 5 subjects, events at t=1, 2, 4. Comparable pairs (i has the event, j is later):
    # (0,1..4) = 4 pairs, (1,2),(1,3),(1,4) = 3, (3,4) = 1 -> 8 pairs.
    t, e = np.array([1, 2, 3, 4, 5]), np.array([1, 1, 0, 1, 0])
    # risk 5 beats all 4; risk 3 beats 1 and 2 but not 4; risk 1 loses to 2: 6 / 8
    assert concordance_index(t, [5, 3, 4, 1, 2], e) == 0.75
    # subject 1 and 2 tied in risk: 4 + (0.5 + 1 + 1) + 0 = 6.5 / 8
    assert concordance_index(t, [5, 3, 3, 1, 2], e) == 0.8125
    # two events tied at t=2 are not comparable with each other: 4 + 2 + 2 + 1 = 9 pairs, 8 concordant
    assert concordance_index([1, 2, 2, 4, 5], [5, 3, 4, 1, 2], [1, 1, 1, 1, 0]) == pytest.approx(8 / 9)
    # a censored subject at an event's time is comparable with it (it was still event-free): 1 pair, concordant
    assert concordance_index([2, 2], [1, 0], [1, 0]) == 1.0
    assert concordance_index([1, 2, 3], [3, 2, 1]) == 1.0  # event=None: all events


@pytest.mark.parametrize("seed", range(6))
def test_concordance_random_ties_equals_lifelines_sksurv_bruteforce(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 400
    t = rng.integers(0, 25, n).astype(float)  # many ties in time
    r = rng.integers(0, 12, n).astype(float) if seed % 2 else np.round(rng.normal(size=n), 1)  # ties in risk
    e = rng.random(n) < 0.55
    c = concordance_index(t, r, e)
    assert c == pytest.approx(_brute_c(t, r, e), abs=1e-12)
    assert c == pytest.approx(ll_concordance_index(t, -r, e), abs=1e-12)
    assert c == pytest.approx(concordance_index_censored(e, t, r)[0], abs=1e-12)


@pytest.mark.parametrize("name", list(DATASETS))
def test_concordance_on_datasets_with_fitted_risks(name: str) -> None:
    x, t, e = DATASETS[name]()
    risk = CoxPH().fit(x, t, e).predict_risk(x)
    c = concordance_index(t, risk, e)
    assert c == pytest.approx(ll_concordance_index(t, -risk, e), abs=1e-12)
    assert c == pytest.approx(concordance_index_censored(e.to_numpy().astype(bool), t, risk)[0], abs=1e-12)


def test_concordance_is_n_log_n_at_200k() -> None:
    # An O(n^2) pair loop would need 2e10 comparisons here; this returns in well under a second. Without censoring
    # and with distinct times every pair is comparable and C = (1 - Kendall's tau(time, risk)) / 2 (O(n log n)).
    rng = np.random.default_rng(0)
    n = 200_000
    t = rng.exponential(size=n)
    r = -t + rng.normal(scale=2.0, size=n)
    c = concordance_index(t, r)
    assert c == pytest.approx((1 - stats.kendalltau(t, r).statistic) / 2, abs=1e-12)
    e = rng.random(n) < 0.6
    assert 0.5 < concordance_index(np.round(t, 3), np.round(r, 2), e) < 1.0


# ----------------------------------------------------------------------------------------------- IPCW metrics
@pytest.fixture(scope="module")
def gbsg2_split() -> dict[str, np.ndarray]:
    x, t, e = _gbsg2()
    idx = np.random.default_rng(0).permutation(len(t))
    tr, te = idx[:460], idx[460:]
    m = CoxPH().fit(x.iloc[tr], t.iloc[tr], e.iloc[tr])
    t_tr, e_tr, t_te, e_te = (a.to_numpy() for a in (t.iloc[tr], e.iloc[tr], t.iloc[te], e.iloc[te]))
    times = np.percentile(t_te[e_te == 1], np.linspace(10, 80, 15))
    return {
        "t_tr": t_tr, "e_tr": e_tr, "t_te": t_te, "e_te": e_te, "times": times,
        "risk": m.predict_risk(x.iloc[te]), "surv": m.predict_survival(x.iloc[te], times),
    }  # fmt: skip


def test_ipcw_metrics_match_sksurv_on_gbsg2(gbsg2_split: dict[str, np.ndarray]) -> None:
    d = gbsg2_split
    y_tr = Surv.from_arrays(d["e_tr"].astype(bool), d["t_tr"])
    y_te = Surv.from_arrays(d["e_te"].astype(bool), d["t_te"])
    args = (d["t_tr"], d["e_tr"], d["t_te"], d["risk"], d["e_te"])
    for tau in (None, 1500.0):
        assert uno_c_index(*args, tau=tau) == pytest.approx(
            concordance_index_ipcw(y_tr, y_te, d["risk"], tau)[0], abs=1e-8
        )
    auc, mean_auc = time_dependent_auc(*args, d["times"])
    sk_auc, sk_mean = cumulative_dynamic_auc(y_tr, y_te, d["risk"], d["times"])
    np.testing.assert_allclose(auc, sk_auc, atol=1e-8, rtol=0)
    assert mean_auc == pytest.approx(sk_mean, abs=1e-8)
    auc2d, _ = time_dependent_auc(*args[:3], np.log(d["surv"]) * -1, d["e_te"], d["times"])  # cumulative hazard
    np.testing.assert_allclose(auc2d, cumulative_dynamic_auc(y_tr, y_te, -np.log(d["surv"]), d["times"])[0], atol=1e-8)
    ibs = integrated_brier_score(d["t_tr"], d["e_tr"], d["t_te"], d["e_te"], d["surv"], d["times"])
    assert ibs == pytest.approx(sk_integrated_brier_score(y_tr, y_te, d["surv"], d["times"]), abs=1e-8)
    assert 0.05 < ibs < 0.3 and 0.6 < mean_auc < 0.8


# ----------------------------------------------------------------------------------------------- KM, log-rank, groups
def test_kaplan_meier_matches_lifelines() -> None:
    cases = [_rossi()[1:], ([3, 3, 5, 1, 8, 8], [1, 0, 1, 1, 0, 1]), ([0, 0, 5, 1], [1, 0, 1, 1])]
    for t, e in cases:
        km, ref = kaplan_meier(t, e), KaplanMeierFitter().fit(t, e)
        np.testing.assert_array_equal(km["timeline"], ref.survival_function_.index)
        np.testing.assert_allclose(km["survival"], ref.survival_function_.to_numpy().ravel(), atol=1e-12)
        np.testing.assert_array_equal(km["at_risk"], ref.event_table["at_risk"])
        np.testing.assert_array_equal(km["events"], ref.event_table["observed"])
        np.testing.assert_array_equal(km["censored"], ref.event_table["censored"])


def test_logrank_matches_lifelines_and_risk_groups() -> None:
    x, t, e = _rossi()
    risk = CoxPH().fit(x, t, e).predict_risk(x)
    two = risk_groups(risk)
    assert set(np.unique(two)) == {0, 1} and risk[two == 1].min() > risk[two == 0].max()
    res = logrank_test(t, e, two)
    ref = ll_logrank_test(t[two == 0], t[two == 1], e[two == 0], e[two == 1])
    assert res["df"] == 1
    assert res["statistic"] == pytest.approx(ref.test_statistic, rel=1e-10)
    assert res["p_value"] == pytest.approx(ref.p_value, rel=1e-8)
    three = risk_groups(risk, 3)
    assert np.bincount(three).tolist() == [144, 144, 144]
    labels = np.random.default_rng(0).choice(["a", "b", "c", "d"], len(t))
    for g in (three, labels, risk_groups(risk, [0.25, 0.75])):
        res, ref = logrank_test(t, e, g), multivariate_logrank_test(t, g, e)
        assert res["statistic"] == pytest.approx(ref.test_statistic, rel=1e-10)
        assert res["p_value"] == pytest.approx(ref.p_value, rel=1e-8)
        assert res["df"] == len(np.unique(g)) - 1


def test_plot_kaplan_meier(tmp_path) -> None:
    x, t, e = _rossi()
    g = risk_groups(CoxPH().fit(x, t, e).predict_risk(x))
    ax = plot_kaplan_meier(t, e, g, labels={0: "low", 1: "high"})
    p = logrank_test(t, e, g)["p_value"]
    assert f"{p:.3g}" in ax.get_title()
    assert [tx.get_text().split(" (")[0] for tx in ax.get_legend().get_texts()] == ["low", "high"]
    ax.figure.savefig(tmp_path / "km.png")
    assert (tmp_path / "km.png").stat().st_size > 0
    from matplotlib.figure import Figure

    ax2 = Figure().subplots()
    assert plot_kaplan_meier(t, e, None, ax=ax2) is ax2


def test_bootstrap_ci() -> None:
    x, t, e = _rossi()
    risk = CoxPH().fit(x, t, e).predict_risk(x)
    est, lo, hi = bootstrap_ci(concordance_index, t, risk, e, n_boot=200, seed=1)
    assert est == concordance_index(t, risk, e) and lo < est < hi and hi - lo < 0.15
    assert bootstrap_ci(concordance_index, t, risk, e, n_boot=200, seed=1) == (est, lo, hi)
    v = np.random.default_rng(0).normal(size=2000)
    _, lo, hi = bootstrap_ci(np.mean, v, n_boot=2000)
    assert (hi - lo) / 2 == pytest.approx(1.96 * v.std() / np.sqrt(v.size), rel=0.1)


# ----------------------------------------------------------------------------------------------- bad inputs
def test_bad_inputs_raise_clear_errors() -> None:
    x, t, e = _rossi()
    t_np, e_np = t.to_numpy(), e.to_numpy()
    cases = [
        (lambda: CoxPH().fit(x, t_np[:-1], e_np[:-1]), "rows but time has length"),
        (lambda: CoxPH().fit(x, t_np - 100, e_np), "non-negative"),
        (lambda: CoxPH().fit(x, t_np, e_np * 2), "only 0/1"),
        (lambda: CoxPH().fit(x, t_np, np.zeros_like(e_np)), "no events"),
        (lambda: CoxPH().fit(x, np.r_[np.nan, t_np[1:]], e_np), "time contains NaN"),
        (lambda: CoxPH().fit(x.assign(age=np.r_[np.nan, x["age"].to_numpy()[1:]]), t, e), r"NaN.*\['age'\]"),
        (lambda: CoxPH().fit(x.assign(one=1), t, e), r"constant column\(s\) \['one'\].*penalizer > 0"),
        (lambda: CoxPH().fit(x.assign(age2=2 * x["age"]), t, e), "collinear"),
        (lambda: CoxPH().fit(x.assign(s="a"), t, e), "non-numeric"),
        (lambda: CoxPH(ties="exact").fit(x, t, e), "ties"),
        (lambda: CoxPH(l1_ratio=1.5).fit(x, t, e), "l1_ratio"),
        (lambda: CoxPH(penalizer=-1).fit(x, t, e), "penalizer"),
        (lambda: CoxPH().predict_risk(x), "not fitted"),
        (lambda: CoxPH().fit(x, t, e).predict_risk(x.drop(columns=["age"])), "missing column"),
        (lambda: concordance_index(t_np, np.ones(5), e_np), "risk has length 5"),
        (lambda: concordance_index([1, 2], [1, 2], [0, 0]), "no events"),
        (lambda: concordance_index([1, 1], [1, 2], [1, 1]), "no comparable pairs"),
        (lambda: concordance_index([1, 2], [np.nan, 2]), "risk contains NaN"),
        (lambda: time_dependent_auc(t_np, e_np, t_np, t_np, e_np, [20, 10]), "strictly increasing"),
        (lambda: time_dependent_auc(t_np, e_np, t_np, t_np, e_np, [10, 60]), "within the test follow-up"),
        (lambda: uno_c_index([1, 5, 8], [0, 1, 1], t_np, t_np, e_np), "largest training time"),
        (lambda: integrated_brier_score(t_np, e_np, t_np, e_np, np.ones((3, 2)), [10, 20]), "shape"),
        (lambda: logrank_test(t_np, e_np, np.zeros(len(t_np))), "at least 2 groups"),
        (lambda: risk_groups([1.0, 2.0], [0.5, 1.5]), "quantiles"),
        (lambda: bootstrap_ci(concordance_index, t_np, t_np[:5], e_np), "arrays must align"),
    ]
    for fn, match in cases:
        with pytest.raises(ValueError, match=match):
            fn()
