"""Survival analysis: Cox proportional hazards, risk groups, Kaplan-Meier plots, and (re-exported) metrics.

:class:`CoxPH` reproduces lifelines' ``CoxPHFitter`` (Efron ties, same penalty convention, same standardisation)
with a fully vectorised Newton solver: after one sort by time, every iteration is a handful of cumulative sums,
``np.add.reduceat`` over tied event times and one ``X^T diag(w) X`` product, i.e. O(n p^2) with no Python loop over
subjects or event times. Metrics and non-parametric statistics (:func:`concordance_index`, :func:`uno_c_index`,
:func:`time_dependent_auc`, :func:`integrated_brier_score`, :func:`bootstrap_ci`, :func:`kaplan_meier`,
:func:`logrank_test`) live in :mod:`medvlp.tasks.survival_metrics` and are re-exported here. ``risk`` always
means HIGHER = EARLIER event.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from scipy import linalg, stats

from medvlp.tasks.bootstrap import bootstrap_ci
from medvlp.tasks.survival_metrics import (
    check_survival_data,
    concordance_index,
    integrated_brier_score,
    kaplan_meier,
    logrank_test,
    time_dependent_auc,
    uno_c_index,
)

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = [
    "CoxPH",
    "bootstrap_ci",
    "check_survival_data",
    "concordance_index",
    "integrated_brier_score",
    "kaplan_meier",
    "logrank_test",
    "plot_kaplan_meier",
    "risk_groups",
    "time_dependent_auc",
    "uno_c_index",
]


def _as_matrix(X: Any) -> tuple[np.ndarray, list[str] | None]:
    """Covariates as a float ``[n, p]`` array plus column names (DataFrame input only)."""
    if isinstance(X, pd.Series):
        X = X.to_frame()
    names = None
    if isinstance(X, pd.DataFrame):
        bad = [str(c) for c in X.columns if not pd.api.types.is_numeric_dtype(X[c]) and X[c].dtype != bool]
        if bad:
            raise ValueError(f"X has non-numeric column(s) {bad}; encode them numerically first")
        names = [str(c) for c in X.columns]
        X = X.to_numpy(dtype=float)
    try:
        a = np.asarray(X, dtype=float)
    except (TypeError, ValueError) as e:
        raise ValueError(f"X must be numeric: {e}") from None
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2 or a.shape[1] == 0:
        raise ValueError(f"X must be 2-dimensional [n, p] with p >= 1, got shape {a.shape}")
    if not np.isfinite(a).all():
        cols = np.flatnonzero(~np.isfinite(a).all(axis=0))
        which = [names[c] for c in cols] if names else cols.tolist()
        raise ValueError(f"X contains NaN or infinite values in column(s) {which}")
    return a, names


class _CoxData:
    """Time-sorted standardised covariates and the index structures of one fit (risk sets, tied events)."""

    def __init__(self, zt: np.ndarray, ts: np.ndarray, es: np.ndarray, ties: str) -> None:
        self.zt = zt  # [p, n], sorted by time: per-covariate reductions run over contiguous memory
        new_t = np.r_[True, ts[1:] != ts[:-1]]
        self.grp_first = np.flatnonzero(new_t)  # first sorted index of every distinct time
        self.uniq_t = ts[self.grp_first]
        self.gid = np.cumsum(new_t) - 1
        self.ev = np.flatnonzero(es)
        ev_gid = self.gid[self.ev]
        new_k = np.r_[True, ev_gid[1:] != ev_gid[:-1]]
        self.ev_first = np.flatnonzero(new_k)  # first event of every distinct event time k
        self.k = np.cumsum(new_k) - 1  # event time of every event
        self.risk_first = self.grp_first[ev_gid[self.ev_first]]  # risk set of time k = sorted rows >= risk_first[k]
        d_k = np.diff(np.r_[self.ev_first, self.ev.size])
        within = np.arange(self.ev.size) - self.ev_first[self.k]
        self.frac = within / d_k[self.k] if ties == "efron" else np.zeros(self.ev.size)
        self.z_evt = np.ascontiguousarray(zt[:, self.ev])
        self.z_ev_sum = self.z_evt.sum(axis=1)
        self.buf = np.empty_like(zt)

    def loglik(self, beta: np.ndarray, derivs: bool = True) -> tuple[float, Any, Any]:
        """Partial log-likelihood, gradient and information (negative Hessian), Efron or Breslow ties.

        For event time k with d_k tied events, event l = 0..d_k-1 has denominator ``S0_k - (l/d_k) T0_k``, where
        ``S0_k`` sums ``exp(eta)`` over the risk set and ``T0_k`` over the tied events (Breslow: fraction 0). The
        risk-set sums are ``np.add.reduceat`` + reversed cumsums; the information's ``sum_k S2_k A_k`` term is
        ``Z^T diag(phi_j sum_{k: t_k <= t_j} A_k) Z`` and the ``sum_e m_e m_e^T`` term is expanded into per-time
        sums, so nothing of size [events, p] or [n, p, p] is built.
        """
        zt, ev, k, c = self.zt, self.ev, self.k, self.frac
        eta = beta @ zt
        shift = eta.max()
        phi = np.exp(eta - shift)
        phi_ev = phi[ev]
        s0 = np.add.reduceat(phi, self.risk_first)[::-1].cumsum()[::-1]
        t0 = np.add.reduceat(phi_ev, self.ev_first)
        den = s0[k] - c * t0[k]
        ll = float(self.z_ev_sum @ beta - np.log(den).sum() - ev.size * shift)
        if not derivs:
            return ll, None, None
        buf = np.multiply(zt, phi, out=self.buf)
        s1 = np.add.reduceat(buf, self.risk_first, axis=1)[:, ::-1].cumsum(axis=1)[:, ::-1]  # [p, K]
        t1 = np.add.reduceat(self.z_evt * phi_ev, self.ev_first, axis=1)
        # m_e = (s1_k - c_e t1_k) / den_e is never materialised: per-time sums of the Efron weights instead
        inv, cinv = 1.0 / den, c / den
        a_k, b_k = np.bincount(k, weights=inv), np.bincount(k, weights=cinv)
        a2, b2, c2 = (np.bincount(k, weights=v) for v in (inv * inv, cinv * inv, cinv * cinv))
        grad = self.z_ev_sum - (s1 @ a_k - t1 @ b_k)
        cross = (s1 * b2) @ t1.T
        mtm = (s1 * a2) @ s1.T - cross - cross.T + (t1 * c2) @ t1.T
        a = np.zeros(zt.shape[1])
        a[self.risk_first] = a_k
        w = phi * np.cumsum(a)
        w[ev] -= phi_ev * b_k[k]
        info = zt @ np.multiply(zt, w, out=buf).T
        info -= mtm
        return ll, grad, info


class CoxPH:
    """Cox proportional hazards model fitted by Newton-Raphson (lifelines ``CoxPHFitter`` parity).

    Covariates are standardised internally exactly as lifelines does (``(x - mean) / std`` with the sample std,
    ddof=1); coefficients, standard errors and the variance matrix are reported on the original scale. The penalty
    (lifelines' convention, applied to the STANDARDISED coefficients ``b_std = coef * std``) is subtracted from the
    summed partial log-likelihood::

        n * penalizer * ((1 - l1_ratio) * 0.5 * ||b_std||^2 + l1_ratio * ||b_std||_1)

    i.e. the mean log-likelihood is penalised by ``penalizer * (...)``. The L1 part is solved exactly (proximal
    Newton with coordinate descent, so coefficients can be exactly 0); lifelines replaces ``|b|`` by a smooth
    approximation that sharpens with every iteration, so it converges to the same solution but stops earlier with
    its default tolerances (differences ~1e-6..1e-4; ~1e-12 with tight ``fit_options``).

    Args:
        penalizer: Penalty strength (>= 0), lifelines' convention above.
        l1_ratio: Elastic-net mixing in [0, 1] (0 = ridge, 1 = lasso).
        ties: ``"efron"`` (default, as R and lifelines) or ``"breslow"``.
        tol: Convergence when the largest (proximal) Newton step on the standardised scale is below ``tol``.
        max_iter: Maximum Newton iterations (a ``RuntimeWarning`` is issued if reached).

    Attributes (after :meth:`fit`):
        coef_: Coefficients on the original covariate scale, shape ``[p]``.
        se_: Standard errors: ``sqrt(diag(inverse of the negative Hessian))`` of the objective at ``coef_``. For
            ``penalizer > 0`` this is the inverse of the *penalised* information (ridge part included), as lifelines
            reports; with an L1 part it is computed on the non-zero coefficients only and the zeroed ones get 0 (the
            limit of lifelines' smoothed penalty). A plug-in that ignores shrinkage bias and selection: not a valid
            basis for tests or confidence intervals. Constant columns (allowed only when penalized) get coef 0 and
            se NaN.
        variance_matrix_: The corresponding ``[p, p]`` covariance matrix.
        feature_names_: Column names (DataFrame input) or ``x0..x{p-1}``.
        mean_, scale_: Training means and standard deviations used for standardisation.
        log_likelihood_: Unpenalised partial log-likelihood at ``coef_`` (= lifelines' ``log_likelihood_`` when
            ``penalizer == 0``; lifelines reports the penalised value otherwise, see ``penalized_log_likelihood_``).
        penalized_log_likelihood_: ``log_likelihood_`` minus the penalty (the maximised objective).
        log_likelihood_null_: Partial log-likelihood at ``coef = 0`` (for the likelihood-ratio test).
        baseline_cumulative_hazard_: Breslow cumulative baseline hazard (pd.Series indexed by every distinct
            training time) for a subject at the training means, as lifelines' ``baseline_cumulative_hazard_``.
        n_iter_: Newton iterations performed; converged_: whether the tolerance was met.
        concordance_: Harrell's C of the fitted risks on the training data.
    """

    def __init__(
        self,
        penalizer: float = 0.0,
        l1_ratio: float = 0.0,
        ties: str = "efron",
        tol: float = 1e-9,
        max_iter: int = 100,
    ) -> None:
        self.penalizer = penalizer
        self.l1_ratio = l1_ratio
        self.ties = ties
        self.tol = tol
        self.max_iter = max_iter

    # ------------------------------------------------------------------------------------------- fitting
    def _check_params(self) -> None:
        if not (np.isfinite(self.penalizer) and self.penalizer >= 0):
            raise ValueError(f"penalizer must be a finite number >= 0, got {self.penalizer}")
        if not 0 <= self.l1_ratio <= 1:
            raise ValueError(f"l1_ratio must be in [0, 1], got {self.l1_ratio}")
        if self.ties not in ("efron", "breslow"):
            raise ValueError(f"ties must be 'efron' or 'breslow', got {self.ties!r}")
        if not self.tol > 0 or self.max_iter < 1:
            raise ValueError(f"tol must be > 0 and max_iter >= 1, got tol={self.tol}, max_iter={self.max_iter}")

    def fit(self, X: Any, time: Any, event: Any) -> CoxPH:
        """Fit the model.

        Args:
            X: Covariates ``[n, p]`` (array or DataFrame; DataFrame column names are kept).
            time: Observed times ``[n]`` (non-negative).
            event: Event indicators ``[n]`` (1/True = event, 0/False = censored).

        Returns:
            self.

        Raises:
            ValueError: Invalid inputs (lengths, NaNs, negative times, events not 0/1, no events), a constant
                column with ``penalizer == 0``, or collinear covariates.
        """
        self._check_params()
        x, names = _as_matrix(X)
        t, e = check_survival_data(time, event)
        if x.shape[0] != t.size:
            raise ValueError(f"X has {x.shape[0]} rows but time has length {t.size}")
        if t.size < 2:
            raise ValueError("need at least 2 observations")
        n, p = x.shape
        self.feature_names_ = names if names is not None else [f"x{j}" for j in range(p)]
        self._from_frame = names is not None
        self.mean_ = x.mean(axis=0)
        self.scale_ = x.std(axis=0, ddof=1)
        const = np.ptp(x, axis=0) == 0
        if const.any() and self.penalizer == 0:
            cols = [self.feature_names_[j] for j in np.flatnonzero(const)]
            raise ValueError(
                f"X has constant column(s) {cols}: their Cox coefficients are not identifiable (the baseline hazard "
                "absorbs any constant); drop them or use penalizer > 0"
            )
        act = ~const
        scale = np.where(const, 1.0, self.scale_)
        order = np.argsort(t, kind="stable")
        zt = np.ascontiguousarray(x.T[act][:, order])
        zt -= self.mean_[act, None]
        zt /= scale[act, None]
        data = _CoxData(zt, t[order], e[order], self.ties)
        beta, ll, info, self.n_iter_, self.converged_ = self._newton(data)
        pen2 = n * self.penalizer * (1 - self.l1_ratio)
        a_pen = info + pen2 * np.eye(info.shape[0])
        # with an L1 term, coefficients at exactly 0 get variance 0 (the limit of lifelines' smoothed |b|, whose
        # curvature at 0 grows without bound); the rest use the penalised information of the active set
        live = beta != 0 if self.penalizer > 0 and self.l1_ratio > 0 else np.ones(beta.size, dtype=bool)
        cov_std = np.zeros_like(a_pen)
        try:
            cov_std[np.ix_(live, live)] = linalg.inv(a_pen[np.ix_(live, live)])
        except linalg.LinAlgError:
            cov_std[:] = np.nan
        coef = np.zeros(p)
        coef[act] = beta / scale[act]
        cov = np.full((p, p), np.nan)
        cov[np.ix_(act, act)] = cov_std / np.outer(scale[act], scale[act])
        self.coef_ = coef
        self.variance_matrix_ = cov
        self.se_ = np.sqrt(np.diag(cov))
        self.log_likelihood_ = ll
        self.penalized_log_likelihood_ = ll - n * self.penalizer * (
            (1 - self.l1_ratio) * 0.5 * beta @ beta + self.l1_ratio * np.abs(beta).sum()
        )
        # Breslow baseline at the training means (lifelines' convention), on every distinct training time
        eta = beta @ zt
        phi = np.exp(eta - eta.max())
        s0 = np.add.reduceat(phi, data.grp_first)[::-1].cumsum()[::-1]
        d = np.bincount(data.gid[data.ev], minlength=data.grp_first.size)
        self.baseline_hazard_ = pd.Series(d / s0 * np.exp(-eta.max()), index=data.uniq_t, name="baseline hazard")
        self.baseline_cumulative_hazard_ = self.baseline_hazard_.cumsum().rename("baseline cumulative hazard")
        self._train = (t[order], e[order], eta)  # time-sorted; the C-index does not depend on row order
        self.__dict__.pop("_concordance", None)
        return self

    @property
    def concordance_(self) -> float:
        """Harrell's C of the fitted risks on the training data (computed on first access, as lifelines does)."""
        if "_concordance" not in self.__dict__:
            t, e, eta = self._train
            self._concordance = concordance_index(t, np.exp(eta), e)
        return self._concordance

    def _newton(self, data: _CoxData) -> tuple[np.ndarray, float, np.ndarray, int, bool]:
        """Maximise the penalised partial likelihood on standardised covariates (proximal Newton for L1)."""
        p, n = data.zt.shape
        lam2 = n * self.penalizer * (1 - self.l1_ratio)
        lam1 = n * self.penalizer * self.l1_ratio

        def objective(ll: float, b: np.ndarray) -> float:
            return ll - 0.5 * lam2 * b @ b - lam1 * np.abs(b).sum()

        beta = np.zeros(p)
        ll, grad, info = data.loglik(beta)
        self.log_likelihood_null_ = ll
        obj = objective(ll, beta)
        for it in range(1, self.max_iter + 1):
            a_mat = info + lam2 * np.eye(p)
            g = grad - lam2 * beta
            try:
                if lam1 == 0:
                    target = beta + linalg.solve(a_mat, g, assume_a="pos")
                else:
                    target = _lasso_quadratic(a_mat, a_mat @ beta + g, lam1, beta)
            except (linalg.LinAlgError, ValueError):
                raise ValueError(
                    "Cox information matrix is singular: the covariates are collinear (or a covariate perfectly "
                    "separates events); remove redundant columns or use penalizer > 0"
                ) from None
            delta = target - beta
            if np.abs(delta).max() < self.tol:
                return beta, ll, info, it, True
            step = 1.0
            while True:
                cand = beta + step * delta
                ll_c, grad_c, info_c = data.loglik(cand)
                obj_c = objective(ll_c, cand)
                if np.isfinite(obj_c) and obj_c >= obj - 1e-12 * (1 + abs(obj)):
                    break
                step *= 0.5
                if step < 1e-10:
                    warnings.warn("CoxPH: line search stalled before convergence", RuntimeWarning, stacklevel=3)
                    return beta, ll, info, it, False
            beta, ll, grad, info, obj = cand, ll_c, grad_c, info_c, obj_c
        warnings.warn(f"CoxPH did not converge in max_iter={self.max_iter} iterations", RuntimeWarning, stacklevel=3)
        return beta, ll, info, self.max_iter, False

    # ------------------------------------------------------------------------------------------- prediction
    def _design(self, X: Any) -> np.ndarray:
        if not hasattr(self, "coef_"):
            raise ValueError("CoxPH is not fitted yet; call fit first")
        if isinstance(X, pd.DataFrame) and self._from_frame:
            missing = [c for c in self.feature_names_ if c not in X.columns.astype(str)]
            if missing:
                raise ValueError(f"X is missing column(s) {missing}")
            X = X.set_axis(X.columns.astype(str), axis=1)[self.feature_names_]
        x, _ = _as_matrix(X)
        if x.shape[1] != self.coef_.size:
            raise ValueError(f"X has {x.shape[1]} columns, the model was fitted with {self.coef_.size}")
        return x

    def predict_log_risk(self, X: Any) -> np.ndarray:
        """Linear predictor relative to the training means, ``(x - mean) @ coef`` (lifelines' log partial hazard)."""
        return (self._design(X) - self.mean_) @ self.coef_

    def predict_risk(self, X: Any) -> np.ndarray:
        """Partial hazard ``exp((x - mean) @ coef)`` (= lifelines ``predict_partial_hazard``), shape ``[n]``."""
        return np.exp(self.predict_log_risk(X))

    def predict_survival(self, X: Any, times: Any) -> np.ndarray:
        """Survival probabilities ``exp(-H0(t) * risk)`` with the Breslow step-function H0, shape ``[n, len(times)]``.

        ``H0`` is right-continuous and constant beyond the last training time (lifelines' ``predict_survival_function``
        agrees at the training times; between them it interpolates linearly).
        """
        tm = np.atleast_1d(np.asarray(times, dtype=float))
        if tm.ndim != 1 or not np.isfinite(tm).all():
            raise ValueError("times must be a finite 1-D array")
        knots = self.baseline_cumulative_hazard_.index.to_numpy()
        cum = np.r_[0.0, self.baseline_cumulative_hazard_.to_numpy()]
        h0 = cum[np.searchsorted(knots, tm, side="right")]
        return np.exp(-np.outer(self.predict_risk(X), h0))

    @property
    def summary(self) -> pd.DataFrame:
        """Coefficient table: coef, exp(coef), se, z, p (two-sided Wald)."""
        z = self.coef_ / self.se_
        return pd.DataFrame(
            {
                "coef": self.coef_,
                "exp(coef)": np.exp(self.coef_),
                "se": self.se_,
                "z": z,
                "p": 2 * stats.norm.sf(abs(z)),
            },
            index=pd.Index(self.feature_names_, name="covariate"),
        )


def _lasso_quadratic(a: np.ndarray, c: np.ndarray, lam: float, start: np.ndarray) -> np.ndarray:
    """argmin_z 0.5 z'Az - c'z + lam ||z||_1 by cyclic coordinate descent (A positive definite, p small)."""
    z = start.copy()
    diag = np.diag(a)
    if (diag <= 0).any():
        raise ValueError("non-positive curvature")
    for _ in range(10_000):
        z_old = z.copy()
        for j in range(z.size):
            r = c[j] - a[j] @ z + diag[j] * z[j]
            z[j] = np.sign(r) * max(abs(r) - lam, 0.0) / diag[j]
        if np.abs(z - z_old).max() <= 1e-15 * (1 + np.abs(z).max()):
            break
    return z


# ----------------------------------------------------------------------------------------------- risk groups
def risk_groups(risk: Any, n_groups: int | Sequence[float] = 2) -> np.ndarray:
    """Group labels ``0..k-1`` (0 = lowest risk) by quantiles of ``risk``.

    Args:
        risk: Risk scores ``[n]``.
        n_groups: Number of equal-size groups (2 = median split), or the interior quantiles to cut at, e.g.
            ``[0.25, 0.75]`` for low / middle / high.

    Returns:
        Integer labels; a value equal to a cut point goes to the lower group.
    """
    r = np.asarray(risk, dtype=float).ravel()
    if r.size == 0 or not np.isfinite(r).all():
        raise ValueError("risk must be a non-empty array of finite values")
    if isinstance(n_groups, int | np.integer):
        if n_groups < 2:
            raise ValueError(f"n_groups must be >= 2, got {n_groups}")
        qs = np.linspace(0, 1, int(n_groups) + 1)[1:-1]
    else:
        qs = np.asarray(n_groups, dtype=float)
        if qs.ndim != 1 or qs.size == 0 or (qs <= 0).any() or (qs >= 1).any() or (np.diff(qs) <= 0).any():
            raise ValueError("quantiles must be strictly increasing values in (0, 1)")
    return np.searchsorted(np.quantile(r, qs), r, side="left")


def plot_kaplan_meier(
    time: Any,
    event: Any,
    groups: Any = None,
    ax: Axes | None = None,
    labels: Mapping[Any, str] | Sequence[str] | None = None,
) -> Axes:
    """Kaplan-Meier curves per group (censoring ticks) with the log-rank p-value in the title.

    Uses ``matplotlib.figure.Figure`` when no ``ax`` is given, so it never touches pyplot or a GUI backend.

    Args:
        time: Observed times.
        event: Event indicators.
        groups: Group label per subject (e.g. from :func:`risk_groups`); ``None`` draws one curve.
        ax: Axes to draw into.
        labels: Legend names: a mapping group -> name, or a sequence in sorted-group order.

    Returns:
        The Axes.
    """
    t, e = check_survival_data(time, event, require_event=False)
    grp = np.zeros(t.size, dtype=int) if groups is None else np.asarray(groups)
    if grp.shape != t.shape:
        raise ValueError(f"groups must have the same length as time ({t.size}), got shape {grp.shape}")
    uniq = np.unique(grp)
    if labels is None:
        names = [f"group {g}" for g in uniq] if groups is not None else ["all"]
    elif isinstance(labels, Mapping):
        names = [str(labels.get(g, g)) for g in uniq]
    else:
        names = [str(s) for s in labels]
        if len(names) != uniq.size:
            raise ValueError(f"labels has {len(names)} names for {uniq.size} groups")
    if ax is None:
        from matplotlib.figure import Figure

        ax = Figure(figsize=(6, 4)).subplots()
    for g, name in zip(uniq, names, strict=True):
        m = grp == g
        km = kaplan_meier(t[m], e[m])
        (line,) = ax.step(km["timeline"], km["survival"], where="post", label=f"{name} (n={int(m.sum())})")
        cens = km["censored"].to_numpy() > 0
        ax.plot(km["timeline"][cens], km["survival"][cens], "|", color=line.get_color(), markersize=6)
    if uniq.size >= 2:
        ax.set_title(f"Kaplan-Meier; log-rank p = {logrank_test(t, e, grp)['p_value']:.3g}")
    else:
        ax.set_title("Kaplan-Meier")
    ax.set_xlabel("time")
    ax.set_ylabel("survival probability")
    ax.set_ylim(0, 1.02)
    ax.legend(loc="best")
    return ax
