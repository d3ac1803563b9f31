"""Calibration fitted on val: lower ECE on held-out data, the same AUROC, stored in the model folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medvlp.tasks.calibration import apply_calibration, fit_calibration, load_calibration, save_calibration
from medvlp.tasks.zeroshot import classification_metrics

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
