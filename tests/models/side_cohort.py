"""A cohort whose images show the side their reports name, and a small untrained model folder: what the side edit's
and the side check's fits are tried on (tests/models/test_side_edit.py, test_side_check.py)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import torch

from medvlp.models import MedVLP, ModelConfig

SIZE = (32, 32)


def side_cohort(n: int, seed: int, axis: int = 0, spatial_dims: int = 2) -> SimpleNamespace:
    """``n`` radiographs per split (train, val) with a bright patch at the high end of ``axis`` for a left finding and
    the low end for a right one, and reports that say which ("Small left pleural effusion."). ``spatial_dims``: what
    the cache says (3 with no stored orientation: no known left-right axis)."""
    rng = np.random.default_rng(seed)
    images, rows = {}, []
    for split in ("train", "val"):
        for i in range(n):
            left = bool(i % 2)
            image = rng.normal(0, 0.1, (1, *SIZE)).astype(np.float32)
            half = slice(16, 32) if left else slice(0, 16)
            image[(0, half, slice(8, 24)) if axis == 0 else (0, slice(8, 24), half)] += 1.0
            study = f"{split}-{i}"
            images[study] = image
            side = "left" if left else "right"
            rows.append((study, split, f"FINDINGS: Small {side} pleural effusion. The heart is normal."))
    records = pd.DataFrame(rows, columns=["study", "split", "report"])
    return SimpleNamespace(
        findings=[],
        spatial_dims=spatial_dims,
        summary={"preprocess": {"orientation": None}},
        split=lambda s: records[records["split"] == s].reset_index(drop=True),
        load_image=lambda study: images[study],
    )


def tiny_model_dir(folder: Path) -> Path:
    """An untrained 2D model folder (tiny ViT, one text layer, 16-wide embeddings), seeded."""
    torch.manual_seed(0)
    config = ModelConfig(image_encoder="tiny_vit", spatial_dims=2, image_size=SIZE, text_num_layers=1, embed_dim=16)
    return MedVLP(config).save_pretrained(folder)
