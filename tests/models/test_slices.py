"""The 2.5D slice tower: slabs, token grid, pooling, checkpoints and bad arguments."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch

from medvlp.models import MedVLP, ModelConfig, create_image_encoder, list_image_encoders, load_image_checkpoint
from medvlp.models.slices import SliceImageEncoder

SIZE = (32, 48, 12)


def test_registered_for_3d_only() -> None:
    assert {"tiny_slices", "resnet10t_slices", "timm_slices"} <= set(list_image_encoders(3))
    assert "tiny_slices" not in list_image_encoders(2)
    with pytest.raises(ValueError, match="3D images only"):
        create_image_encoder("tiny_slices", 2, (32, 32))


def test_slabs_are_neighbouring_slices_edge_padded() -> None:
    enc = create_image_encoder("tiny_slices", 3, (4, 4, 5))
    x = torch.arange(5.0).expand(2, 1, 4, 4, 5)  # voxel value = its slice index
    slabs = enc._slabs(x)  # [B * Z', slab, X, Y]
    assert slabs.shape == (10, 3, 4, 4)
    got = slabs[:5, :, 0, 0].tolist()
    assert got == [[0, 0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 4], [3, 4, 4]]
    strided = SliceImageEncoder(3, (4, 4, 5), "test_resnet", slab=1, slice_stride=2)
    assert strided._slabs(x)[:3, 0, 0, 0].tolist() == [0, 2, 4]


def test_tokens_of_a_slice_see_only_its_slab() -> None:
    """Shared 2D weights: changing slice 9 leaves the tokens of slices 0..7 (whose slabs exclude it) unchanged."""
    torch.manual_seed(0)
    enc = create_image_encoder("tiny_slices", 3, SIZE).eval()
    x = torch.randn(1, 1, *SIZE)
    y = x.clone()
    y[..., 9] += 5.0
    with torch.no_grad():
        a, b = enc(x), enc(y)
    gx, gy, gz = a.grid
    assert gz == SIZE[2]
    ta = a.tokens.reshape(1, gx, gy, gz, -1)
    tb = b.tokens.reshape(1, gx, gy, gz, -1)
    torch.testing.assert_close(ta[:, :, :, :8], tb[:, :, :, :8])
    assert not torch.allclose(ta[:, :, :, 8:11], tb[:, :, :, 8:11])
    assert not torch.allclose(a.embedding, b.embedding)


def test_token_grid_matches_the_2d_backbone_per_slice() -> None:
    enc = create_image_encoder("tiny_slices", 3, SIZE, slab=1).eval()
    x = torch.randn(2, 1, *SIZE)
    with torch.no_grad():
        out = enc(x)
        per_slice = enc.slices(x[..., 5])  # the shared 2D tower on slice 5 alone
    gx, gy, gz = out.grid
    assert (gx, gy) == per_slice.grid and gz == SIZE[2]
    tokens = out.tokens.reshape(2, gx, gy, gz, -1)[:, :, :, 5].reshape(2, gx * gy, -1)
    torch.testing.assert_close(tokens, per_slice.tokens)


def test_max_pooling_and_stride() -> None:
    enc = create_image_encoder("tiny_slices", 3, SIZE, pooling="max", slice_stride=4)
    assert enc.slice_score is None
    out = enc(torch.randn(2, 1, *SIZE))
    assert out.grid[2] == 3 and torch.isfinite(out.embedding).all()
    out.embedding.sum().backward()
    assert all(p.grad is not None for p in enc.parameters())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"slab": 2}, "odd"),
        ({"slab": 0}, "odd"),
        ({"slice_stride": 0}, "slice_stride"),
        ({"pooling": "mean"}, "mean"),
        ({"in_chans": 3}, "in_chans"),
        ({"model_name": "resnet10tt"}, "did you mean"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        create_image_encoder("tiny_slices", 3, SIZE, **kwargs)


def test_rejects_several_channels() -> None:
    enc = create_image_encoder("tiny_slices", 3, SIZE)
    with pytest.raises(ValueError, match=r"\[B, 1, X, Y, Z\]"):
        enc(torch.randn(1, 3, *SIZE))


def test_three_channel_2d_checkpoint_fills_the_shared_backbone(tmp_path: Path) -> None:
    rgb = timm.create_model("resnet10t", pretrained=False, in_chans=3, num_classes=1000).eval()
    path = tmp_path / "resnet10t.pth"
    torch.save(rgb.state_dict(), path)
    enc = create_image_encoder("resnet10t_slices", 3, (64, 64, 8))  # slab 3: the RGB filters fit as they are
    report = load_image_checkpoint(enc, path)
    assert sorted(report["missing"]) == ["head_norm.bias", "head_norm.weight", "slice_score.weight"]
    assert set(report["unexpected"]) == {"fc.weight", "fc.bias"} and report["adapted"] == []
    torch.testing.assert_close(enc.slices.backbone.conv1[0].weight, rgb.conv1[0].weight)


def test_joint_model_with_slice_tower_saves_and_loads(tmp_path: Path) -> None:
    config = ModelConfig(
        image_encoder="tiny_slices",
        image_encoder_args={"pooling": "max"},
        spatial_dims=3,
        image_size=SIZE,
        text_num_layers=1,
        embed_dim=8,
    )
    model = MedVLP(config).eval()
    images = torch.rand(2, 1, *SIZE)
    with torch.no_grad():
        out = model(images, ["a renal cyst", "no finding"])
    assert out.image_features.shape == (2, 8) and len(out.image_grid) == 3 and out.image_grid[2] == SIZE[2]
    loaded = MedVLP.from_pretrained(model.save_pretrained(tmp_path / "model"))
    assert loaded.image_encoder.pooling == "max"
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(images), model.encode_image(images), atol=0, rtol=0)
