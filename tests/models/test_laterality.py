"""The laterality head: the feature map's first moment across the patient's left-right axis, on the embedding."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from medvlp.models import create_image_encoder, load_image_checkpoint
from medvlp.models.pooling import LateralityMoment


def _sided_maps(n: int, channels: int = 16, axis: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` non-negative (post-activation) maps ``[n, C, 5, 5]``, each with a fresh random lesion at a random place
    on one side of ``axis`` (side 1: the high end), on a random background the same on both sides."""
    feats = torch.rand(n, channels, 1, 1).expand(n, channels, 5, 5).clone() * 0.5
    side = torch.randint(0, 2, (n,))
    for i in range(n):
        lesion = torch.rand(channels) * 2
        along = int(torch.randint(3, 5, ()) if side[i] else torch.randint(0, 2, ()))
        other = int(torch.randint(0, 5, ()))
        where = (along, other) if axis == 0 else (other, along)
        feats[i, :, where[0], where[1]] += lesion
    return feats, side


def test_moment_is_zero_at_start_odd_under_the_mirror_and_blind_to_the_background() -> None:
    torch.manual_seed(0)
    head = LateralityMoment(16, axis=0)
    feats, _ = _sided_maps(6)
    assert torch.equal(head(feats), torch.zeros(6, 16))  # a residual that starts at zero
    moment = head.moment(feats)
    torch.testing.assert_close(head.moment(feats.flip(2)), -moment)  # the mirror image: the other sign
    flat = torch.rand(3, 16, 1, 1).expand(3, 16, 5, 4)
    torch.testing.assert_close(head.moment(flat), torch.zeros(3, 16))  # the same everywhere: no side
    assert torch.equal(LateralityMoment(16).moment(torch.rand(2, 16, 1, 4)), torch.zeros(2, 16))  # one row: no axis
    with pytest.raises(ValueError, match="spatial axis"):
        LateralityMoment(16, axis=2, spatial_dims=2)


@pytest.mark.parametrize("axis", [0, 1])
def test_a_linear_read_out_of_the_head_tells_the_side_where_the_mean_cannot(axis: int) -> None:
    """Fresh lesions every step, so only where they lie can be learned: the mean pool plus the head learns the side
    and answers the mirrored maps the other way; the mean alone stays at chance."""
    torch.manual_seed(0)

    def accuracy(with_head: bool) -> tuple[float, float]:
        head, read = LateralityMoment(16, axis=axis), torch.nn.Linear(16, 1)
        opt = torch.optim.Adam([*head.parameters(), *read.parameters()], lr=1e-2)

        def logit(x: torch.Tensor) -> torch.Tensor:
            emb = x.mean(dim=(2, 3)) + (head(x) if with_head else 0)
            return read(emb).squeeze(1)

        for _ in range(200):
            x, y = _sided_maps(64, axis=axis)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logit(x), y.float())
            opt.zero_grad()
            loss.backward()
            opt.step()
        x, y = _sided_maps(256, axis=axis)
        with torch.no_grad():
            right = ((logit(x) > 0).long() == y).float().mean()
            flipped = ((logit(x.flip(2 + axis)) > 0).long() == 1 - y).float().mean()
        return float(right), float(flipped)

    right, flipped = accuracy(True)
    assert right >= 0.95 and flipped >= 0.95
    assert accuracy(False)[0] < 0.7


@pytest.mark.parametrize("pool", ["avg", "avgattn"])
def test_timm_tower_with_the_head_starts_as_without_trains_it_and_groups_it(pool: str) -> None:
    torch.manual_seed(0)
    plain = create_image_encoder("timm/resnet10t", 2, (64, 64), global_pool=pool).eval()
    sided = create_image_encoder("timm/resnet10t", 2, (64, 64), global_pool=pool, laterality=True).eval()
    assert not sided.load_state_dict(plain.state_dict(), strict=False).unexpected_keys
    x = torch.randn(2, 1, 64, 64)
    out = sided(x)
    torch.testing.assert_close(out.embedding, plain(x).embedding)  # the head adds zero at first
    out.embedding.sum().backward()
    assert sided.laterality is not None and sided.laterality.proj.weight.grad.abs().sum() > 0
    assert {"laterality.proj.weight", "laterality.proj.bias"} <= set(sided.layer_groups()[-1])
    sided.lock(0)  # a new head: trainable on a locked tower
    assert {n for n, p in sided.named_parameters() if p.requires_grad} >= {"laterality.proj.weight"}


@pytest.mark.parametrize(
    ("name", "args", "match"),
    [
        ("tiny_timm_vit", {}, "feature map"),
        ("timm/resnet10t", {"global_pool": "catavgmax"}, "keeps the"),
        ("timm/resnet10t", {"laterality_axis": 2}, "spatial axis"),
    ],
)
def test_timm_tower_refuses_the_head_where_it_cannot_be(name: str, args: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        create_image_encoder(name, 2, (64, 64), laterality=True, **args)


def test_resnet_3d_head_on_the_lr_axis_loads_a_plain_checkpoint_strictly(tmp_path: Path) -> None:
    """In 3D the head reads the last stage along the RAS cache's L/R axis (0); it is a head, so a backbone checkpoint
    without it loads strictly, and a locked tower keeps it trainable."""
    torch.manual_seed(0)
    size = (32, 48, 40)
    enc = create_image_encoder("tiny_resnet", 3, size, laterality=True)
    plain = create_image_encoder("tiny_resnet", 3, size)
    save_file(plain.state_dict(), tmp_path / "plain.safetensors")
    report = load_image_checkpoint(enc, tmp_path / "plain.safetensors", strict=True)
    assert sorted(report["missing"]) == ["laterality.proj.bias", "laterality.proj.weight"]
    x = torch.randn(2, 1, *size)
    with torch.no_grad():
        torch.testing.assert_close(enc.eval()(x).embedding, plain.eval()(x).embedding)
    enc.lock(0)
    trainable = {n for n, p in enc.named_parameters() if p.requires_grad}
    assert trainable == {"laterality.proj.weight", "laterality.proj.bias"}
    with pytest.raises(ValueError, match="spatial axis"):
        create_image_encoder("tiny_resnet", 3, size, laterality=True, laterality_axis=3)
