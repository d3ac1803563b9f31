"""Figures and viewer pictures: one orientation rule for the card, the notebooks and the viewer."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest
from PIL import Image

from medvlp.viz import figures, planes
from medvlp.viz.png import heatmap_png, image_png

FINDINGS = ["effusion", "pneumothorax", "edema"]
RAS = np.diag([2.0, 2.0, 3.0, 1.0])  # i -> patient's right, j -> anterior, k -> superior
LPS = np.diag([-2.0, -2.0, 3.0, 1.0])  # i -> patient's left, j -> posterior (DICOM's own axes)


def _labels_probs() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, size=(100, 3)).astype(float)
    probs = np.clip(0.4 * labels + 0.6 * rng.random((100, 3)), 0, 1)
    labels[::9, 1] = -1
    labels[::13, 2] = np.nan
    return labels, probs


def _check_png(path: Path) -> None:
    pixels = mpimg.imread(path)
    assert pixels.shape[0] > 100 and float(np.std(pixels[..., :3])) > 0


def test_card_figures_are_written(tmp_path: Path) -> None:
    labels, probs = _labels_probs()
    labels[:, 2] = np.where(np.isnan(labels[:, 2]), np.nan, 1.0)  # one class: its panel says so
    points = {"effusion": {"threshold": 0.5, "sensitivity": 0.9, "specificity": 0.6}}
    fig = figures.roc_figure(labels, probs, FINDINGS, points)
    assert "one class only" in fig.axes[2].get_title() and fig.axes[0].get_legend() is not None
    for name, f in {
        "roc.png": fig,
        "cal.png": figures.calibration_figure(labels, probs, FINDINGS),
        "eff.png": figures.data_efficiency_figure({"model": {0.1: 0.7, 1.0: 0.9}, "base": {0.1: np.nan, 1.0: 0.6}}),
    }.items():
        _check_png(figures.save_png(f, tmp_path / "sub" / name))


def _marked(affine: np.ndarray) -> np.ndarray:
    """A 20 x 16 x 12 volume with a bright marker in the patient's right, anterior, superior corner."""
    vol = np.zeros((20, 16, 12), dtype=np.float32)
    right = slice(15, 19) if affine[0, 0] > 0 else slice(1, 5)  # RAS: high i is right; LPS: low i is right
    anterior = slice(11, 15) if affine[1, 1] > 0 else slice(1, 5)
    vol[right, anterior, 8:11] = 1.0
    return vol


def _bright(plane: np.ndarray) -> tuple[float, float]:
    rows, cols = np.nonzero(plane > 0.5)
    return cols.mean() / plane.shape[1], rows.mean() / plane.shape[0]  # (across, down) in [0, 1]


def _from_png(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("L"), dtype=np.float32) / 255.0


def _drawn(fig: object) -> list[np.ndarray]:
    """The image arrays a figure's panels draw (the grey layer under any overlay), as ``imshow`` places them."""
    out = []
    for ax in fig.axes:  # type: ignore[attr-defined]
        if ax.images:
            im = ax.images[0]
            left, right, bottom, top = im.get_extent()
            assert left < right and top < bottom  # row 0 at the top, column 0 on the left: drawn as given
            out.append(np.asarray(im.get_array()))
    return out


@pytest.mark.parametrize("affine", [RAS, LPS], ids=["RAS", "LPS"])
def test_the_patients_right_is_on_the_image_left_everywhere(affine: np.ndarray) -> None:
    vol = _marked(affine)
    sim = vol.copy()  # the map peaks on the marker: the slices go through it
    axial, coronal, sagittal = planes(vol, sim, affine=affine)
    for plane in (axial, coronal):
        across, down = _bright(plane.image)
        assert across < 0.5 and down < 0.5, plane.label  # right on the left; anterior (axial) / superior up
    across, down = _bright(sagittal.image)
    assert across < 0.5 and down < 0.5  # anterior on the left, superior up
    # the card's and the notebooks' figure (one function) and the viewer's PNG show the same
    fig = figures.grounding_figure(vol[None, None], sim[None], ["marker"], affines=[affine])
    drawn = _drawn(fig)
    assert len(drawn) == 3
    for arr in drawn[:2]:
        assert _bright(arr)[0] < 0.5
    viewer = _from_png(image_png(planes(vol, sim, affine=affine, views=("axial",))[0].image))
    across, down = _bright(viewer)
    assert across < 0.5 and down < 0.5
    image = figures.image_figure(vol[None, None], ["volume"], [affine])  # no map: the centre slice, same rule
    assert len(_drawn(image)) == 1


def test_2d_is_shown_as_acquired() -> None:
    img = np.zeros((30, 20), dtype=np.float32)  # (X columns, Y rows)
    img[2:6, 14:18] = 1.0  # left columns, bottom rows
    (plane,) = planes(img, boxes=[[2.0, 14.0, 4.0, 4.0]])
    assert plane.image.shape == (20, 30)
    across, down = _bright(plane.image)
    assert across < 0.5 and down > 0.5
    assert plane.boxes == [(2.0, 14.0, 4.0, 4.0)] and plane.index is None
    fig = figures.grounding_figure(img[None, None], img[None], ["a phrase"], [[[2.0, 14.0, 4.0, 4.0]]])
    assert np.array_equal(_drawn(fig)[0], plane.image)


def test_3d_boxes_follow_the_reorientation() -> None:
    vol = _marked(LPS)
    box = [1.0, 1.0, 8.0, 4.0, 4.0, 3.0]  # exactly the marker, in the LPS array's voxels
    axial, coronal, sagittal = planes(vol, vol, [box], affine=LPS)
    for plane in (axial, coronal, sagittal):
        (x, y, w, h) = plane.boxes[0]
        inside = plane.image[int(y) : int(y + h), int(x) : int(x + w)]
        assert inside.size and inside.min() == 1.0, plane.label  # the box lies exactly on the marker
        assert plane.solid == [True]
    shifted = [1.0, 1.0, 0.0, 4.0, 4.0, 2.0]  # slices 0-1: the axial slice through the peak misses it
    assert planes(vol, vol, [shifted], affine=LPS)[0].solid == [False]
    with pytest.raises(ValueError, match="affine"):
        planes(vol, vol)


def test_viewer_heatmap_is_transparent_below_its_floor() -> None:
    plane = np.linspace(0, 1, 100, dtype=np.float32).reshape(10, 10)
    rgba = np.asarray(Image.open(io.BytesIO(base64.b64decode(heatmap_png(plane)))))
    assert rgba.shape == (10, 10, 4) and rgba[0, 0, 3] == 0 and rgba[-1, -1, 3] > 150
