"""Plots: each PNG is written, has the requested pixel size and is not blank."""

from __future__ import annotations

from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest
import torch

from medvlp.tasks.grounding import box_mask
from medvlp.tasks.plots import plot_calibration, plot_data_efficiency, plot_grounding_overlay, plot_roc_curves

FINDINGS = ["effusion", "pneumothorax", "edema"]


def _check(path: Path, width: int, height: int) -> None:
    assert path.is_file() and path.stat().st_size > 0
    pixels = mpimg.imread(path)
    assert pixels.shape[:2] == (height, width)
    assert float(np.std(pixels[..., :3])) > 0


def _labels_probs() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, size=(100, 3)).astype(float)
    probs = np.clip(0.4 * labels + 0.6 * rng.random((100, 3)), 0, 1)
    labels[::9, 1] = -1
    labels[::13, 2] = np.nan
    return labels, probs


def test_roc_and_calibration(tmp_path: Path) -> None:
    labels, probs = _labels_probs()
    labels[:, 2] = np.where(np.isnan(labels[:, 2]), np.nan, 1.0)  # one class: left out of the ROC plot
    roc = plot_roc_curves(labels, probs, FINDINGS, tmp_path / "sub" / "roc.png", figsize=(5, 4), dpi=80)
    assert roc == tmp_path / "sub" / "roc.png"
    _check(roc, 400, 320)
    cal = plot_calibration(labels, probs, FINDINGS, str(tmp_path / "cal.png"))
    _check(Path(cal), 600, 700)


def test_grounding_overlay_2d(tmp_path: Path) -> None:
    size = (48, 32)
    image = np.random.default_rng(0).random(size)
    sim = box_mask((10, 5, 12, 8), size).astype(float)
    path = plot_grounding_overlay(torch.from_numpy(image)[None], sim, (10, 5, 12, 8), tmp_path / "g2.png", "effusion")
    _check(path, 500, 500)
    many = plot_grounding_overlay(image, sim, [(10, 5, 12, 8), (0, 0, 4, 4)], tmp_path / "g2b.png", dpi=50)
    _check(many, 250, 250)
    none = plot_grounding_overlay(image, sim, None, tmp_path / "g2c.png")
    _check(none, 500, 500)


@pytest.mark.parametrize(("views", "width", "height"), [("all", 1200, 450), ("axial", 500, 500)])
def test_grounding_overlay_3d(tmp_path: Path, views: str, width: int, height: int) -> None:
    size = (24, 20, 16)
    image = np.random.default_rng(1).random(size)
    sim = np.zeros(size)
    sim[12, 8, 5] = 1.0
    path = plot_grounding_overlay(image, sim, (10, 6, 4, 6, 5, 4), tmp_path / f"g3-{views}.png", "nodule", views=views)
    _check(path, width, height)
    with pytest.raises(ValueError):
        plot_grounding_overlay(image, sim[..., :-1], None, tmp_path / "bad.png")


def test_data_efficiency(tmp_path: Path) -> None:
    curve = {"medvlp": {0.01: 0.7, 0.1: 0.8, 1.0: 0.85}, "baseline": {0.01: float("nan"), 0.1: 0.72, 1.0: 0.8}}
    path = plot_data_efficiency(curve, tmp_path / "eff.png", figsize=(4, 3), dpi=100)
    _check(path, 400, 300)
