"""Metrics for right-censored survival predictions, plus Kaplan-Meier and the log-rank test.

Conventions shared by every function here:

- ``risk`` is a *risk score*: a HIGHER value means an EARLIER expected event (e.g. a Cox partial hazard or linear
  predictor). ``lifelines.utils.concordance_index`` expects the opposite (predicted survival times, higher =
  later), so ``concordance_index(t, r, e) == lifelines.utils.concordance_index(t, -r, e)``.
- ``event`` is 1 (or True) for an observed event and 0 for right-censoring; ``None`` means "all events".
- Ties in ``risk`` are exact equality and count 1/2 (lifelines' rule; scikit-survival treats ``|diff| <= 1e-8`` as a
  tie, which only differs for near-identical but unequal scores).
- Bad inputs raise ``ValueError`` naming the argument and the problem.

The concordance counts are computed in O(n log n) with a fully vectorised wavelet-matrix dominance count (one numpy
pass per bit of the number of distinct times), never with an O(n^2) pair loop, so n = 10^6 takes about a second.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

__all__ = [
    "check_survival_data",
    "concordance_index",
    "integrated_brier_score",
    "kaplan_meier",
    "logrank_test",
    "time_dependent_auc",
    "uno_c_index",
]


# ----------------------------------------------------------------------------------------------- validation
def _as_1d_float(x: Any, name: str) -> np.ndarray:
    try:
        a = np.asarray(x, dtype=float)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be numeric: {e}") from None
    if a.ndim == 2 and 1 in a.shape:
        a = a.ravel()
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-dimensional, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or infinite values ({int((~np.isfinite(a)).sum())} of {a.size})")
    return a


def check_survival_data(
    time: Any, event: Any = None, *, prefix: str = "", require_event: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Validate a (time, event) pair and return them as float and bool arrays.

    Args:
        time: Observed times (event or censoring), non-negative and finite.
        event: 0/1 or boolean event indicators; ``None`` means every observation is an event.
        prefix: Prefix for the argument names in error messages (e.g. ``"train "``).
        require_event: Raise when there is no observed event.

    Returns:
        ``(time, event)`` as a float array and a bool array.

    Raises:
        ValueError: Mismatched lengths, NaNs, negative times, events not 0/1, no events, empty input.
    """
    t = _as_1d_float(time, f"{prefix}time")
    if t.size == 0:
        raise ValueError(f"{prefix}time is empty")
    if (t < 0).any():
        raise ValueError(f"{prefix}time must be non-negative (found {int((t < 0).sum())} negative, min {t.min():g})")
    if event is None:
        e = np.ones(t.size, dtype=bool)
    else:
        e_raw = np.asarray(event)
        if e_raw.dtype != bool:
            e_raw = _as_1d_float(e_raw, f"{prefix}event")
            bad = ~np.isin(e_raw, (0.0, 1.0))
            if bad.any():
                raise ValueError(
                    f"{prefix}event must contain only 0/1 (or booleans); found {np.unique(e_raw[bad])[:5].tolist()}"
                )
        e = np.asarray(e_raw, dtype=bool).ravel()
        if e.size != t.size:
            raise ValueError(f"{prefix}time and {prefix}event have different lengths ({t.size} vs {e.size})")
    if require_event and not e.any():
        raise ValueError(f"{prefix}event has no events (all {t.size} observations are censored)")
    return t, e


def _check_same_length(n: int, a: np.ndarray, name: str) -> None:
    if a.shape[0] != n:
        raise ValueError(f"{name} has length {a.shape[0]} but time has length {n}")


# ----------------------------------------------------------------------------------------------- concordance core
def _dense_rank(x: np.ndarray) -> tuple[np.ndarray, int]:
    uniq, inv = np.unique(x, return_inverse=True)
    return inv.astype(np.int64).ravel(), uniq.size


def _later_lower_counts(g: np.ndarray, n_g: int, q: np.ndarray, order: np.ndarray | None = None) -> np.ndarray:
    """For every i, ``#{j : g_j > g_i and q_j < q_i}`` (integer keys ``0 <= g < n_g``) in O(n log n_g).

    Wavelet matrix over the bits of ``g``: the sequence starts sorted by ``(q, g)`` (``order``, computed if not
    given) and is kept sorted by ``(g >> level, q, g)`` by stably partitioning every node on the current bit. At
    each level an element whose bit is 0 adds the number of bit-1 elements of its node that precede it: they have a
    larger ``g`` and, thanks to the ``g`` tie-break, a strictly smaller ``q``. Every pair with ``g_j > g_i`` is
    counted once, at the highest bit where the two differ. Node offsets come from the histogram of ``g``, so each
    level is a few O(n) numpy passes and there is no loop over subjects.
    """
    n = g.size
    if order is None:
        order = np.lexsort((g, q))
    cur, idx = g[order], order
    acc = np.zeros(n, dtype=np.int64)
    n_bits = max(1, int(n_g - 1).bit_length())
    hist = np.bincount(g, minlength=1 << n_bits)
    pos = np.arange(n, dtype=np.int64)
    for level in range(n_bits - 1, -1, -1):
        h = hist.reshape(-1, 1 << level).sum(axis=1)  # element count per value of g >> level
        zeros_n, ones_n = h[0::2], h[1::2]
        node = cur >> (level + 1)
        bit = (cur >> level) & 1
        c1x = np.cumsum(bit) - bit  # bit-1 elements strictly before each position
        rank1 = c1x - (np.cumsum(ones_n) - ones_n)[node]
        zero = bit == 0
        acc += np.where(zero, rank1, 0)
        if level == 0:
            break
        rank0 = (pos - c1x) - (np.cumsum(zeros_n) - zeros_n)[node]
        newpos = (np.cumsum(h) - h)[cur >> level] + np.where(zero, rank0, rank1)
        nxt_g, nxt_i, nxt_a = np.empty_like(cur), np.empty_like(idx), np.empty_like(acc)
        nxt_g[newpos], nxt_i[newpos], nxt_a[newpos] = cur, idx, acc
        cur, idx, acc = nxt_g, nxt_i, nxt_a
    out = np.empty(n, dtype=np.int64)
    out[idx] = acc
    return out


def _run_last(new_run_after: np.ndarray) -> np.ndarray:
    """Index of the last element of each position's run (``new_run_after[k]``: a run ends at k)."""
    ends = np.flatnonzero(new_run_after)
    return np.repeat(ends, np.diff(np.r_[-1, ends]))


def concordance_counts(time: np.ndarray, risk: np.ndarray, event: np.ndarray) -> tuple[np.ndarray, ...]:
    """Per-subject pair counts for Harrell's C (validated float/bool inputs of equal length).

    A pair (i, j) is comparable when subject i has an event and ``time_j > time_i``, or ``time_j == time_i`` and j is
    censored (lifelines' and scikit-survival's rule; two events at the same time are not comparable). The pair is
    concordant when ``risk_i > risk_j`` and tied when ``risk_i == risk_j``.

    Implementation: with ``key = 2 * rank(time) + censored`` the comparable partners of an event i are exactly the
    j with ``key_j > key_i``, so the counts are 2-D dominance counts (:func:`_later_lower_counts`) plus O(n) run
    arithmetic for the tied risks.

    Returns:
        ``(concordant, tied, comparable)``: int64 arrays of length n, counted for the event subject i of each pair
        (zero for censored subjects).
    """
    n = time.size
    g, n_g = _dense_rank(time)
    g = 2 * g + (~event)
    n_g *= 2
    q, n_q = _dense_rank(risk)
    order = np.lexsort((g, q)) if (n_g <= n_q or n_q < n) else None
    # later key and strictly lower risk: bits over whichever key has fewer distinct values
    lt = _later_lower_counts(g, n_g, q, order) if n_g <= n_q else _later_lower_counts(n_q - 1 - q, n_q, n_g - 1 - g)
    # later key and equal risk: in (q, g) order, elements after i's (q, g) run but inside its q run
    if n_q < n:
        sq, sg = q[order], g[order]
        q_end = np.r_[sq[1:] != sq[:-1], True]
        qg_end = q_end | np.r_[sg[1:] != sg[:-1], True]
        eq = np.empty(n, dtype=np.int64)
        eq[order] = _run_last(q_end) - _run_last(qg_end)
    else:
        eq = np.zeros(n, dtype=np.int64)
    comp = n - np.cumsum(np.bincount(g, minlength=n_g))[g]
    ev = event.astype(np.int64)
    return lt * ev, eq * ev, comp * ev


def concordance_index(time: Any, risk: Any, event: Any = None) -> float:
    """Harrell's concordance index, with HIGHER risk meaning an EARLIER event.

    ``C = (concordant + tied / 2) / comparable`` over comparable pairs (see :func:`concordance_counts`). Equals
    ``lifelines.utils.concordance_index(time, -risk, event)`` (lifelines takes predicted *survival times*, the
    opposite sign) and ``sksurv.metrics.concordance_index_censored(event.astype(bool), time, risk)[0]``.
    O(n log n) time and O(n) memory.

    Args:
        time: Observed times, shape ``[n]``.
        risk: Predicted risk scores, shape ``[n]`` (higher = earlier event).
        event: Event indicators (1 = event, 0 = censored); ``None`` means all events.

    Returns:
        The C-index in [0, 1].

    Raises:
        ValueError: Invalid inputs or no comparable pairs.
    """
    t, e = check_survival_data(time, event)
    r = _as_1d_float(risk, "risk")
    _check_same_length(t.size, r, "risk")
    conc, tied, comp = concordance_counts(t, r, e)
    n_comp = int(comp.sum())
    if n_comp == 0:
        raise ValueError("no comparable pairs: every event is at or after the last observed time")
    return float((2 * int(conc.sum()) + int(tied.sum())) / (2 * n_comp))


# ----------------------------------------------------------------------------------------------- IPCW
def _step_lookup(knots: np.ndarray, values: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Right-continuous step function: ``values[k]`` for the last knot ``<= t`` (``values[0]`` is at -inf)."""
    return values[np.searchsorted(knots, t, side="right")]


class _KMStep:
    """Kaplan-Meier survival (or, with ``censoring=True``, censoring-survival G) as a right-continuous step."""

    def __init__(self, time: np.ndarray, event: np.ndarray, censoring: bool = False) -> None:
        uniq, inv = np.unique(time, return_inverse=True)
        n_ev = np.bincount(inv, weights=event, minlength=uniq.size)
        n_all = np.bincount(inv, minlength=uniq.size).astype(float)
        at_risk = n_all[::-1].cumsum()[::-1]
        if censoring:  # scikit-survival's reverse KM: censorings are the "events", risk set excludes same-time events
            num, den = n_all - n_ev, at_risk - n_ev
        else:
            num, den = n_ev, at_risk
        ratio = np.divide(num, den, out=np.zeros(uniq.size), where=num != 0)
        self.knots = uniq
        self.values = np.r_[1.0, np.cumprod(1.0 - ratio)]
        self.all_events = bool(censoring and event.all())
        if self.all_events:  # no censoring at all: G == 1 up to the last observed time
            self.values = np.ones(uniq.size + 1)

    def __call__(self, t: np.ndarray, what: str) -> np.ndarray:
        t = np.asarray(t, dtype=float)
        last = self.knots[-1]
        beyond = t > last
        if beyond.any() and (self.values[-1] > 0 or self.all_events):
            raise ValueError(
                f"{what} must not exceed the largest training time {last:g} (found {t[beyond].max():g}); the "
                "censoring distribution is unknown beyond it"
            )
        out = _step_lookup(self.knots, self.values, t)
        out[beyond] = 0.0
        return out


def _ipcw_event_weights(g: _KMStep, time: np.ndarray, event: np.ndarray) -> np.ndarray:
    w = np.zeros(time.size)
    ghat = g(time[event], "test event times")
    if (ghat == 0).any():
        raise ValueError("censoring survival function is zero at one or more test event times")
    w[event] = 1.0 / ghat
    return w


def _check_train_test(
    time_train: Any, event_train: Any, time: Any, event: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    tt, et = check_survival_data(time_train, event_train, prefix="train ", require_event=False)
    t, e = check_survival_data(time, event)
    return tt, et, t, e


def _check_eval_times(times: Any, t: np.ndarray) -> np.ndarray:
    tm = _as_1d_float(np.atleast_1d(times), "times")
    if tm.size == 0:
        raise ValueError("times is empty")
    if tm.size > 1 and (np.diff(tm) <= 0).any():
        raise ValueError("times must be strictly increasing")
    if tm.max() >= t.max() or tm.min() < t.min():
        raise ValueError(f"all times must lie within the test follow-up [{t.min():g}, {t.max():g})")
    return tm


def uno_c_index(time_train: Any, event_train: Any, time: Any, risk: Any, event: Any, tau: float | None = None) -> float:
    """Uno's IPCW concordance index (Uno et al., Stat Med 2011), truncated at ``tau``.

    Each comparable pair (same rule as :func:`concordance_index`) is weighted by ``G(time_i)^-2``, where ``G`` is the
    Kaplan-Meier estimate of the censoring survival from the *training* data and i is the earlier event; events at
    or after ``tau`` get weight 0. Equals ``sksurv.metrics.concordance_index_ipcw(y_train, y_test, risk, tau)[0]``.

    Args:
        time_train: Training times (for the censoring distribution).
        event_train: Training event indicators.
        time: Test times.
        risk: Test risk scores (higher = earlier event).
        event: Test event indicators.
        tau: Truncation time; ``None`` uses every event.

    Returns:
        The IPCW C-index.

    Raises:
        ValueError: Invalid inputs, a test event after the last training time, or no comparable pairs.
    """
    tt, et, t, e = _check_train_test(time_train, event_train, time, event)
    r = _as_1d_float(risk, "risk")
    _check_same_length(t.size, r, "risk")
    keep = np.ones(t.size, dtype=bool) if tau is None else t < tau
    w = np.zeros(t.size)
    w[keep] = _ipcw_event_weights(_KMStep(tt, et, censoring=True), t[keep], e[keep])
    conc, tied, comp = concordance_counts(t, r, e)
    w2 = w**2
    den = float(w2 @ comp)
    if den == 0:
        raise ValueError("no comparable pairs with positive weight (check tau)")
    return float(w2 @ (conc + 0.5 * tied)) / den


def time_dependent_auc(
    time_train: Any, event_train: Any, time: Any, risk: Any, event: Any, times: Any
) -> tuple[np.ndarray, float]:
    """Cumulative/dynamic time-dependent AUC (Uno 2007; Hung & Chiang 2010) and its survival-weighted mean.

    Cases at ``t``: events with ``time <= t`` (weighted by ``1 / G(time)``, G from the training data); controls:
    ``time > t``. ``AUC(t) = sum_cases,controls w_i [I(r_i > r_j) + I(r_i == r_j) / 2] / (sum w_i * n_controls)``.
    The mean is ``sum_k AUC(t_k) (S(t_{k-1}) - S(t_k)) / (1 - S(t_last))`` with S the test Kaplan-Meier.
    Equals ``sksurv.metrics.cumulative_dynamic_auc``. A time with no case gives NaN (as scikit-survival).

    Args:
        time_train: Training times (for the censoring distribution).
        event_train: Training event indicators.
        time: Test times.
        risk: Test risk scores, ``[n]`` or time-dependent ``[n, len(times)]`` (higher = earlier event).
        event: Test event indicators.
        times: Strictly increasing evaluation times within ``[min(time), max(time))``.

    Returns:
        ``(auc, mean_auc)``: AUC per time point and the weighted mean.
    """
    tt, et, t, e = _check_train_test(time_train, event_train, time, event)
    tm = _check_eval_times(times, t)
    r = np.asarray(risk, dtype=float)
    if r.ndim == 1:
        r = _as_1d_float(r, "risk")[:, None].repeat(tm.size, axis=1)
    elif r.ndim != 2 or r.shape[1] != tm.size or not np.isfinite(r).all():
        raise ValueError(f"risk must be finite with shape [n] or [n, {tm.size}], got {r.shape}")
    _check_same_length(t.size, r, "risk")
    ipcw = _ipcw_event_weights(_KMStep(tt, et, censoring=True), t, e)
    auc = np.empty(tm.size)
    for k, tk in enumerate(tm):
        case, ctrl = e & (t <= tk), t > tk
        rc = np.sort(r[ctrl, k])
        lo = np.searchsorted(rc, r[case, k], side="left")
        hi = np.searchsorted(rc, r[case, k], side="right")
        wc = ipcw[case]
        with np.errstate(invalid="ignore", divide="ignore"):
            auc[k] = (wc @ (lo + 0.5 * (hi - lo))) / (wc.sum() * rc.size)
    if tm.size == 1:
        return auc, float(auc[0])
    s = _KMStep(t, e)(tm, "times")
    d = -np.diff(np.r_[1.0, s])
    return auc, float((auc * d).sum() / (1.0 - s[-1]))


def integrated_brier_score(
    time_train: Any, event_train: Any, time: Any, event: Any, survival_probs: Any, times: Any
) -> float:
    """IPCW integrated Brier score (Graf et al. 1999) over ``times``, trapezoidal rule.

    ``BS(t) = mean_i [ S_i(t)^2 I(time_i <= t, event_i) / G(time_i) + (1 - S_i(t))^2 I(time_i > t) / G(t) ]`` and
    ``IBS = trapz(BS, times) / (times[-1] - times[0])``. Equals ``sksurv.metrics.integrated_brier_score``.

    Args:
        time_train: Training times (for the censoring distribution G).
        event_train: Training event indicators.
        time: Test times.
        event: Test event indicators.
        survival_probs: Predicted survival probabilities, shape ``[n, len(times)]``.
        times: Strictly increasing evaluation times (at least two) within ``[min(time), max(time))``.

    Returns:
        The integrated Brier score (lower is better).
    """
    tt, et, t, e = _check_train_test(time_train, event_train, time, event)
    tm = _check_eval_times(times, t)
    if tm.size < 2:
        raise ValueError("integrated_brier_score needs at least two time points")
    s = np.asarray(survival_probs, dtype=float)
    if s.shape != (t.size, tm.size):
        raise ValueError(f"survival_probs must have shape [{t.size}, {tm.size}] (n, len(times)), got {s.shape}")
    if not np.isfinite(s).all():
        raise ValueError("survival_probs contains NaN or infinite values")
    g = _KMStep(tt, et, censoring=True)
    g_t, g_y = g(tm, "times"), g(t, "test times")
    g_t[g_t == 0], g_y[g_y == 0] = np.inf, np.inf
    case = (t[:, None] <= tm[None, :]) & e[:, None]
    ctrl = t[:, None] > tm[None, :]
    bs = np.mean(s**2 * case / g_y[:, None] + (1.0 - s) ** 2 * ctrl / g_t[None, :], axis=0)
    return float(np.trapezoid(bs, tm) / (tm[-1] - tm[0]))


# ------------------------------------------------------------------------------------------- Kaplan-Meier, log-rank
def kaplan_meier(time: Any, event: Any = None) -> pd.DataFrame:
    """Kaplan-Meier estimate on lifelines' timeline (0 plus every distinct time).

    Returns:
        DataFrame with columns ``timeline``, ``survival`` (S(t), right-continuous), ``at_risk`` (number with
        time >= t), ``events`` and ``censored`` at t; equals lifelines ``KaplanMeierFitter().survival_function_``
        and the matching ``event_table`` columns.
    """
    t, e = check_survival_data(time, event, require_event=False)
    timeline, inv = np.unique(np.r_[0.0, t], return_inverse=True)
    inv = inv[1:]
    events = np.bincount(inv, weights=e, minlength=timeline.size)
    removed = np.bincount(inv, minlength=timeline.size).astype(float)
    at_risk = removed[::-1].cumsum()[::-1]
    surv = np.cumprod(1.0 - np.divide(events, at_risk, out=np.zeros(timeline.size), where=at_risk > 0))
    return pd.DataFrame(
        {
            "timeline": timeline,
            "survival": surv,
            "at_risk": at_risk.astype(np.int64),
            "events": events.astype(np.int64),
            "censored": (removed - events).astype(np.int64),
        }
    )


def logrank_test(time: Any, event: Any, groups: Any) -> dict[str, float]:
    """Log-rank test of equal survival across k >= 2 groups (chi-square with k - 1 df).

    Observed minus expected events per group and their hypergeometric covariance, summed over distinct times; the
    statistic is ``Z[:-1] V[:-1, :-1]^+ Z[:-1]``. Equals lifelines ``multivariate_logrank_test`` (and
    ``logrank_test`` for two groups).

    Returns:
        ``{"statistic", "p_value", "df"}``.
    """
    t, e = check_survival_data(time, event, require_event=False)
    grp = np.asarray(groups)
    if grp.ndim != 1 or grp.size != t.size:
        raise ValueError(f"groups must be 1-D with the same length as time ({t.size}), got shape {grp.shape}")
    if pd.isna(grp).any():
        raise ValueError("groups contains missing values")
    labels, gi = np.unique(grp, return_inverse=True)
    k = labels.size
    if k < 2:
        raise ValueError(f"logrank_test needs at least 2 groups, got {k}")
    _, ti = np.unique(t, return_inverse=True)
    n_t = ti.max() + 1
    cell = ti * k + gi
    removed = np.bincount(cell, minlength=n_t * k).reshape(n_t, k).astype(float)
    d_ij = np.bincount(cell, weights=e, minlength=n_t * k).reshape(n_t, k)
    n_ij = removed[::-1].cumsum(axis=0)[::-1]
    n_i, d_i = n_ij.sum(axis=1), d_ij.sum(axis=1)
    z = (d_ij - n_ij * (d_i / n_i)[:, None]).sum(axis=0)
    f = np.where(n_i > 1, (n_i - d_i) / np.maximum(n_i - 1, 1), 1.0) * d_i / n_i**2
    v = np.diag((f * n_i) @ n_ij) - (n_ij * f[:, None]).T @ n_ij
    stat = float(z[:-1] @ np.linalg.pinv(v[:-1, :-1]) @ z[:-1])
    df = k - 1
    return {"statistic": stat, "p_value": float(stats.chi2.sf(stat, df)), "df": df}
