"""Fixed spot statistics beside the 3D ResNet's embedding (`image_encoder_args.blobs`) and as maps into its stem
(`spot_maps`)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from medvlp.models import create_image_encoder, load_image_checkpoint
from medvlp.models.blobs import (
    BlobStatistics,
    SpotMaps,
    blob_kinds,
    ceiling_free_levels,
    margin_maps,
    ring_max,
    spot_contrast,
    spot_margins,
)


def _brute_ring_max(x: torch.Tensor, inner: tuple, width: tuple) -> torch.Tensor:
    """The ring's maximum by visiting every voxel and every offset."""
    size = x.shape[2:]
    outer = [i + w for i, w in zip(inner, width, strict=True)]
    out = torch.full_like(x, float("-inf"))
    for at in itertools.product(*(range(n) for n in size)):
        for off in itertools.product(*(range(-o, o + 1) for o in outer)):
            if all(abs(d) <= i for d, i in zip(off, inner, strict=True)):
                continue  # inside the spot
            q = tuple(a + d for a, d in zip(at, off, strict=True))
            if all(0 <= v < n for v, n in zip(q, size, strict=True)):
                idx = (slice(None), slice(None), *at)
                out[idx] = torch.maximum(out[idx], x[(slice(None), slice(None), *q)])
    return out


@pytest.mark.parametrize(
    ("size", "inner", "width"),
    [((7, 6, 5), (1, 0, 0), (1, 2, 1)), ((6, 6, 4), (0, 0, 0), (2, 2, 1)), ((8, 7), (1, 1), (2, 1))],
)
def test_ring_max_is_the_maximum_over_the_ring_edges_included(size: tuple, inner: tuple, width: tuple) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 1, *size)
    torch.testing.assert_close(ring_max(x, inner, width), _brute_ring_max(x, inner, width))


def test_a_dot_has_a_margin_and_a_line_or_an_edge_of_the_same_brightness_has_none() -> None:
    x = torch.full((1, 1, 16, 16, 8), 0.4)
    dot = x.clone()
    dot[0, 0, 5, 9, 4] = 0.9
    bright, dark = spot_margins(dot, (0, 0, 0), (2, 2, 1))
    assert bright.max().item() == pytest.approx(0.5)  # the dot's height over its flat ring
    assert dark.max().item() <= 1e-6  # nothing darker than its ring
    line = x.clone()
    line[0, 0, :, 9, 4] = 0.9  # a rib-like bar across the image: it runs through every ring along it
    assert spot_margins(line, (0, 0, 0), (2, 2, 1))[0].max().item() <= 1e-6
    edge = x.clone()
    edge[0, 0, 8:] = 0.9  # half the image brighter: an organ's border, not a spot
    assert spot_margins(edge, (1, 1, 1), (3, 3, 2))[0].max().item() <= 1e-6
    hole = x.clone()
    hole[0, 0, 4:7, 4:7, 3:6] = 0.1  # a dark 3 x 3 x 3 block: a dark spot at the matching scale
    assert spot_margins(hole, (1, 1, 1), (3, 3, 2))[1].max().item() == pytest.approx(0.3)


def test_statistics_say_on_which_side_the_spot_is_and_ignore_the_intensity_level() -> None:
    stats = BlobStatistics(32, spatial_dims=3, axis=0)
    assert stats.num_statistics == 32
    base = torch.full((2, 1, 16, 12, 8), 0.4) + 0.01 * torch.rand(1, 1, 16, 12, 8)
    sided = base.clone()
    sided[0, 0, 3, 6, 4] += 0.5  # a dot in the first half along axis 0
    sided[1, 0, 12, 6, 4] += 0.5  # and in the second half
    s = stats.statistics(sided)
    first_max, second_max = s[:, 0], s[:, 2]  # scale 0, bright, maximum of each half
    assert first_max[0] > 0.45 and second_max[0] < 0.05
    assert second_max[1] > 0.45 and first_max[1] < 0.05
    torch.testing.assert_close(stats.statistics(sided + 0.2), s)  # margins: a level shift changes nothing
    assert BlobStatistics(8, spatial_dims=2).statistics(torch.rand(3, 1, 20, 20)).shape == (3, 32)
    with pytest.raises(ValueError, match="spatial axis"):
        BlobStatistics(8, spatial_dims=3, axis=3)


def test_a_bright_soft_tissue_spot_has_its_level_only_away_from_what_the_window_clips() -> None:
    x = torch.full((1, 1, 24, 16, 8), 0.4)
    x[0, 0, 4:7, 6:9, 3:6] = 0.7  # an enhancing mass: brighter than the organs, below the window's top
    x[0, 0, 16:19, 6:9, 3:6] = 0.7  # the same mass against a clipped plate (a rib) that runs through its ring
    x[0, 0, 19, :, :] = 1.0
    level = ceiling_free_levels(x, (1, 1, 1), (3, 3, 2))
    assert level[0, 0, 5, 7, 4].item() == pytest.approx(0.7)  # its own level, where nothing clipped is near
    assert level[0, 0, 17, 7, 4].item() == pytest.approx(0.4)  # beside the plate: the image's minimum
    assert level[0, 0, 12:].max().item() == pytest.approx(0.4)  # nothing within the ring's reach of it
    # per half along axis 0, the maximum level: the first half's mass, the second half nothing but the floor
    stats = BlobStatistics(8, kinds=["levels"])
    s = stats.statistics(x)
    assert stats.num_statistics == 16 and s.shape == (1, 16)
    first_max, second_max = s[0, 8], s[0, 10]  # scale (1, 1, 1): maximum of each half
    assert first_max.item() == pytest.approx(0.7) and second_max.item() == pytest.approx(0.4)


def test_a_faint_spot_in_a_noisy_organ_has_a_contrast_to_noise_and_no_margin_and_an_edge_or_clipped_ring_none() -> None:
    g = torch.Generator().manual_seed(0)
    x = 0.55 + 0.045 * torch.randn(1, 1, 32, 24, 12, generator=g)  # a liver with CT noise, as a 6 mm cache has it
    x[0, 0, 6:11, 9:14, 4:8] -= 0.04  # a hypodense lesion 0.04 below it: within the noise of one voxel
    x[0, 0, 24:, :, :] = 0.0  # air, clipped at the window's floor, from voxel 24 on
    inner, width = (2, 2, 1), (2, 2, 1)
    bright, dark = spot_contrast(x, inner, width)
    assert dark[0, 0, 8, 11, 6].item() > 0.5  # the lesion stands out of its ring's mean by most of a voxel's noise
    assert dark[0, 0, 12:18].max().item() < dark[0, 0, 8, 11, 6].item()  # noise alone, in the same organ
    assert spot_margins(x, inner, width)[1][0, 0, 8, 11, 6].item() <= 0  # not darker than *every* ring voxel
    assert dark[0, 0, 20:].max().item() == 0 and bright[0, 0, 20:].max().item() == 0  # its ring reaches the air
    edge = torch.full((1, 1, 32, 24, 12), 0.3)
    edge[0, 0, 16:] = 0.6  # two organs side by side, no noise, nothing clipped (both below the top)
    edge[0, 0, 0, 0, 0], edge[0, 0, -1, -1, -1] = 0.0, 1.0  # the window's floor and top, far away
    b, d = spot_contrast(edge, inner, width)
    assert max(b[0, 0, 8:24, 6:18, 4:8].max().item(), d[0, 0, 8:24, 6:18, 4:8].max().item()) < 1.5  # a wide ring
    flat = torch.full((1, 1, 16, 12, 8), 0.4)
    assert all(m.abs().max().item() == 0 for m in spot_contrast(flat, inner, width))  # no noise: nothing, no nan
    stats = BlobStatistics(8, kinds=["margins", "contrast"])
    assert stats.num_statistics == 32 + 32 and stats.statistics(x).shape == (1, 64)
    assert BlobStatistics(8, spatial_dims=2, kinds=["contrast"]).num_statistics == 8 * 3  # in-plane sizes, each once


def test_blob_kinds_are_checked_and_the_margins_come_first() -> None:
    assert blob_kinds(True) == ("margins",)
    assert blob_kinds(["levels", "margins"]) == ("margins", "levels") and blob_kinds("levels") == ("levels",)
    for bad in (False, [], ["spots"], "margin"):
        with pytest.raises(ValueError, match="blobs must be true or a list of margins, levels"):
            blob_kinds(bad)
    torch.manual_seed(0)
    x = torch.rand(2, 1, 16, 12, 8)
    both = BlobStatistics(8, kinds=["margins", "levels"])
    assert both.num_statistics == 48
    torch.testing.assert_close(both.statistics(x)[:, :32], BlobStatistics(8).statistics(x))  # `true` unchanged
    with pytest.raises(ValueError, match="two halves along axis 0, and this image has 1 voxel"):
        BlobStatistics(8).statistics(torch.rand(1, 1, 1, 12, 8))


@pytest.mark.parametrize(
    ("args", "head", "new_keys"),
    [
        ({"blobs": True}, "blobs.proj.weight", {"blobs.proj.weight", "blobs.proj.bias", "blobs.norm.weight"}),
        (
            {"blobs": True, "spot_maps": True},
            "spot_maps.conv.weight",
            {"spot_maps.conv.weight", "spot_maps.norm.weight", "blobs.proj.weight"},
        ),
    ],
)
def test_resnet_with_spot_heads_starts_as_without_trains_them_and_loads_a_plain_checkpoint(
    tmp_path: Path, args: dict, head: str, new_keys: set
) -> None:
    """The spot statistics (`blobs`) and the spot maps into the stem (`spot_maps`) start at zero, learn, load a plain
    backbone checkpoint and stay trainable on a locked tower, whose stem stays frozen."""
    torch.manual_seed(0)
    size = (32, 32, 16)
    enc = create_image_encoder("tiny_resnet", 3, size, **args)
    plain = create_image_encoder("tiny_resnet", 3, size)
    save_file(plain.state_dict(), tmp_path / "plain.safetensors")
    report = load_image_checkpoint(enc, tmp_path / "plain.safetensors", strict=True)
    assert new_keys <= set(report["missing"])
    x = torch.rand(4, 1, *size)
    with torch.no_grad():
        torch.testing.assert_close(enc.eval()(x).embedding, plain.eval()(x).embedding)  # a zero residual at first
    enc.train()
    enc(x).embedding.sum().backward()
    assert dict(enc.named_parameters())[head].grad.abs().sum() > 0
    enc.lock(0)  # heads: trainable on a locked tower
    trainable = {n for n, p in enc.named_parameters() if p.requires_grad}
    assert new_keys <= trainable and "backbone.conv1.weight" not in trainable


def test_the_3d_demo_config_builds_its_resnet_with_the_statistics() -> None:
    from medvlp.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "demo-3d.yaml")
    args = cfg.model["image_encoder_args"]
    assert args.get("blobs") == ["margins", "contrast"]
    assert "mined_reports" in cfg.stages.stage2_align.prompt_forms
    assert cfg.stages.stage2_align.image_refit == ["margins", "levels", "contrast"]
    enc = create_image_encoder(cfg.model["image_encoder"], 3, (64, 64, 32), **args)
    assert isinstance(enc.blobs, BlobStatistics) and enc.blobs.num_statistics == 64


def test_spot_maps_mark_where_a_dot_is_bright_or_dark_and_leave_a_bar_and_an_edge_out() -> None:
    stem = torch.nn.Conv3d(1, 4, 7, stride=2, padding=3)
    spots = SpotMaps(stem, 3)
    flat = torch.full((1, 1, 16, 16, 8), 0.4)
    dot, hole, bar, edge = flat.clone(), flat.clone(), flat.clone(), flat.clone()
    dot[0, 0, 3, 4, 4] = 0.9
    hole[0, 0, 10:13, 9:12, 3:6] = 0.1  # a dark 3 x 3 x 3 block
    bar[0, 0, :, 9, 4] = 0.9  # a rib-like bar across the image
    edge[0, 0, 8:] = 0.9  # half the image brighter: an organ's border
    maps = spots.maps(torch.cat([dot, hole, bar, edge]))
    assert maps.shape == (4, 2, 16, 16, 8) and maps.min().item() >= 0.0
    assert maps[0, 0].flatten().argmax().item() == (3 * 16 + 4) * 8 + 4  # the dot, where it is
    assert maps[0, 0, 3, 4, 4].item() == pytest.approx(0.5) and maps[0, 1].max().item() <= 1e-6
    assert maps[1, 1, 11, 10, 4].item() == pytest.approx(0.3) and maps[1, 0].max().item() <= 1e-6
    assert maps[2:].max().item() <= 1e-6  # neither the bar nor the edge is a spot, bright or dark
    margins = margin_maps(dot, spots.scales)  # computed once, shared with the statistics: the same numbers
    assert torch.equal(spots.maps(dot, margins), maps[:1])
    stats = BlobStatistics(8)
    assert torch.equal(stats.statistics(dot, margins), stats.statistics(dot))  # bit for bit: `blobs` alone as before
    x = torch.rand(2, 1, 16, 16, 8)
    assert spots(x).shape == stem(x).shape  # the stem's output grid, added to it
    with pytest.raises(ValueError, match="3D convolutional stem"):
        SpotMaps(torch.nn.Conv2d(1, 4, 3), 3)
    with pytest.raises(ValueError, match="odd kernel padded by half of it"):  # its output grid would not be the stem's
        SpotMaps(torch.nn.Conv3d(1, 4, (4, 7, 7), stride=2, padding=(2, 3, 3)), 3)
    enc2d = create_image_encoder("monai_resnet", 2, (32, 32), depth=10, block_inplanes=[8, 8, 8, 8], spot_maps=True)
    assert enc2d(torch.rand(2, 1, 32, 32)).embedding.shape == (2, 8)  # 2D: the in-plane sizes


def test_tower_drop_leaves_some_training_samples_to_the_statistics_alone_and_never_drops_at_evaluation() -> None:
    torch.manual_seed(0)
    size = (32, 32, 16)
    enc = create_image_encoder("tiny_resnet", 3, size, blobs=True, tower_drop=0.5)
    ref = create_image_encoder("tiny_resnet", 3, size, blobs=True)
    ref.load_state_dict(enc.state_dict())
    x = torch.rand(16, 1, *size)
    with torch.no_grad():
        for p in enc.blobs.parameters() if enc.blobs is not None else []:
            p.normal_(0, 0.1)  # as training leaves the statistics' map: not zero
        ref.load_state_dict(enc.state_dict())
        dropped = enc.train()(x).embedding
        full = ref.train()(x).embedding
        stats = enc.blobs(x) if enc.blobs is not None else None
    assert stats is not None
    alone = [i for i in range(16) if torch.allclose(dropped[i], stats[i], atol=1e-5)]
    kept = [i for i in range(16) if torch.allclose(dropped[i], 2 * (full[i] - stats[i]) + stats[i], atol=1e-4)]
    assert 0 < len(alone) < 16 and sorted(alone + kept) == list(range(16))  # each sample one way or the other
    ref.load_state_dict(enc.state_dict())  # the same running statistics (the extra call above moved enc's)
    with torch.no_grad():
        torch.testing.assert_close(enc.eval()(x).embedding, ref.eval()(x).embedding)  # evaluation: both, always
    with pytest.raises(ValueError, match="tower_drop is a probability below 1"):
        create_image_encoder("tiny_resnet", 3, size, tower_drop=1.0)
