"""Percentile bootstrap intervals, resampling rows or whole clusters (all studies of one subject together).

Studies of one patient are not independent: resampling them one by one gives intervals that are too narrow. With
``groups`` (one subject pseudonym per row) :func:`bootstrap_ci` draws subjects with replacement and keeps every row
of each drawn subject, the cluster bootstrap.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = ["bootstrap_ci"]


def _members(groups: np.ndarray) -> list[np.ndarray]:
    _, inverse = np.unique(groups, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    return np.split(order, np.flatnonzero(np.diff(inverse[order])) + 1)


def bootstrap_ci(
    metric_fn: Callable[..., float],
    *arrays: Any,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    groups: Any = None,
) -> tuple[float, float, float]:
    """Percentile bootstrap confidence interval of ``metric_fn(*arrays)``.

    Resample indices come from ``np.random.default_rng(seed)``; every array is indexed along its first axis with the
    same indices. A resample on which ``metric_fn`` raises ``ValueError`` (e.g. no events, no comparable pairs) or
    returns NaN is dropped with a warning.

    Args:
        metric_fn: ``metric_fn(*resampled_arrays) -> float``, e.g. ``concordance_index`` (time, risk, event).
        *arrays: Arrays of equal length n (numpy arrays, or anything ``np.asarray`` accepts).
        n_boot: Number of bootstrap resamples.
        alpha: Two-sided level: the interval is the ``alpha/2`` and ``1 - alpha/2`` percentiles.
        seed: Seed for the resampling generator.
        groups: Optional cluster label per row (e.g. the subject); clusters are resampled whole.

    Returns:
        ``(estimate, lo, hi)``: the metric on the full data and the percentile interval.
    """
    if not arrays:
        raise ValueError("bootstrap_ci needs at least one array")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    arrs = [np.asarray(a) for a in arrays]
    n = arrs[0].shape[0] if arrs[0].ndim else 0
    for i, a in enumerate(arrs):
        if a.ndim == 0 or a.shape[0] != n:
            raise ValueError(f"array {i} has length {a.shape[0] if a.ndim else 0}, expected {n} (arrays must align)")
    g = None
    if groups is not None:
        g = np.asarray(groups)
        if g.shape != (n,):
            raise ValueError(f"groups has shape {g.shape}, expected ({n},)")
    estimate = float(metric_fn(*arrs))
    rng = np.random.default_rng(seed)
    boot = np.full(n_boot, np.nan)
    if g is None:  # draw row indices in blocks (bounded memory), as many resamples at once as fit
        block = max(1, min(n_boot, 2**24 // max(n, 1)))
        for b0 in range(0, n_boot, block):
            idx = rng.integers(0, n, size=(min(block, n_boot - b0), n))
            for k, ix in enumerate(idx):
                with contextlib.suppress(ValueError):
                    boot[b0 + k] = metric_fn(*(a[ix] for a in arrs))
    else:
        members = _members(g)
        for b in range(n_boot):
            ix = np.concatenate([members[c] for c in rng.integers(0, len(members), size=len(members))])
            with contextlib.suppress(ValueError):
                boot[b] = metric_fn(*(a[ix] for a in arrs))
    ok = np.isfinite(boot)
    if not ok.any():
        raise ValueError("metric_fn failed on every bootstrap resample")
    if not ok.all():
        warnings.warn(f"{int((~ok).sum())} of {n_boot} bootstrap resamples were dropped", RuntimeWarning, stacklevel=2)
    lo, hi = np.quantile(boot[ok], [alpha / 2, 1 - alpha / 2])
    return estimate, float(lo), float(hi)
