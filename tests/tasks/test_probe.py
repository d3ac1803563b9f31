"""Linear probes: separable data, the label-efficiency curve, skipped points and the stratified subsample."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from medvlp.tasks.probe import linear_probe, stratified_subsample

FINDINGS = ["effusion", "pneumothorax", "edema"]


def _data(n: int, seed: int, noise: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Labels are the signs of the first three coordinates (plus noise in the others)."""
    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((n, 12)) * noise
    score = rng.standard_normal((n, 3))
    emb[:, :3] = score + np.sign(score) * 0.5  # a margin around 0: separable
    labels = (score > 0).astype(float)
    return emb, labels


def test_separable_and_curve() -> None:
    x_train, y_train = _data(3000, 0)
    x_test, y_test = _data(500, 1)
    y_train[::7, 0] = -1  # uncertain and unknown labels are left out
    y_train[::11, 1] = np.nan
    out = linear_probe(x_train, y_train, x_test, y_test, FINDINGS, fractions=(0.01, 0.1, 1.0))
    full = out["fractions"][1.0]
    assert full["n_findings"] == 3 and full["mean_auroc"] > 0.99
    assert full["per_finding"]["effusion"]["n_train"] == int(np.isin(y_train[:, 0], (0, 1)).sum())
    assert full["per_finding"]["pneumothorax"]["n_train"] == int(np.isfinite(y_train[:, 1]).sum())
    curve = out["curve"]
    assert list(curve) == [0.01, 0.1, 1.0]
    assert curve[0.01] > 0.8 and curve[1.0] >= curve[0.1] - 0.005 >= curve[0.01] - 0.02
    assert out["skipped"] == []
    small = out["fractions"][0.01]["per_finding"]["edema"]
    n_pos = int(y_train[:, 2].sum())
    assert small["n_pos"] == round(0.01 * n_pos) and small["n_train"] == round(0.01 * n_pos) + round(
        0.01 * (3000 - n_pos)
    )


def test_auroc_is_the_sklearn_value_on_labelled_test_rows() -> None:
    x_train, y_train = _data(400, 2, noise=3.0)
    x_test, y_test = _data(200, 3, noise=3.0)
    rng = np.random.default_rng(9)  # imbalanced (about 25% positive) and noisy, so class weights matter
    y_train[:, 0] = x_train[:, 0] + x_train[:, 5] + 2 * rng.standard_normal(400) > 3
    y_test[:, 0] = x_test[:, 0] + x_test[:, 5] + 2 * rng.standard_normal(200) > 3
    y_test[:50, 0] = -1
    out = linear_probe(x_train, y_train[:, :1], x_test, y_test[:, :1], FINDINGS[:1], fractions=(1.0,), C=0.5)
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.5, class_weight="balanced", max_iter=2000))
    clf.fit(x_train, y_train[:, 0])
    expected = roc_auc_score(y_test[50:, 0], clf.predict_proba(x_test[50:])[:, 1])
    assert math.isclose(out["fractions"][1.0]["per_finding"]["effusion"]["auroc"], expected, rel_tol=1e-6)


def test_too_few_positives_is_skipped_not_crashed() -> None:
    x_train, y_train = _data(600, 4)
    x_test, y_test = _data(200, 5)
    y_train[:, 1] = 0.0
    y_train[:3, 1] = 1.0  # 3 positives: enough at 100%, not at 10% or 30%
    y_test[:, 2] = 1.0  # the test split has one class
    out = linear_probe(x_train, y_train, x_test, y_test, FINDINGS, fractions=(0.1, 0.3, 1.0))
    skipped = {(s["fraction"], s["finding"]): s["reason"] for s in out["skipped"]}
    assert "positives" in skipped[(0.1, "pneumothorax")] and (0.3, "pneumothorax") in skipped
    assert (1.0, "pneumothorax") not in skipped
    assert math.isfinite(out["fractions"][1.0]["per_finding"]["pneumothorax"]["auroc"])
    assert math.isnan(out["fractions"][0.1]["per_finding"]["pneumothorax"]["auroc"])
    assert all("single class" in skipped[(f, "edema")] for f in (0.1, 0.3, 1.0))
    assert out["fractions"][0.1]["n_findings"] == 1
    assert math.isclose(out["curve"][0.1], out["fractions"][0.1]["per_finding"]["effusion"]["auroc"])
    none = linear_probe(x_train, y_train[:, 1:2], x_test, y_test[:, 1:2], FINDINGS[1:2], fractions=(0.1,))
    assert math.isnan(none["curve"][0.1])


def test_stratified_subsample() -> None:
    labels = np.array([1] * 30 + [0] * 70 + [-1] * 10, dtype=float)
    idx = stratified_subsample(labels, 0.1, np.random.default_rng(0))
    assert len(idx) == 10 and labels[idx].sum() == 3 and np.all(np.isin(labels[idx], (0, 1)))
    order = {c: np.random.default_rng(1).permutation(np.flatnonzero(labels == c)) for c in (0, 1)}
    small, large = stratified_subsample(labels, 0.2, order), stratified_subsample(labels, 0.5, order)
    assert set(small) <= set(large)  # nested
    with pytest.raises(ValueError):
        stratified_subsample(labels, 0.0, order)
