"""Image encoders: registry, shapes, gradients, checkpointing and loading users' checkpoints."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from medvlp.models import ImageEncoder, create_image_encoder, list_image_encoders, load_image_checkpoint
from medvlp.models.registry import get_image_encoder_spec

SIZE_2D = (64, 96)
SIZE_3D = (32, 48, 40)
# The 2.5D slice tower keeps one token layer per slice (Z is not downsampled), so its grid follows the input's axis
# order only when Z is the longest axis; its per-slice grid is checked in tests/models/test_slices.py.
SIZE_SLICES = (32, 48, 56)

CASES = [
    ("tiny_timm_vit", 2, SIZE_2D),
    ("tiny_timm_convnext", 2, SIZE_2D),
    ("tiny_timm_resnet", 2, SIZE_2D),
    ("timm/resnet18", 2, (64, 64)),
    ("tiny_vit", 2, SIZE_2D),
    ("tiny_vit", 3, SIZE_3D),
    ("tiny_resnet", 2, SIZE_2D),
    ("tiny_resnet", 3, SIZE_3D),
    ("tiny_swin", 2, (64, 64)),
    ("tiny_swin", 2, SIZE_2D),
    ("tiny_swin", 3, (64, 64, 32)),
    ("tiny_swin", 3, SIZE_3D),
    ("tiny_slices", 3, SIZE_SLICES),
    ("resnet10t_slices", 3, SIZE_SLICES),
]


def _ids(case: tuple) -> str:
    name, dims, size = case
    return f"{name}-{dims}d-{'x'.join(map(str, size))}"


def _loss(out) -> torch.Tensor:
    """A loss using both the embedding and every token, with random weights (no symmetric cancellations)."""
    g = torch.Generator().manual_seed(1)
    w_emb = torch.randn(out.embedding.shape, generator=g)
    w_tok = torch.randn(out.tokens.shape, generator=g)
    return (out.embedding * w_emb).sum() + (out.tokens * w_tok).sum()


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_shapes_and_gradients(case: tuple) -> None:
    name, dims, size = case
    enc = create_image_encoder(name, dims, size)
    assert isinstance(enc, ImageEncoder)
    assert enc.spatial_dims == dims and enc.image_size == size
    x = torch.randn(2, 1, *size)
    out = enc(x)
    assert out.embedding.shape == (2, enc.embed_dim)
    assert out.tokens.shape == (2, math.prod(out.grid), enc.token_dim)
    assert len(out.grid) == dims
    # the grid follows the input's axis order: a longer axis never has fewer tokens
    for a in range(dims):
        for b in range(dims):
            if size[a] < size[b]:
                assert out.grid[a] <= out.grid[b], (out.grid, size)
    assert torch.isfinite(out.embedding).all() and torch.isfinite(out.tokens).all()

    _loss(out).backward()
    for pname, param in enc.named_parameters():
        if param.requires_grad:
            assert param.grad is not None, f"{pname} got no gradient"
            assert torch.isfinite(param.grad).all(), f"{pname} has a non-finite gradient"

    groups = enc.layer_groups()
    flat = [n for g in groups for n in g]
    assert len(groups) >= 2 and sorted(flat) == sorted(n for n, _ in enc.named_parameters())


@pytest.mark.parametrize(
    "case",
    [("tiny_vit", 3, SIZE_3D), ("tiny_swin", 2, SIZE_2D), ("tiny_timm_vit", 2, SIZE_2D), ("tiny_slices", 3, SIZE_3D)],
    ids=_ids,
)
def test_grad_checkpointing_is_exact(case: tuple) -> None:
    name, dims, size = case
    enc = create_image_encoder(name, dims, size)
    x = torch.randn(2, 1, *size)

    def run() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        enc.zero_grad()
        loss = _loss(enc(x))
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in enc.named_parameters() if p.requires_grad}

    loss_a, grads_a = run()
    enc.set_grad_checkpointing(True)
    assert enc.grad_checkpointing
    loss_b, grads_b = run()
    torch.testing.assert_close(loss_a, loss_b, atol=1e-5, rtol=1e-5)
    for n in grads_a:
        torch.testing.assert_close(grads_a[n], grads_b[n], atol=1e-5, rtol=1e-5, msg=n)


def test_registry_lists_families_and_presets() -> None:
    names = list_image_encoders()
    for expected in ("timm", "monai_vit", "monai_resnet", "monai_swin", "tiny_vit", "resnet18_2d", "vit_base_3d"):
        assert expected in names
    assert "tiny_timm_vit" not in list_image_encoders(3)
    assert "tiny_vit" in list_image_encoders(3)
    assert get_image_encoder_spec("timm/resnet50").name == "timm"
    assert get_image_encoder_spec("tiny_swin").description


def test_unknown_name_suggests_close_matches() -> None:
    with pytest.raises(ValueError, match="tiny_vitt") as err:
        create_image_encoder("tiny_vitt", 2, 64)
    assert "did you mean 'tiny_vit'" in str(err.value)  # MONAI's look_up_option guess
    assert "monai_resnet" in str(err.value)  # the list of known names


def test_unknown_timm_model_suggests_close_matches() -> None:
    with pytest.raises(ValueError, match=r"resnet181.*did you mean 'resnet1") as err:
        create_image_encoder("timm/resnet181", 2, 64)
    assert "resnet50d" not in str(err.value), "timm's ~1,000 names are not all listed"
    with pytest.raises(ValueError, match="model_name"):
        create_image_encoder("timm", 2, 64)


def test_wrong_spatial_dims() -> None:
    with pytest.raises(ValueError, match=r"2D images only.*spatial_dims=3"):
        create_image_encoder("tiny_timm_vit", 3, (32, 32, 32))
    with pytest.raises(ValueError, match="3D"):
        create_image_encoder("vit_base_3d", 2, (64, 64))
    with pytest.raises(ValueError, match="image_size"):
        create_image_encoder("tiny_vit", 3, (32, 32))


def test_fixed_size_encoders_reject_other_sizes() -> None:
    enc = create_image_encoder("tiny_vit", 2, (32, 48))
    with pytest.raises(ValueError, match="image_size"):
        enc(torch.randn(1, 1, 48, 32))
    with pytest.raises(ValueError, match=r"\[B, 1, X, Y\]"):
        enc(torch.randn(1, 3, 32, 48))
    with pytest.raises(ValueError, match="divisible"):
        create_image_encoder("tiny_vit", 2, (30, 48))
    # CNNs take any size
    cnn = create_image_encoder("tiny_resnet", 2, (64, 64))
    assert cnn(torch.randn(1, 1, 96, 64)).grid == (3, 2)


def test_lock_freezes_all_but_last_groups() -> None:
    enc = create_image_encoder("tiny_vit", 2, (32, 32))
    enc.lock()
    assert not any(p.requires_grad for p in enc.parameters())
    enc.lock(unlocked_groups=1)
    trainable = {n for n, p in enc.named_parameters() if p.requires_grad}
    assert trainable == set(enc.layer_groups()[-1]) and "head_norm.weight" in trainable
    enc.lock(unlocked_groups=100)
    frozen = {n for n, p in enc.named_parameters() if not p.requires_grad}
    assert (
        frozen
        == enc.unused_parameters
        == {f"backbone.blocks.{i}.norm_cross_attn.{w}" for i in (0, 1) for w in ("weight", "bias")}
    )


# ------------------------------------------------------------------------------------------------------ checkpoints


def _outputs(enc: ImageEncoder, x: torch.Tensor) -> torch.Tensor:
    enc.eval()
    with torch.no_grad():
        out = enc(x)
    return torch.cat([out.embedding.flatten(), out.tokens.flatten()])


def test_checkpoint_roundtrip_with_wrapper_and_prefix(tmp_path: Path) -> None:
    src = create_image_encoder("tiny_vit", 3, SIZE_3D)
    torch.manual_seed(123)
    dst = create_image_encoder("tiny_vit", 3, SIZE_3D)
    x = torch.randn(2, 1, *SIZE_3D)
    assert not torch.allclose(_outputs(src, x), _outputs(dst, x))
    path = tmp_path / "encoder.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}, "epoch": 3}, path)
    report = load_image_checkpoint(dst, path)
    assert report["missing"] == [] and report["unexpected"] == [] and report["mismatched"] == []
    torch.testing.assert_close(_outputs(src, x), _outputs(dst, x), atol=0, rtol=0)


def test_checkpoint_safetensors_via_create(tmp_path: Path) -> None:
    src = create_image_encoder("tiny_resnet", 2, SIZE_2D)
    path = tmp_path / "encoder.safetensors"
    save_file({f"model.{k}": v.contiguous() for k, v in src.state_dict().items()}, str(path))
    torch.manual_seed(5)
    dst = create_image_encoder("tiny_resnet", 2, SIZE_2D, checkpoint=path, strict=True)
    x = torch.randn(2, 1, *SIZE_2D)
    torch.testing.assert_close(_outputs(src, x), _outputs(dst, x), atol=0, rtol=0)


def test_three_channel_timm_checkpoint_is_adapted(tmp_path: Path) -> None:
    rgb = timm.create_model("resnet18", pretrained=False, in_chans=3, num_classes=1000).eval()
    path = tmp_path / "resnet18_rgb.pth"
    torch.save(rgb.state_dict(), path)
    enc = create_image_encoder("resnet18_2d", 2, (64, 64))
    report = load_image_checkpoint(enc, path)
    assert report["adapted"] == ["backbone.conv1.weight"]
    assert set(report["unexpected"]) == {"fc.weight", "fc.bias"}
    assert report["missing"] == []
    torch.testing.assert_close(enc.backbone.conv1.weight, rgb.conv1.weight.sum(dim=1, keepdim=True))
    # summed filters on a gray image == the RGB network on the gray image repeated over channels
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        expected = rgb.forward_head(rgb.forward_features(x.repeat(1, 3, 1, 1)), pre_logits=True)
    torch.testing.assert_close(enc.eval()(x).embedding, expected, atol=1e-4, rtol=1e-4)


def test_vit_position_embedding_is_resampled(tmp_path: Path) -> None:
    rgb = timm.create_model("test_vit", pretrained=False, in_chans=3, num_classes=0)  # 160 px, grid 10x10
    path = tmp_path / "vit.pt"
    torch.save({"model": rgb.state_dict()}, path)
    enc = create_image_encoder("tiny_timm_vit", 2, SIZE_2D)
    report = load_image_checkpoint(enc, path, strict=True)
    assert set(report["adapted"]) == {"backbone.pos_embed", "backbone.patch_embed.proj.weight"}
    torch.testing.assert_close(enc.backbone.cls_token, rgb.cls_token)
    assert torch.isfinite(enc(torch.randn(1, 1, *SIZE_2D)).embedding).all()


def test_checkpoint_without_matches_fails(tmp_path: Path) -> None:
    path = tmp_path / "other.pt"
    torch.save({"decoder.weight": torch.zeros(3, 3), "head.bias": torch.zeros(3)}, path)
    enc = create_image_encoder("tiny_vit", 2, (32, 32))
    with pytest.raises(ValueError, match=r"no tensor in other\.pt matches"):
        load_image_checkpoint(enc, path)
    with pytest.raises(FileNotFoundError):
        load_image_checkpoint(enc, tmp_path / "missing.pt")


def test_strict_partial_checkpoint_fails(tmp_path: Path) -> None:
    enc = create_image_encoder("tiny_vit", 2, (32, 32))
    path = tmp_path / "partial.pt"
    torch.save({k: v for k, v in enc.state_dict().items() if "blocks.1." not in k}, path)
    assert any("blocks.1." in k for k in load_image_checkpoint(enc, path)["missing"])
    with pytest.raises(ValueError, match="missing"):
        load_image_checkpoint(enc, path, strict=True)


@pytest.mark.parametrize("pool", ["avg", "max", "avgmax"])
def test_resnet_global_pool_is_the_named_pool_of_its_tokens(pool: str) -> None:
    enc = create_image_encoder("tiny_resnet", 3, SIZE_3D, global_pool=pool).eval()
    out = enc(torch.randn(2, 1, *SIZE_3D))
    mean, top = out.tokens.mean(dim=1), out.tokens.amax(dim=1)
    expected = {"avg": mean, "max": top, "avgmax": 0.5 * (mean + top)}[pool]
    torch.testing.assert_close(out.embedding, expected)
    assert not torch.allclose(mean, top)  # the pools differ, so the test tells them apart


def test_resnet_max_pool_keeps_a_one_token_signal_that_the_mean_dilutes() -> None:
    """A bright spot that reaches one token of the last stage moves the max-pooled embedding more than the mean."""
    torch.manual_seed(0)
    shifts = {}
    for pool in ("avg", "max"):
        enc = create_image_encoder("tiny_resnet", 3, SIZE_3D, global_pool=pool).eval()
        x = torch.zeros(1, 1, *SIZE_3D)
        spot = x.clone()
        spot[..., 4:8, 4:8, 4:8] = 5.0
        with torch.no_grad():
            a, b, toks = enc(x).embedding, enc(spot).embedding, enc(spot).tokens
        assert toks.shape[1] > 1
        shifts[pool] = float((b - a).abs().max())
    assert shifts["max"] > shifts["avg"]


def test_resnet_global_pool_rejects_an_unknown_name() -> None:
    with pytest.raises(ValueError, match="global_pool"):
        create_image_encoder("tiny_resnet", 3, SIZE_3D, global_pool="median")


@pytest.mark.parametrize(("dims", "size", "stage"), [(3, (64, 64, 32), 3), (3, (64, 64, 32), 2), (2, SIZE_2D, 3)])
def test_resnet_finer_token_stage_starts_as_the_last_stage_repeated(dims: int, size: tuple, stage: int) -> None:
    """Same weights: the embedding is unchanged, the tokens lie on a grid 2 or 4 times finer per axis, and with the
    laterals at zero they are the last stage's tokens repeated (nearest) on it."""
    torch.manual_seed(0)
    last = create_image_encoder("tiny_resnet", dims, size).eval()
    finer = create_image_encoder("tiny_resnet", dims, size, token_stage=stage).eval()
    missing = finer.load_state_dict(last.state_dict(), strict=False).missing_keys
    assert sorted(missing) == sorted(f"laterals.{s}.{w}" for s in range(stage, 4) for w in ("weight", "bias"))
    x = torch.randn(2, 1, *size)
    with torch.no_grad():
        a, b = last(x), finer(x)
    factor = 2 ** (4 - stage)
    assert b.grid == tuple(g * factor for g in a.grid) and b.tokens.shape[1] == math.prod(b.grid)
    torch.testing.assert_close(b.embedding, a.embedding)
    repeated = torch.nn.functional.interpolate(a.tokens.transpose(1, 2).reshape(2, -1, *a.grid), size=b.grid)
    torch.testing.assert_close(b.tokens, repeated.flatten(2).transpose(1, 2))


def test_resnet_finer_tokens_learn_from_a_token_loss_and_leave_the_embedding_to_the_last_stage() -> None:
    torch.manual_seed(0)
    enc = create_image_encoder("tiny_resnet", 3, SIZE_3D, token_stage=3)
    x = torch.randn(2, 1, *SIZE_3D)
    enc(x).embedding.pow(2).sum().backward()
    assert all(p.grad is None or not p.grad.any() for p in enc.laterals.parameters()), "the embedding skips them"
    enc.zero_grad()
    out = enc(x)
    (out.tokens * torch.randn(out.tokens.shape)).sum().backward()
    assert enc.laterals["3"].weight.grad.abs().sum() > 0
    assert any(name.startswith("laterals.") for name in enc.layer_groups()[-1]), "the laterals are the last group"


def _pyramid_reference(enc: ImageEncoder, x: torch.Tensor) -> torch.Tensor:
    """The token map written out by hand: every stage, then top-down from stage 4 to ``token_stage``."""
    net, maps = enc.backbone, []
    h = net.act(net.bn1(net.conv1(x)))
    h = h if net.no_max_pool else net.maxpool(h)
    for layer in (net.layer1, net.layer2, net.layer3, net.layer4):
        h = layer(h)
        maps.append(h)
    top = maps[3]
    for stage in range(3, enc.token_stage - 1, -1):
        up = torch.nn.functional.interpolate(top, size=maps[stage - 1].shape[2:], mode="nearest")
        top = up + enc.laterals[str(stage)](maps[stage - 1])
    return top.flatten(2).transpose(1, 2)


@pytest.mark.parametrize("stage", [3, 2])
@pytest.mark.parametrize(
    ("dims", "size", "args"),
    [
        (3, (37, 29, 19), {"no_max_pool": True}),
        (2, (45, 33), {}),
        (3, (40, 36, 24), {"depth": 50, "widen_factor": 1.5, "block_inplanes": [8, 16, 32, 64]}),
    ],
)
def test_resnet_pyramid_tokens_match_a_hand_written_merge(dims: int, size: tuple, args: dict, stage: int) -> None:
    torch.manual_seed(0)
    enc = create_image_encoder("tiny_resnet", dims, size, token_stage=stage, **args).eval()
    for lateral in enc.laterals.values():  # away from zero, so every lateral and the merge order count
        torch.nn.init.normal_(lateral.weight)
        torch.nn.init.normal_(lateral.bias)
    x = torch.randn(2, 1, *size)
    with torch.no_grad():
        out, expected = enc(x), _pyramid_reference(enc, x)
    torch.testing.assert_close(out.tokens, expected)
    assert out.tokens.shape[1] == math.prod(out.grid) and out.tokens.shape[2] == enc.token_dim == enc.embed_dim


def test_resnet_pyramid_laterals_are_heads_that_lock_and_strict_loads_leave_alone(tmp_path: Path) -> None:
    """A locked tower keeps its laterals trainable (else the tokens would stay the last stage's, repeated), and a
    plain backbone checkpoint loads strictly into a pyramid tower; a missing backbone tensor still fails."""
    enc = create_image_encoder("tiny_resnet", 3, SIZE_3D, token_stage=2)
    enc.lock(0)
    trainable = {n for n, p in enc.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in enc.laterals.named_parameters(prefix="laterals")}
    plain = create_image_encoder("tiny_resnet", 3, SIZE_3D)
    save_file(plain.state_dict(), tmp_path / "plain.safetensors")
    report = load_image_checkpoint(enc, tmp_path / "plain.safetensors", strict=True)
    assert sorted(report["missing"]) == sorted(f"laterals.{s}.{w}" for s in (2, 3) for w in ("weight", "bias"))
    partial = {k: v for k, v in plain.state_dict().items() if not k.startswith("backbone.layer4.")}
    save_file(partial, tmp_path / "partial.safetensors")
    with pytest.raises(ValueError, match="layer4"):
        load_image_checkpoint(enc, tmp_path / "partial.safetensors", strict=True)


@pytest.mark.parametrize("stage", [1, 5, "3"])
def test_resnet_token_stage_rejects_other_stages(stage: object) -> None:
    with pytest.raises(ValueError, match="token_stage"):
        create_image_encoder("tiny_resnet", 3, SIZE_3D, token_stage=stage)


def _lateral_maps(n: int, channels: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n`` feature maps with one random lesion vector in the left (side 1) or right (side 0) column, and their
    mirror images."""
    lesions, side = torch.randn(n, channels), torch.arange(n) % 2
    feats, mirrored = torch.zeros(n, channels, 4, 4), torch.zeros(n, channels, 4, 4)
    feats[side == 1, :, 1, 0], feats[side == 0, :, 1, 3] = lesions[side == 1], lesions[side == 0]
    mirrored[:, :, 1, 0], mirrored[:, :, 1, 3] = feats[:, :, 1, 3], feats[:, :, 1, 0]
    return feats, mirrored, side


def _side_accuracy(pool: torch.nn.Module) -> tuple[float, float]:
    """Train ``pool`` and a linear read-out to tell the side on fresh lesions every step (so only the position can be
    learned); returns its accuracy on held-out maps and on their mirror images (answered the other way)."""
    feats, mirrored, side = _lateral_maps(64)
    head = torch.nn.Linear(32, 1)
    opt = torch.optim.Adam([*pool.parameters(), *head.parameters()], lr=3e-3)
    for _ in range(300):
        x, _, y = _lateral_maps(64)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(head(pool(x)[0]).squeeze(1), y.float())
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        right = (head(pool(feats)[0]).squeeze(1) > 0).long() == side
        flipped = (head(pool(mirrored)[0]).squeeze(1) > 0).long() == 1 - side
    return float(right.float().mean()), float(flipped.float().mean())


def test_attention_pool_learns_left_from_right_where_the_mean_cannot() -> None:
    """The same feature at mirrored positions has one mean, so a mean pool answers left and right alike; a linear
    read-out of the positional attention pool learns the side, and answers the mirrored maps the other way."""
    from medvlp.models.image import PositionalAttentionPool

    torch.manual_seed(0)
    feats, mirrored, _ = _lateral_maps(64)
    torch.testing.assert_close(feats.mean(dim=(2, 3)), mirrored.mean(dim=(2, 3)))  # the mean cannot tell them apart
    right, flipped = _side_accuracy(PositionalAttentionPool(32, (4, 4)))
    assert right >= 0.9 and flipped >= 0.9


def test_attention_pool_tokens_are_values_in_the_embedding_space() -> None:
    """With no position signal and one feature everywhere, attention returns that feature's value: the pooled
    embedding equals every dense token, so the tokens go through the same projections as the embedding."""
    from medvlp.models.image import PositionalAttentionPool

    torch.manual_seed(0)
    pool = PositionalAttentionPool(128, (3, 5)).eval()
    with torch.no_grad():
        pool.pool.pos_embed.zero_()
        feats = torch.randn(2, 128, 1, 1).expand(2, 128, 3, 5).contiguous()
        embedding, tokens = pool(feats)
    assert embedding.shape == (2, 128) and tokens.shape == (2, 15, 128)
    torch.testing.assert_close(tokens, embedding[:, None].expand_as(tokens), rtol=1e-4, atol=1e-5)


def test_avgattn_pool_starts_as_the_mean_and_learns_the_side() -> None:
    """``avgattn`` is the mean plus a zero-initialised attention residual: at first exactly the mean pool, with the
    feature map itself as tokens; trained, it tells left from right as the plain attention pool does."""
    from medvlp.models.image import PositionalAttentionPool

    torch.manual_seed(0)
    pool = PositionalAttentionPool(32, (4, 4), mode="avgattn")
    feats, _, _ = _lateral_maps(8)
    embedding, tokens = pool(feats)
    torch.testing.assert_close(embedding, feats.mean(dim=(2, 3)))
    torch.testing.assert_close(tokens, feats.flatten(2).transpose(1, 2))
    right, flipped = _side_accuracy(pool)
    assert right >= 0.9 and flipped >= 0.9
    with pytest.raises(ValueError, match="mode"):
        PositionalAttentionPool(32, (4, 4), mode="median")


@pytest.mark.parametrize("pool", ["attn", "avgattn"])
def test_timm_attention_pool_builds_trains_and_groups_its_parameters(pool: str) -> None:
    enc = create_image_encoder("timm/resnet10t", 2, (64, 64), global_pool=pool)
    out = enc(torch.randn(2, 1, 64, 64))
    assert out.embedding.shape == (2, enc.embed_dim) and out.tokens.shape == (2, 4, enc.token_dim)
    assert enc.embed_dim == enc.token_dim and out.grid == (2, 2)  # the shared projection head fits both
    out.embedding.sum().backward()
    assert enc.attn_pool is not None and enc.attn_pool.pool.pos_embed.grad is not None
    assert any(n.startswith("attn_pool.") for n in enc.layer_groups()[-1])  # the head unlocks with the last group
    with pytest.raises(ValueError, match="attn"):
        create_image_encoder("tiny_timm_vit", 2, SIZE_2D, global_pool=pool)
