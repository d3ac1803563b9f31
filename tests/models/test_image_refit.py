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


def test_an_unfitted_refit_with_cells_keeps_the_tokens_on_its_grid() -> None:
    """Before a fit the cells' tokens are the tower's, interpolated onto the cells' grid: a tower's grid that is the
    cells' passes unchanged in direction."""
    refit = ImageRefit(8, spatial_dims=2, axis=0, kinds=["margins"], image_size=(32, 24), cell=8)
    assert refit.grid == (4, 3) and tuple(refit.cell_mean.shape) == (12, refit.spots.num_statistics)
    images, embedding, tokens = torch.rand(2, 1, 32, 24), torch.randn(2, 8), torch.randn(2, 12, 8) * 3
    new_embedding, new_tokens, grid = refit.refit(images, embedding, tokens, (4, 3))
    assert grid == (4, 3)
    torch.testing.assert_close(new_tokens, F.normalize(embedding, dim=-1)[:, None].expand(-1, 12, -1))
    torch.testing.assert_close(new_embedding, refit(images, embedding))
    _, coarse, grid = refit.refit(images, embedding, tokens[:, :2], (2, 1))  # any tower's grid: the cells'
    assert grid == (4, 3) and coarse.shape == (2, 12, 8)
    with pytest.raises(ValueError, match="image size"):
        ImageRefit(8, spatial_dims=2, axis=0, kinds=["margins"], cell=8)
    with pytest.raises(ValueError, match="needs image_refit"):
        ModelConfig(image_encoder="tiny_vit", spatial_dims=2, image_size=(32, 32), image_refit_cell=8)


def test_a_refitted_token_stands_out_where_a_spot_exceeds_its_cells_usual() -> None:
    """A map that sends the bright spots' margins to one direction and the constant to another: a small bright spot
    moves its own cell's token along the spots' direction five times as far as any other cell's, or any cell of an
    image of noise alone; statistics below their cell's usual count for nothing."""
    refit = ImageRefit(4, spatial_dims=2, axis=0, kinds=["margins"], image_size=(32, 32), cell=8)
    n = refit.spots.num_statistics
    weight = torch.zeros(4 + n + 1, 4)
    bright = [4 + col for col in range(n) if col // 4 % 2 == 0]  # per map 4 columns; bright, then dark maps
    weight[bright, 0] = 1.0
    weight[-1, 1] = 1.0
    noise = torch.randn(40, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 0.1
    cells = refit.spots.cell_statistics(noise, refit.grid)
    mean, std = torch.nanmean(cells, 0), cells.nan_to_num(0.0).std(0)
    refit.set(torch.zeros(n), torch.ones(n), weight)
    refit.set_cells(mean.nan_to_num(0.0), torch.where(std > 0, std, torch.ones_like(std)))
    image = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(1)) * 0.1
    image[0, 0, 19:21, 11:13] += 2.0  # the middle of cell (2, 1) of the 4 x 4 grid: row-major index 9
    _, tokens, grid = refit.refit(image, torch.randn(2, 4), torch.randn(2, 16, 4), (4, 4))
    toward = tokens[..., 0]  # [2, 16]: along the spots' direction (the constant's stays 1)
    assert grid == (4, 4) and int(toward[0].argmax()) == 9 and torch.allclose(tokens[..., 1], torch.ones(2, 16))
    assert toward[0, 9] > 5 * toward[0].topk(2).values[1] and toward[0, 9] > 5 * toward[1].max()
    assert toward.min() >= 0  # the noise's spots below their cells' usual count for nothing


def test_fit_with_cells_refits_the_tokens_in_the_folder(tmp_path: Path) -> None:
    """Fitted with cells, the folder's model gives the cells' tokens (grounding reads them), the record names the grid,
    and the cells over the bright patch differ from those around it."""
    from medvlp.tasks.grounding import similarity_maps

    model_dir = tiny_model_dir(tmp_path / "model")
    cache = side_cohort(24, seed=0, axis=0)
    record = fit_image_refit(model_dir, cache, ["findings"], ["levels"], cell=8)
    assert record["ridge"] is not None and record["cell"] == 8 and record["token_grid"] == [4, 4]
    after = MedVLP.from_pretrained(model_dir)
    assert after.config.image_refit_cell == 8 and after.image_refit.grid == (4, 4)
    images = torch.stack([torch.as_tensor(cache.load_image(s)) for s in cache.split("val")["study"][:4]])
    with torch.no_grad():
        out = after.forward_image(images)
    assert out.grid == (4, 4) and out.tokens.shape == (4, 16, 16)
    assert torch.cdist(out.tokens[0], out.tokens[0]).max() > 1e-4
    assert similarity_maps(after, images, ["Small left pleural effusion."] * 4).shape == (4, 32, 32)


def test_the_untrained_baseline_has_no_refit(tmp_path: Path) -> None:
    """The card's untrained model is the architecture with nothing fitted: no refit, so its tokens are its tower's
    (an unfitted refit with cells would give every cell the image's embedding: a flat map)."""
    from medvlp.evaluate import _untrained

    folder = tiny_model_dir(tmp_path / "model")
    model = MedVLP.from_pretrained(folder)
    model.config = model.config.model_copy(update={"image_refit": ("margins",), "image_refit_cell": 8})
    baseline = _untrained(model)
    assert baseline.image_refit is None and baseline.config.image_refit_cell is None
    with torch.no_grad():
        out = baseline.forward_image(torch.rand(2, 1, 32, 32))
    assert torch.cdist(out.tokens[0], out.tokens[0]).max() > 1e-3
