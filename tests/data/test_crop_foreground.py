"""The crop to the body: air costs no voxels, and boxes still land on their lesion."""

from __future__ import annotations

import numpy as np
import pytest

from medvlp.data.cohort import PreprocessSpec, WindowIntensity
from medvlp.data.image import MedicalImage
from medvlp.data.preprocess import body_threshold, map_boxes, preprocess_image

SPACING = (2.0, 2.0, 3.0)


def _ct() -> tuple[MedicalImage, np.ndarray]:
    """A 96 x 96 x 40 volume of air with a 40 x 30 x 24 body off-centre and a 4 x 4 x 3 bright lesion inside."""
    vol = np.full((96, 96, 40), -1000.0, np.float32)
    vol[10:50, 50:80, 8:32] = 40.0
    vol[20:24, 60:64, 15:18] = 200.0
    affine = np.diag([*SPACING, 1.0])
    box = np.array([[20, 60, 15, 4, 4, 3]], float)
    return MedicalImage(array=vol, spacing=SPACING, affine=affine), box


def _spec(crop: bool) -> PreprocessSpec:
    return PreprocessSpec(
        size=(48, 48, 24), intensity=WindowIntensity(mode="window", center=40, width=400), crop_foreground=crop
    )


def test_the_body_threshold_separates_air_from_tissue() -> None:
    image, _ = _ct()
    t = body_threshold(image.array)
    assert -1000 < t < -100


@pytest.mark.parametrize("crop", [False, True])
def test_boxes_follow_the_crop(crop: bool) -> None:
    image, box = _ct()
    out = preprocess_image(image, _spec(crop))
    mapped = map_boxes(box, out.source_to_output, (48, 48, 24))[0]
    lo = np.floor(mapped[:3]).astype(int)
    hi = np.ceil(mapped[:3] + mapped[3:]).astype(int)
    inside = out.array[0, lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]].astype(float)
    assert inside.max() > 0.8, "the bright lesion is inside its mapped box"


def test_the_crop_spends_the_grid_on_the_body() -> None:
    image, box = _ct()
    full, cropped = (preprocess_image(image, _spec(c)) for c in (False, True))
    size = (48, 48, 24)
    lesion_full = map_boxes(box, full.source_to_output, size)[0, 3:].prod()
    lesion_cropped = map_boxes(box, cropped.source_to_output, size)[0, 3:].prod()
    assert lesion_cropped > 2 * lesion_full, "the lesion gets more voxels once the air is gone"
    assert (cropped.array > 0.2).mean() > 2 * (full.array > 0.2).mean()


def test_a_constant_image_is_kept_whole() -> None:
    vol = np.zeros((16, 16, 8), np.float32)
    image = MedicalImage(array=vol, spacing=(1.0, 1.0, 1.0), affine=np.eye(4))
    out = preprocess_image(image, _spec(True).model_copy(update={"size": (16, 16, 8)}))
    assert out.array.shape == (1, 16, 16, 8)
