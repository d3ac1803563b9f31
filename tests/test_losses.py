"""Single-process tests of medvlp.losses: parity with open_clip, chunking, soft targets and the extra terms."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss, SigLipLoss

from medvlp import distributed as mdist
from medvlp.losses import (
    LOSSES,
    ContrastiveLoss,
    ContrastiveLossConfig,
    alignment_loss,
    clip_logits,
    clip_loss,
    duplicate_groups,
    duplicate_targets,
    local_alignment_loss,
    local_similarity,
    noise_weights,
    siglip_loss,
    uniformity_loss,
)

TOL = {torch.float32: {"rtol": 1e-5, "atol": 1e-5}, torch.float64: {"rtol": 1e-6, "atol": 1e-6}}


def _inputs(b: int = 32, d: int = 16, seed: int = 0, dtype: torch.dtype = torch.float64):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(b, d, generator=g, dtype=dtype), dim=-1)
    txt = F.normalize(torch.randn(b, d, generator=g, dtype=dtype), dim=-1)
    return img, txt, torch.tensor(10.0, dtype=dtype), torch.tensor(-5.0, dtype=dtype)


def _value_and_grads(fn, *inputs: torch.Tensor):
    """fn(*leaves) and the gradients w.r.t. every input (zeros where unused)."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    loss = fn(*leaves)
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return loss.detach(), [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads, strict=True)]


def _assert_same(a, b, **tol) -> None:
    torch.testing.assert_close(a[0], b[0], **tol)
    for ga, gb in zip(a[1], b[1], strict=True):
        torch.testing.assert_close(ga, gb, **tol)


def _groups(b: int, n_groups: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, n_groups, (b,), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------- open_clip parity
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("b", [1, 2, 7, 32])
@pytest.mark.parametrize("chunk", [None, 3])
def test_clip_matches_open_clip(b: int, dtype: torch.dtype, chunk: int | None) -> None:
    img, txt, scale, _ = _inputs(b, dtype=dtype)
    ref = _value_and_grads(lambda i, t, s: ClipLoss()(i, t, s), img, txt, scale)
    ours = _value_and_grads(lambda i, t, s: clip_loss(i, t, s, chunk_size=chunk), img, txt, scale)
    _assert_same(ours, ref, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("b", [1, 2, 7, 32])
@pytest.mark.parametrize("chunk", [None, 3])
def test_siglip_matches_open_clip(b: int, dtype: torch.dtype, chunk: int | None) -> None:
    img, txt, scale, bias = _inputs(b, dtype=dtype)
    ref = _value_and_grads(lambda i, t, s, c: SigLipLoss()(i, t, s, c), img, txt, scale, bias)
    ours = _value_and_grads(lambda i, t, s, c: siglip_loss(i, t, s, c, chunk_size=chunk), img, txt, scale, bias)
    _assert_same(ours, ref, **TOL[dtype])


def test_clip_logits_match_open_clip() -> None:
    img, txt, scale, _ = _inputs(5)
    ours = clip_logits(img, txt, scale)
    ref = ClipLoss().get_logits(img, txt, scale)
    for a, b in zip(ours, ref, strict=True):
        assert a.shape == (5, 5)
        torch.testing.assert_close(a, b)


def test_python_float_scale_and_no_bias() -> None:
    img, txt, scale, _ = _inputs(6)
    torch.testing.assert_close(clip_loss(img, txt, 10.0), clip_loss(img, txt, scale))
    no_bias = siglip_loss(img, txt, scale, None)
    torch.testing.assert_close(no_bias, siglip_loss(img, txt, scale, 0.0))
    torch.testing.assert_close(siglip_loss(img, txt, scale, None, chunk_size=4), no_bias)


# ----------------------------------------------------------------------------------------------- chunking
@pytest.mark.parametrize("chunk", [1, 7, 8, 32, 100])
@pytest.mark.parametrize("with_targets", [False, True])
def test_clip_chunked_equals_unchunked(chunk: int, with_targets: bool) -> None:
    img, txt, scale, _ = _inputs(70)  # 70 = 8 * 8 + 6: uneven last chunk
    tgt = duplicate_targets(_groups(70, 20)) if with_targets else None
    ref = _value_and_grads(lambda i, t, s: clip_loss(i, t, s, targets=tgt), img, txt, scale)
    ours = _value_and_grads(lambda i, t, s: clip_loss(i, t, s, targets=tgt, chunk_size=chunk), img, txt, scale)
    _assert_same(ours, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("chunk", [1, 7, 8, 32, 100])
@pytest.mark.parametrize("with_positives", [False, True])
def test_siglip_chunked_equals_unchunked(chunk: int, with_positives: bool) -> None:
    img, txt, scale, bias = _inputs(70)
    pos = duplicate_targets(_groups(70, 20)) if with_positives else None

    def run(c):
        return _value_and_grads(
            lambda i, t, s, b: siglip_loss(i, t, s, b, positives=pos, chunk_size=c), img, txt, scale, bias
        )

    _assert_same(run(chunk), run(None), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    "trainable", [(True, True, True, True), (False, True, False, True), (True, False, True, False)]
)
def test_chunked_partial_requires_grad(trainable: tuple[bool, ...]) -> None:
    """Frozen towers / fixed scale: only the trainable inputs get (the same) gradients."""
    img, txt, scale, bias = _inputs(19)
    for fn in (
        lambda i, t, s, b, c: clip_loss(i, t, s, chunk_size=c),
        lambda i, t, s, b, c: siglip_loss(i, t, s, b, chunk_size=c),
    ):
        outs = []
        for c in (None, 4):
            leaves = [v.clone().requires_grad_(r) for v, r in zip((img, txt, scale, bias), trainable, strict=True)]
            loss = fn(*leaves, c)
            used = [v for v in leaves if v.requires_grad]
            outs.append((loss.detach(), torch.autograd.grad(loss, used, allow_unused=True)))
        torch.testing.assert_close(outs[0][0], outs[1][0])
        for a, b in zip(outs[0][1], outs[1][1], strict=True):
            if a is None or b is None:
                assert a is None or not a.any()  # bias is unused by CLIP
                continue
            torch.testing.assert_close(a, b)


def test_chunked_no_grad_eval() -> None:
    img, txt, scale, bias = _inputs(19)
    with torch.no_grad():
        a = clip_loss(img.requires_grad_(), txt, scale, chunk_size=5)
        b = siglip_loss(img, txt, scale, bias, chunk_size=5)
    assert not a.requires_grad and not b.requires_grad
    torch.testing.assert_close(a, clip_loss(img, txt, scale).detach())
    torch.testing.assert_close(b, siglip_loss(img, txt, scale, bias).detach())


def test_chunked_under_autocast() -> None:
    img, txt, scale, bias = _inputs(35, dtype=torch.float32)
    for fn in (
        lambda i, t, s, b, c: clip_loss(i, t, s, chunk_size=c),
        lambda i, t, s, b, c: siglip_loss(i, t, s, b, chunk_size=c),
    ):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ref = _value_and_grads(lambda i, t, s, b: fn(i, t, s, b, None), img, txt, scale, bias)  # noqa: B023
            ours = _value_and_grads(lambda i, t, s, b: fn(i, t, s, b, 8), img, txt, scale, bias)  # noqa: B023
        assert all(g.dtype == torch.float32 for g in ours[1])
        _assert_same(ours, ref, rtol=3e-2, atol=3e-2, check_dtype=False)  # bf16 matmuls; unchunked SigLIP is bf16


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_chunked_saved_activation_memory(kind: str) -> None:
    """Autograd must not keep any chunk's b x B block alive between forward and backward."""
    b, d, chunk = 256, 16, 16
    img, txt, scale, bias = (t.requires_grad_() for t in _inputs(b, d, dtype=torch.float32))
    inputs = {t.untyped_storage().data_ptr() for t in (img, txt, scale, bias)}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in inputs:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if kind == "clip":
            loss = clip_loss(img, txt, scale, chunk_size=chunk)
        else:
            loss = siglip_loss(img, txt, scale, bias, chunk_size=chunk)
    budget = 8 * b * d * 4  # a few feature-sized tensors; one [b, b] float32 block alone would be 256 KiB
    assert sum(saved.values()) <= budget < b * b * 4
    loss.backward()
    assert all(torch.isfinite(t.grad).all() for t in (img, txt, scale))


def test_invalid_chunk_and_shapes() -> None:
    img, txt, scale, bias = _inputs(4)
    with pytest.raises(ValueError, match="chunk_size"):
        clip_loss(img, txt, scale, chunk_size=0)
    with pytest.raises(ValueError, match="targets"):
        clip_loss(img, txt, scale, targets=torch.eye(5))
    with pytest.raises(ValueError, match="positives"):
        siglip_loss(img, txt, scale, bias, positives=torch.ones(4, 3))
    with pytest.raises(ValueError, match="batch sizes"):
        clip_loss(img, txt[:3], scale)
    with pytest.raises(ValueError, match="reduction"):
        clip_loss(img, txt, scale, reduction="sum")


# ---------------------------------------------------------------------------------------- targets
def test_duplicate_groups_and_targets() -> None:
    keys = ["a", "b", None, "a", None, "b", "c"]
    g = duplicate_groups(keys)
    assert g.tolist() == [0, 1, 2, 0, 4, 1, 6]
    t = duplicate_targets(keys)
    expected = torch.eye(7)
    for i, j in [(0, 3), (1, 5)]:
        expected[i, j] = expected[j, i] = 1
    torch.testing.assert_close(t, expected)
    labels = torch.tensor([[1, 0, 1], [0, 0, 1], [1, 0, 1], [0, 0, 0]])
    torch.testing.assert_close(
        duplicate_targets(labels),
        torch.tensor([[1, 0, 1, 0], [0, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.float32),
    )


@pytest.mark.parametrize("chunk", [None, 3])
def test_identity_targets_reduce_to_plain_losses(chunk: int | None) -> None:
    img, txt, scale, bias = _inputs(9)
    plain_clip = _value_and_grads(lambda i, t, s: clip_loss(i, t, s, chunk_size=chunk), img, txt, scale)
    plain_sig = _value_and_grads(lambda i, t, s, b: siglip_loss(i, t, s, b, chunk_size=chunk), img, txt, scale, bias)
    for ident in (torch.eye(9), torch.arange(9), torch.zeros(9, 9)):  # zeros: the diagonal is forced to 1
        ours = _value_and_grads(
            lambda i, t, s: clip_loss(i, t, s, targets=ident, chunk_size=chunk),  # noqa: B023
            img,
            txt,
            scale,
        )
        _assert_same(ours, plain_clip, rtol=1e-12, atol=1e-12)
        ours = _value_and_grads(
            lambda i, t, s, b: siglip_loss(i, t, s, b, positives=ident, chunk_size=chunk),  # noqa: B023
            img,
            txt,
            scale,
            bias,
        )
        _assert_same(ours, plain_sig, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("chunk", [None, 2])
def test_soft_targets_hand_computed(chunk: int | None) -> None:
    img, txt, scale, bias = _inputs(5)
    keys = ["x", "y", "x", None, "y"]
    t = duplicate_targets(keys).double()
    logits = scale * img @ txt.T
    ce_img = [-(t[i] / t[i].sum() * logits[i].log_softmax(0)).sum() for i in range(5)]
    ce_txt = [-(t[:, j] / t[:, j].sum() * logits[:, j].log_softmax(0)).sum() for j in range(5)]
    expected = (sum(ce_img) / 5 + sum(ce_txt) / 5) / 2
    torch.testing.assert_close(clip_loss(img, txt, scale, targets=t, chunk_size=chunk), expected)
    groups = duplicate_groups(keys)
    torch.testing.assert_close(clip_loss(img, txt, scale, targets=groups, chunk_size=chunk), expected)
    sig = sum(-F.logsigmoid((2 * t[i, j] - 1) * (logits[i, j] + bias)) for i in range(5) for j in range(5)) / 5
    torch.testing.assert_close(siglip_loss(img, txt, scale, bias, positives=groups, chunk_size=chunk), sig)
    # samples 0 and 2 are near-duplicates: a gradient step of plain CLIP makes image 0 discriminate its own text
    # from its twin's (a false negative), with soft targets it does not
    aligned = img.clone()
    aligned[2] = F.normalize(aligned[0] + 0.2 * txt[0], dim=-1)
    pair = torch.eye(5)
    pair[0, 2] = pair[2, 0] = 1
    for tgt, discriminates in ((pair, False), (None, True)):
        feats = aligned.clone().requires_grad_()
        clip_loss(feats, aligned, 50.0, targets=tgt, chunk_size=chunk).backward()
        margin_change = -(feats.grad[0] * (aligned[0] - aligned[2])).sum()  # d(x0.y0 - x0.y2) along -grad
        assert bool(margin_change > 0) is discriminates


def test_asymmetric_target_matrix_uses_transpose_for_texts() -> None:
    img, txt, scale, _ = _inputs(4)
    t = torch.eye(4)
    t[0, 2] = 1  # image 0 also matches text 2 (not the reverse)
    logits = scale * img @ txt.T
    p_img = t / t.sum(1, keepdim=True)
    p_txt = t.T / t.T.sum(1, keepdim=True)
    expected = (F.cross_entropy(logits, p_img.double()) + F.cross_entropy(logits.T, p_txt.double())) / 2
    for chunk in (None, 3):
        torch.testing.assert_close(clip_loss(img, txt, scale, targets=t, chunk_size=chunk), expected)


def test_reduction_none() -> None:
    img, txt, scale, _ = _inputs(6)
    per = clip_loss(img, txt, scale, reduction="none")
    assert per.shape == (6,)
    torch.testing.assert_close(per.mean(), clip_loss(img, txt, scale))
    torch.testing.assert_close(clip_loss(img, txt, scale, reduction="none", chunk_size=4), per)


# ---------------------------------------------------------------------------------------- extra terms
def _mismatched_batch(b: int = 16, d: int = 32, bad: int = 5):
    """Near-perfect pairs (text = image + small noise) except pair `bad`, whose text is a random embedding."""
    g = torch.Generator().manual_seed(3)
    img = F.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=-1)
    txt = F.normalize(img + 0.05 * torch.randn(b, d, generator=g, dtype=torch.float64), dim=-1)
    noisy = txt.clone()
    noisy[bad] = F.normalize(torch.randn(d, generator=g, dtype=torch.float64), dim=-1)
    return img, txt, noisy


def test_noise_weights_function() -> None:
    loss = torch.tensor([0.1, 0.12, 0.11, 5.0], requires_grad=True)
    w = noise_weights(loss)
    assert not w.requires_grad
    torch.testing.assert_close(w.mean(), torch.tensor(1.0))
    assert w.argmin() == 3 and w[3] < 0.01
    torch.testing.assert_close(noise_weights(torch.full((5,), 2.0)), torch.ones(5))
    torch.testing.assert_close(noise_weights(torch.tensor([3.0])), torch.ones(1))


@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("chunk", [None, 5])
def test_noise_weighting_downweights_mismatched_pair(kind: str, chunk: int | None) -> None:
    img, clean, noisy = _mismatched_batch()
    scale, bias = torch.tensor(20.0, dtype=torch.float64), torch.tensor(-8.0, dtype=torch.float64)
    plain = ContrastiveLoss(kind, chunk_size=chunk)
    weighted = ContrastiveLoss(kind, chunk_size=chunk, noise_weighting=True)
    # the weights the module uses, rebuilt from the same detached per-pair signal
    if kind == "clip":
        per = clip_loss(img, noisy, scale, reduction="none")
    else:
        per = -F.logsigmoid(scale * (img * noisy).sum(-1) + bias)
    w = noise_weights(per)
    assert w.argmin() == 5 and w[5] < 0.1
    assert weighted(img, noisy, scale, bias)["loss"] < plain(img, noisy, scale, bias)["loss"]
    # all pairs clean: the weights are ~1 and the loss is (almost) unchanged
    per_clean = (
        clip_loss(img, clean, scale, reduction="none")
        if kind == "clip"
        else -F.logsigmoid(scale * (img * clean).sum(-1) + bias)
    )
    assert (noise_weights(per_clean) - 1).abs().max() < 0.05
    torch.testing.assert_close(
        weighted(img, clean, scale, bias)["loss"], plain(img, clean, scale, bias)["loss"], rtol=2e-2, atol=1e-3
    )


def test_alignment_and_uniformity_values() -> None:
    img, txt, _, _ = _inputs(6, 4)
    align = sum(((img[i] - txt[i]) ** 2).sum() for i in range(6)) / 6
    torch.testing.assert_close(alignment_loss(img, txt), align)
    z = torch.cat([img, txt])
    pairs = [(i, j) for i in range(12) for j in range(i + 1, 12)]
    unif = math.log(sum(math.exp(-2 * ((z[i] - z[j]) ** 2).sum().item()) for i, j in pairs) / len(pairs))
    torch.testing.assert_close(uniformity_loss(z), torch.tensor(unif, dtype=torch.float64))
    torch.testing.assert_close(uniformity_loss(z), torch.pdist(z).pow(2).mul(-2).exp().mean().log())


def test_uniformity_gradient_spreads_points() -> None:
    g = torch.Generator().manual_seed(0)
    base = F.normalize(torch.randn(1, 8, generator=g, dtype=torch.float64), dim=-1)
    z = F.normalize(base + 0.1 * torch.randn(20, 8, generator=g, dtype=torch.float64), dim=-1)  # clustered
    z.requires_grad_()
    before = uniformity_loss(z)
    (grad,) = torch.autograd.grad(before, z)
    z2 = F.normalize(z.detach() - 0.05 * grad, dim=-1)
    assert uniformity_loss(z2) < before
    assert torch.pdist(z2).mean() > torch.pdist(z.detach()).mean()  # points moved apart


def test_wrapper_adds_weighted_terms() -> None:
    img, txt, scale, _ = _inputs(8)
    out = ContrastiveLoss("clip", alignment_weight=0.5, uniformity_weight=0.25)(img, txt, scale)
    assert set(out) == {"loss", "contrastive", "alignment", "uniformity"}
    torch.testing.assert_close(out["contrastive"], clip_loss(img, txt, scale))
    torch.testing.assert_close(out["alignment"], alignment_loss(img, txt))
    torch.testing.assert_close(out["uniformity"], uniformity_loss(torch.cat([img, txt])))
    torch.testing.assert_close(out["loss"], out["contrastive"] + 0.5 * out["alignment"] + 0.25 * out["uniformity"])
    plain = ContrastiveLoss()(img, txt, scale)
    assert set(plain) == {"loss", "contrastive"}
    torch.testing.assert_close(plain["loss"], ClipLoss()(img, txt, scale))


def _tokens(b: int = 6, p: int = 10, t: int = 7, d: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(b, p, d, generator=g, dtype=torch.float64),
        torch.randn(b, t, d, generator=g, dtype=torch.float64),
    )


def test_local_similarity_shapes_and_gradients() -> None:
    img_tok, txt_tok = _tokens()
    sim = local_similarity(img_tok[:4], txt_tok, chunk_size=3)
    assert sim.shape == (4, 6)
    torch.testing.assert_close(sim, local_similarity(img_tok[:4], txt_tok, chunk_size=100))
    img_tok.requires_grad_()
    txt_tok.requires_grad_()
    local_alignment_loss(img_tok, txt_tok).backward()
    assert img_tok.grad.abs().sum() > 0 and txt_tok.grad.abs().sum() > 0


def test_local_masked_words_do_not_matter() -> None:
    img_tok, txt_tok = _tokens()
    mask = torch.ones(6, 7, dtype=torch.bool)
    mask[:, 5:] = False
    mask[2, 3:] = False
    other = txt_tok.clone()
    other[~mask] = 100 * torch.randn(int((~mask).sum()), 16, dtype=torch.float64)
    a = local_alignment_loss(img_tok, txt_tok, mask)
    torch.testing.assert_close(a, local_alignment_loss(img_tok, other, mask))
    torch.testing.assert_close(a, local_alignment_loss(img_tok, txt_tok[:, :5], mask[:, :5]))
    other.requires_grad_()
    local_alignment_loss(img_tok, other, mask).backward()
    assert not other.grad[~mask].any()


def test_local_loss_lower_for_matching_tokens() -> None:
    img_tok, rand_tok = _tokens(p=7, t=7)
    matching = local_alignment_loss(img_tok, img_tok.clone())
    assert matching < local_alignment_loss(img_tok, rand_tok)
    out = ContrastiveLoss(local_weight=0.3)(*_inputs(6)[:3], image_tokens=img_tok, text_tokens=img_tok)
    torch.testing.assert_close(out["local"], matching)
    torch.testing.assert_close(out["loss"], out["contrastive"] + 0.3 * matching)


# ---------------------------------------------------------------------------------------- wrapper / registry
def test_registry_and_validation() -> None:
    assert set(LOSSES) == {"clip", "siglip"}
    with pytest.raises(ValueError, match=r"known: clip, siglip.*did you mean 'siglip'"):
        ContrastiveLoss("siglp")
    with pytest.raises(ValueError, match="known: clip, siglip"):
        ContrastiveLossConfig(kind="infonce")
    with pytest.raises(TypeError, match="did you mean 'noise_weighting'"):
        ContrastiveLoss(noise_weightin=True)
    with pytest.raises(ValueError, match="local_loss"):
        ContrastiveLoss("siglip", local_loss=True)
    with pytest.raises(ValueError, match="alignment_weight"):
        ContrastiveLoss(alignment_weight=-1.0)
    with pytest.raises(ValueError, match="image_tokens"):
        ContrastiveLoss(local_weight=1.0)(*_inputs(4)[:3])
    cfg = ContrastiveLossConfig(kind="siglip", chunk_size=8)
    module = ContrastiveLoss(config=cfg, noise_weighting=True)
    assert module.config.kind == "siglip" and module.config.chunk_size == 8 and module.config.noise_weighting


def test_wrapper_keys_equal_targets() -> None:
    img, txt, scale, bias = _inputs(8)
    keys = ["a", "b", "a", None, "c", "c", "d", None]
    for kind in ("clip", "siglip"):
        loss = ContrastiveLoss(kind)
        by_keys = loss(img, txt, scale, bias, keys=keys)["loss"]
        torch.testing.assert_close(by_keys, loss(img, txt, scale, bias, targets=duplicate_targets(keys))["loss"])
        with pytest.raises(ValueError, match="either"):
            loss(img, txt, scale, bias, keys=keys, targets=torch.eye(8))
    sig = ContrastiveLoss("siglip")(img, txt, scale, bias)["loss"]
    torch.testing.assert_close(sig, SigLipLoss()(img, txt, scale, bias))


def test_distributed_helpers_are_identity_without_process_group() -> None:
    x = torch.randn(3, 2, requires_grad=True)
    assert not mdist.is_dist() and mdist.world_size() == 1 and mdist.rank() == 0
    assert mdist.gather_features(x) is x and mdist.gather_features(x, True) is x
    assert mdist.gather_sizes(3) == [3]
    assert mdist.gather_objects(("a", None)) == ["a", None]
    sh = mdist.shard_layout(3)
    assert (sh.world, sh.rank, sh.total, sh.offset) == (1, 0, 3, 0)
