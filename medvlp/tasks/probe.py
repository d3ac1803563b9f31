"""Linear probes on frozen embeddings: per-finding logistic regression and a label-efficiency curve.

For each finding, the labelled training rows (1 or 0; uncertain -1 and unknown NaN are left out) are subsampled
per class, so each fraction keeps the class balance, and the subsamples are nested (one shuffle per class, the
first ``round(fraction * n_class)`` rows). A point needs at least :data:`MIN_PER_CLASS` positives and negatives
in its subsample and both classes in the test split; otherwise it is recorded as skipped with the reason.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

__all__ = ["MIN_PER_CLASS", "linear_probe", "stratified_subsample"]

MIN_PER_CLASS = 2


def _array(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def stratified_subsample(
    labels: np.ndarray, fraction: float, rng_or_order: np.random.Generator | dict[int, np.ndarray]
) -> np.ndarray:
    """Indices of a per-class subsample of ``round(fraction * n_class)`` rows of each class (0 and 1).

    Args:
        labels: ``[N]`` with 1/0 (other values are never picked).
        fraction: in (0, 1].
        rng_or_order: a generator (shuffles here) or ``{class: shuffled indices}`` (nested subsamples).

    Returns:
        Sorted row indices.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if isinstance(rng_or_order, dict):
        order = rng_or_order
    else:
        order = {c: rng_or_order.permutation(np.flatnonzero(labels == c)) for c in (0, 1)}
    picked = [order[c][: math.floor(fraction * len(order[c]) + 0.5)] for c in (0, 1)]
    return np.sort(np.concatenate(picked)).astype(int)


def linear_probe(
    train_emb: Any,
    train_labels: np.ndarray,
    test_emb: Any,
    test_labels: np.ndarray,
    findings: Sequence[str],
    fractions: Sequence[float] = (0.01, 0.1, 1.0),
    seed: int = 0,
    C: float = 1.0,
    max_iter: int = 2000,
) -> dict[str, Any]:
    """Per-finding logistic-regression probes at several training-label fractions.

    Args:
        train_emb: ``[N, E]`` frozen training embeddings (array or tensor).
        train_labels: ``[N, F]`` with 1/0/-1/NaN.
        test_emb: ``[M, E]``.
        test_labels: ``[M, F]``.
        findings: the ``F`` names.
        fractions: fractions of each finding's labelled training rows to train on.
        seed: subsampling seed (the subsample of finding ``j`` uses ``default_rng([seed, j])``).
        C: inverse L2 regularization strength.
        max_iter: lbfgs iterations.

    Returns:
        ``{"fractions": {fraction: {"per_finding": {name: {auroc, n_train, n_pos, n_neg}}, "mean_auroc",
        "n_findings"}}, "curve": {fraction: mean_auroc}, "skipped": [{fraction, finding, reason}]}``.
        A skipped point has AUROC NaN and is left out of the mean; ``mean_auroc`` is NaN when every finding at
        that fraction was skipped. Models are ``StandardScaler`` + ``LogisticRegression(class_weight="balanced")``.
    """
    x_train, x_test = _array(train_emb), _array(test_emb)
    y_train = _array(train_labels).reshape(len(x_train), -1)
    y_test = _array(test_labels).reshape(len(x_test), -1)
    if y_train.shape[1] != len(findings) or y_test.shape[1] != len(findings):
        raise ValueError(f"labels {y_train.shape}/{y_test.shape} do not match {len(findings)} findings")
    results: dict[float, dict[str, Any]] = {
        float(f): {"per_finding": {}, "mean_auroc": float("nan"), "n_findings": 0} for f in fractions
    }
    skipped: list[dict[str, Any]] = []
    for j, name in enumerate(findings):
        rng = np.random.default_rng([seed, j])
        order = {c: rng.permutation(np.flatnonzero(y_train[:, j] == c)) for c in (0, 1)}
        test_rows = np.flatnonzero(np.isin(y_test[:, j], (0.0, 1.0)))
        yt = y_test[test_rows, j].astype(int)
        test_ok = len(np.unique(yt)) == 2
        for fraction in results:
            idx = stratified_subsample(y_train[:, j], fraction, order)
            ys = y_train[idx, j].astype(int)
            n_pos, n_neg = int(ys.sum()), int(len(ys) - ys.sum())
            entry: dict[str, Any] = {"auroc": float("nan"), "n_train": len(idx), "n_pos": n_pos, "n_neg": n_neg}
            results[fraction]["per_finding"][name] = entry
            reason = None
            if n_pos < MIN_PER_CLASS or n_neg < MIN_PER_CLASS:
                reason = (
                    f"{n_pos} positives and {n_neg} negatives in the {fraction:g} subsample "
                    f"(need {MIN_PER_CLASS} of each)"
                )
            elif not test_ok:
                reason = f"the test split has {len(yt)} labelled rows of a single class"
            if reason is not None:
                skipped.append({"fraction": fraction, "finding": name, "reason": reason})
                continue
            clf = make_pipeline(StandardScaler(), LogisticRegression(C=C, class_weight="balanced", max_iter=max_iter))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                clf.fit(x_train[idx], ys)
            entry["auroc"] = float(roc_auc_score(yt, clf.predict_proba(x_test[test_rows])[:, 1]))
    for res in results.values():
        scores = [m["auroc"] for m in res["per_finding"].values() if np.isfinite(m["auroc"])]
        res["n_findings"] = len(scores)
        res["mean_auroc"] = float(np.mean(scores)) if scores else float("nan")
    return {
        "fractions": results,
        "curve": {f: r["mean_auroc"] for f, r in results.items()},
        "skipped": skipped,
    }
