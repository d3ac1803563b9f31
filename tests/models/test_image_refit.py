"""The image refit: an identity until fitted, a ridge map fitted on train pairs without labels and chosen on val, in
the model folder's weights and config, the tokens untouched, and the same model when fitted twice."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medvlp.models import MedVLP, ModelConfig
from medvlp.models.image_refit import ImageRefit
from medvlp.tasks.embed import embed_split
from medvlp.tasks.image_refit import IMAGE_REFIT_RECORD, fit_image_refit, ridge_map

from .side_cohort import side_cohort, tiny_model_dir


def test_an_unfitted_refit_keeps_the_embeddings_direction() -> None:
    refit = ImageRefit(8, spatial_dims=2, axis=0, kinds=["margins", "levels"])
    assert refit.num_features == 8 + refit.spots.num_statistics + 1
    images, embedding = torch.rand(3, 1, 16, 16), torch.randn(3, 8) * 4
    torch.testing.assert_close(refit(images, embedding), F.normalize(embedding, dim=-1))
    with pytest.raises(ValueError, match="map"):
        refit.set(refit.mean, refit.scale, torch.zeros(3, 8))


def test_ridge_map_recovers_a_linear_map_and_leaves_the_constant_free() -> None:
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(size=(200, 5)), np.ones((200, 1))], axis=1)
    w = rng.normal(size=(6, 3))
    torch.testing.assert_close(torch.as_tensor(ridge_map(x, x @ w, 1e-9)), torch.as_tensor(w), rtol=1e-6, atol=1e-6)
    heavy = ridge_map(x, x @ w + 5.0, 1e9)  # every penalised row goes to zero, the constant takes the mean
    assert np.abs(heavy[:-1]).max() < 1e-3
    np.testing.assert_allclose(heavy[-1], (x @ w + 5.0).mean(0), atol=1e-2)


def test_an_unknown_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="kind"):
        ModelConfig(image_encoder="tiny_vit", spatial_dims=2, image_size=(32, 32), image_refit=("edges",))


def test_fit_maps_each_image_to_its_own_sides_report_and_survives_the_folder(tmp_path: Path) -> None:
    """An untrained model does not see the side of a bright patch; its per-half spot levels do, and the refit,
    fitted on the reports alone, makes each val image prefer the report of its own side."""
    model_dir = tiny_model_dir(tmp_path / "model")
    cache = side_cohort(24, seed=0, axis=0)
    before = MedVLP.from_pretrained(model_dir)
    record = fit_image_refit(model_dir, cache, ["findings"], ["levels"])
    assert record["ridge"] is not None and record["train_pairs"] == 24 and record["val_pairs"] == 24
    chosen = str(record["ridge"])
    assert record["val_mean_rank"][chosen] < record["val_mean_rank"]["none"]
    assert json.loads((model_dir / IMAGE_REFIT_RECORD).read_text()) == record
    after = MedVLP.from_pretrained(model_dir)
    assert after.config.image_refit == ("levels",) and after.image_refit is not None
    val = embed_split(after, cache, "val", ["findings"])
    texts = (
        after.encode_text(
            ["Small left pleural effusion. The heart is normal.", "Small right pleural effusion. The heart is normal."]
        )
        .detach()
        .numpy()
    )
    left = np.array(["left" in r for r in val.reports])
    prefers_left = (val.image @ texts[0]) > (val.image @ texts[1])
    assert (prefers_left == left).mean() >= 0.9
    images = torch.stack([torch.as_tensor(cache.load_image(s)) for s in val.records["study"][:4]])
    with torch.no_grad():
        old, new = before.forward_image(images), after.forward_image(images)
    torch.testing.assert_close(new.tokens, old.tokens)  # grounding reads the tokens: unchanged
    assert not torch.allclose(new.embedding, old.embedding)
    weights = {k: v.clone() for k, v in after.state_dict().items()}
    assert fit_image_refit(model_dir, cache, ["findings"], ["levels"]) == record  # a refit starts from the model
    again = MedVLP.from_pretrained(model_dir).state_dict()
    assert weights.keys() == again.keys() and all(torch.equal(weights[k], again[k]) for k in weights)


def test_no_refit_when_none_beats_the_trained_embedding(tmp_path: Path) -> None:
    """Every image of a split the same: no map can tell two studies apart any better than the model does, the tie
    goes to no refit, and the folder keeps the model without one."""
    model_dir = tiny_model_dir(tmp_path / "model")
    cache = side_cohort(24, seed=0, axis=0)
    noise = np.random.default_rng(3)
    images = {split: noise.normal(0, 0.1, (1, 32, 32)).astype(np.float32) for split in ("train", "val")}
    cache.load_image = lambda study: images[study.split("-")[0]]
    config = json.loads((model_dir / "config.json").read_text())["config"]
    record = fit_image_refit(model_dir, cache, ["findings"], ["margins"])
    assert record["ridge"] is None and record["val_r10"]["none"] == max(record["val_r10"].values())
    assert MedVLP.from_pretrained(model_dir).image_refit is None
    assert json.loads((model_dir / "config.json").read_text())["config"] == config
