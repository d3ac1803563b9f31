"""Calibration fitted on val: lower ECE on held-out data, the same AUROC, stored in the model folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medvlp.tasks.calibration import (
    apply_calibration,
    ece_floor,
    fit_calibration,
    load_calibration,
    save_calibration,
)
from medvlp.tasks.zeroshot import classification_metrics, expected_calibration_error

FINDINGS = ["effusion", "nodule", "rare"]


def _overconfident(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """True risk r; the model answers sigmoid(4 * logit(r) + 1): right ranking, far too sure, biased upwards."""
    rng = np.random.default_rng(seed)
    risk = rng.uniform(0.05, 0.95, size=(n, 3))
    labels = (rng.random((n, 3)) < risk).astype(float)
    labels[:, 2] = 0.0  # a finding without positives on this split
    z = np.log(risk) - np.log1p(-risk)
    return labels, 1.0 / (1.0 + np.exp(-(4.0 * z + 1.0)))


def test_calibration_lowers_ece_on_held_out_data_and_keeps_the_ranking() -> None:
    val_labels, val_probs = _overconfident(3000, 1)
    labels, probs = _overconfident(3000, 2)
    cal = fit_calibration(val_labels, val_probs, FINDINGS)
    assert cal["fitted_on"] == "val" and set(cal["findings"]) == {"effusion", "nodule"}  # "rare": one class
    assert all(0.15 < c["a"] < 0.35 for c in cal["findings"].values())  # about the 1/4 the model needs
    calibrated, applied = apply_calibration(probs, FINDINGS, cal)
    assert applied == [True, True, False] and np.array_equal(calibrated[:, 2], probs[:, 2])
    before = classification_metrics(labels[:, :2], probs[:, :2], FINDINGS[:2])
    after = classification_metrics(labels[:, :2], calibrated[:, :2], FINDINGS[:2])
    assert after["mean_ece"] < 0.05 < before["mean_ece"]
    assert after["mean_auroc"] == pytest.approx(before["mean_auroc"], abs=1e-12)


def test_stored_in_the_model_folder(tmp_path: Path) -> None:
    labels, probs = _overconfident(200, 3)
    cal = fit_calibration(labels, probs, FINDINGS)
    save_calibration(tmp_path, cal)
    assert load_calibration(tmp_path) == cal
    assert load_calibration(tmp_path / "elsewhere") is None
    (tmp_path / "calibration.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a calibration file"):
        load_calibration(tmp_path)
    with pytest.raises(ValueError, match="do not agree"):
        fit_calibration(labels, probs[:, :2], FINDINGS)


def test_ece_floor_is_what_a_perfectly_calibrated_model_scores_and_falls_with_more_studies() -> None:
    rng = np.random.default_rng(5)
    small, large = rng.uniform(0.02, 0.98, size=(79, 2)), rng.uniform(0.02, 0.98, size=(4000, 2))
    floor_small = ece_floor(np.zeros_like(small), small, draws=400)
    floor_large = ece_floor(np.zeros_like(large), large, draws=100)
    assert np.all(floor_small > 0.06) and np.all(floor_large < 0.03)  # 15 bins on 79 studies: noise alone ~0.1
    # perfectly calibrated labels score about the floor; an overconfident model far above it
    y = (rng.random(small.shape) < small).astype(float)
    ece = [expected_calibration_error(y[:, j], small[:, j]) for j in range(2)]
    assert all(abs(e - f) < 0.06 for e, f in zip(ece, floor_small, strict=True))
    labels, probs = _overconfident(79, 4)
    over = classification_metrics(labels[:, :2], probs[:, :2], FINDINGS[:2])["mean_ece"]
    assert over > 2 * float(np.mean(ece_floor(labels[:, :2], probs[:, :2])))
    # seeded; only rows with a 0/1 label count; a finding without one is NaN
    assert np.array_equal(ece_floor(y, small, seed=3), ece_floor(y, small, seed=3))
    masked = y.copy()
    masked[40:, 0] = np.nan
    masked[:, 1] = -1.0
    got = ece_floor(masked, small, draws=200)
    assert got[0] == pytest.approx(ece_floor(y[:40, :1], small[:40, :1], draws=200)[0], abs=1e-12)
    assert np.isnan(got[1])


def _bent(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The answered score is uniform; the true risk is 0.1 below 0.6 and 0.9 above: no sigmoid of it fits."""
    rng = np.random.default_rng(seed)
    probs = rng.uniform(0.01, 0.99, size=(n, 1))
    labels = (rng.random((n, 1)) < np.where(probs < 0.6, 0.1, 0.9)).astype(float)
    return labels, probs


def test_the_isotonic_step_bends_where_a_sigmoid_cannot_and_never_ties_two_studies() -> None:
    val_labels, val_probs = _bent(2000, 11)
    labels, probs = _bent(4000, 12)
    assert "isotonic" not in fit_calibration(val_labels, val_probs, ["effusion"])["findings"]["effusion"]  # off
    cal = fit_calibration(val_labels, val_probs, ["effusion"], isotonic=True)
    iso = cal["findings"]["effusion"]["isotonic"]
    assert iso["weight"] == pytest.approx(0.98) and len(iso["x"]) == len(iso["y"]) >= 2
    platt_only = {"findings": {"effusion": {k: v for k, v in cal["findings"]["effusion"].items() if k != "isotonic"}}}
    bent = apply_calibration(probs, ["effusion"], cal)[0]
    platt = apply_calibration(probs, ["effusion"], platt_only)[0]  # a calibration from before the isotonic step
    assert expected_calibration_error(labels[:, 0], bent[:, 0]) < 0.5 * expected_calibration_error(
        labels[:, 0], platt[:, 0]
    )
    # strictly increasing: the same order as the raw scores, no two studies tied, the same AUROC
    assert np.array_equal(np.argsort(bent[:, 0], kind="stable"), np.argsort(probs[:, 0], kind="stable"))
    assert len(np.unique(bent[:, 0])) == len(np.unique(probs[:, 0]))
    # too few studies of a class on val: Platt scaling alone
    few = fit_calibration(val_labels[:15], val_probs[:15], ["effusion"], isotonic=True)
    assert "isotonic" not in few["findings"]["effusion"]
