"""Two real `gloo` ranks on CPU vs one process on the global batch.

One `torch.multiprocessing.spawn` runs every case on both ranks (each rank builds the same seeded global batch and
slices its rows as leaf tensors) and saves values and gradients; the tests compare them with a single process
computing the same loss on the whole batch, following the rule in `medvlp.losses`:

- mean over ranks of the per-rank loss == global loss (and every rank's loss == global loss for CLIP local_loss=False);
- gradient of the local feature leaves == world_size * the global gradient of those rows;
- mean over ranks of the gradients of replicated tensors (logit_scale, logit_bias, a shared projection) == global
  gradient, i.e. DDP's gradient averaging reproduces single-process training on the global batch.

open_clip's distributed ClipLoss / SigLipLoss (gather with grad) run in the same workers as a second peer.
"""

from __future__ import annotations

import functools
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from medvlp import distributed as mdist
from medvlp.losses import ContrastiveLoss, clip_loss, siglip_loss

WORLD = 2
D = 8

LossFn = Callable[..., torch.Tensor]


def _clip(**kw: Any) -> LossFn:
    return lambda img, txt, scale, bias, targets: clip_loss(img, txt, scale, targets=targets, **kw)


def _siglip(**kw: Any) -> LossFn:
    return lambda img, txt, scale, bias, targets: siglip_loss(img, txt, scale, bias, positives=targets, **kw)


def _module(kind: str, **kw: Any) -> LossFn:
    module = ContrastiveLoss(kind, **kw)
    return lambda img, txt, scale, bias, targets: module(img, txt, scale, bias, targets=targets)["loss"]


def _module_keys(kind: str, **kw: Any) -> LossFn:
    """Per-sample string keys of the local rows instead of targets; the module gathers them across ranks."""
    module = ContrastiveLoss(kind, **kw)
    return lambda img, txt, scale, bias, keys: module(img, txt, scale, bias, keys=keys)["loss"]


# name -> (loss fn, local sizes per rank, targets: None | "matrix" | "groups" | "keys", local_loss semantics)
CASES: dict[str, tuple[LossFn, tuple[int, int], str | None, bool]] = {
    "clip_global": (_clip(), (4, 4), None, False),
    "clip_local": (_clip(local_loss=True), (4, 4), None, True),
    "clip_global_uneven": (_clip(), (3, 5), None, False),
    "clip_local_uneven": (_clip(local_loss=True), (3, 5), None, True),
    "clip_global_chunked": (_clip(chunk_size=3), (4, 4), None, False),
    "clip_local_chunked": (_clip(local_loss=True, chunk_size=3), (5, 3), None, True),
    "clip_global_soft": (_clip(), (4, 4), "matrix", False),
    "clip_local_soft": (_clip(local_loss=True), (4, 4), "matrix", True),
    "clip_local_soft_chunked_groups": (_clip(local_loss=True, chunk_size=3), (3, 5), "groups", True),
    "siglip": (_siglip(), (4, 4), None, True),
    "siglip_uneven": (_siglip(), (3, 5), None, True),
    "siglip_chunked": (_siglip(chunk_size=3), (4, 4), None, True),
    "siglip_chunked_uneven": (_siglip(chunk_size=2), (5, 3), None, True),
    "siglip_positives": (_siglip(), (4, 4), "matrix", True),
    "siglip_positives_chunked_groups": (_siglip(chunk_size=3), (3, 5), "groups", True),
    "module_clip_noise_local": (_module("clip", local_loss=True, noise_weighting=True), (4, 4), None, True),
    "module_clip_noise_global": (_module("clip", noise_weighting=True, chunk_size=3), (4, 4), "groups", False),
    "module_siglip_noise": (_module("siglip", noise_weighting=True), (3, 5), "groups", True),
    "module_clip_keys_local": (_module_keys("clip", local_loss=True, chunk_size=2), (3, 5), "keys", True),
    "module_siglip_keys": (_module_keys("siglip"), (5, 3), "keys", True),
}


def _global_batch(total: int, seed: int) -> dict[str, torch.Tensor]:
    """The same seeded global batch on every rank (and in the reference process)."""
    g = torch.Generator().manual_seed(seed)
    raw_img = torch.randn(total, D, generator=g, dtype=torch.float64)
    raw_txt = raw_img + 0.8 * torch.randn(total, D, generator=g, dtype=torch.float64)  # correlated pairs
    groups = torch.randint(0, total // 2, (total,), generator=g)
    return {
        "img": F.normalize(raw_img, dim=-1),
        "txt": F.normalize(raw_txt, dim=-1),
        "raw_img": raw_img,
        "raw_txt": raw_txt,
        "proj": torch.eye(D, dtype=torch.float64) + 0.1 * torch.randn(D, D, generator=g, dtype=torch.float64),
        "scale": torch.tensor(10.0, dtype=torch.float64),
        "bias": torch.tensor(-3.0, dtype=torch.float64),
        "groups": groups,
        "matrix": (groups[:, None] == groups[None]).double(),
    }


def _run(fn: LossFn, batch: dict[str, torch.Tensor], rows: slice, targets: str | None) -> dict[str, torch.Tensor]:
    """Loss and gradients on `rows` of the global batch: features are leaves, plus a shared projection variant."""
    img = batch["img"][rows].clone().requires_grad_()
    txt = batch["txt"][rows].clone().requires_grad_()
    scale = batch["scale"].clone().requires_grad_()
    bias = batch["bias"].clone().requires_grad_()
    if targets == "keys":  # local rows only, None for odd groups (a None key only matches itself)
        tgt = [None if int(v) % 2 else f"report-{int(v)}" for v in batch["groups"][rows]]
    else:
        tgt = None if targets is None else batch[targets]
    loss = fn(img, txt, scale, bias, tgt)
    loss.backward()
    # DDP-style: a replicated parameter in front of the loss
    proj = batch["proj"].clone().requires_grad_()
    fn(
        F.normalize(batch["raw_img"][rows] @ proj, dim=-1),
        F.normalize(batch["raw_txt"][rows] @ proj, dim=-1),
        batch["scale"],
        batch["bias"],
        tgt,
    ).backward()
    zero = torch.zeros((), dtype=torch.float64)
    return {
        "loss": loss.detach(),
        "img": img.grad,
        "txt": txt.grad,
        "scale": zero if scale.grad is None else scale.grad,
        "bias": zero if bias.grad is None else bias.grad,
        "proj": proj.grad,
    }


def _open_clip_peers(rank: int, batch: dict[str, torch.Tensor], rows: slice) -> dict[str, dict[str, torch.Tensor]]:
    """Per-rank loss and gradients of ours and open_clip's distributed losses on the same even shards."""
    from open_clip.loss import ClipLoss, SigLipLoss

    fns = {
        "ours_clip_global": lambda i, t, s, b: clip_loss(i, t, s),
        "ours_clip_local": lambda i, t, s, b: clip_loss(i, t, s, local_loss=True),
        "ours_siglip": lambda i, t, s, b: siglip_loss(i, t, s, b),
        "clip_global": lambda i, t, s, b: ClipLoss(gather_with_grad=True, rank=rank, world_size=WORLD)(i, t, s),
        "clip_local": lambda i, t, s, b: ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=WORLD)(
            i, t, s
        ),
        "siglip_gather": lambda i, t, s, b: SigLipLoss(rank=rank, world_size=WORLD, dist_impl="gather")(i, t, s, b),
        "siglip_bidir": lambda i, t, s, b: SigLipLoss(rank=rank, world_size=WORLD, dist_impl="bidir")(i, t, s, b),
    }
    out = {}
    for name, fn in fns.items():
        leaves = [batch[k][rows].clone().requires_grad_() for k in ("img", "txt")]
        leaves += [batch[k].clone().requires_grad_() for k in ("scale", "bias")]
        loss = fn(*leaves)
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        out[name] = {"loss": loss.detach(), "img": grads[0], "txt": grads[1], "scale": grads[2]}
    return out


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        results: dict[str, Any] = {}
        for seed, (name, (fn, sizes, targets, _)) in enumerate(CASES.items()):
            start = sum(sizes[:rank])
            results[name] = _run(fn, _global_batch(sum(sizes), seed), slice(start, start + sizes[rank]), targets)
        results["open_clip"] = _open_clip_peers(rank, _global_batch(8, 99), slice(4 * rank, 4 * rank + 4))
        results["layout"] = mdist.shard_layout(3 + 2 * rank)
        results["objects"] = mdist.gather_objects([f"r{rank}", None][: rank + 1])
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    out = tmp_path_factory.mktemp("dist")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@functools.cache
def _reference(name: str) -> dict[str, torch.Tensor]:
    fn, sizes, targets, _ = CASES[name]
    seed = list(CASES).index(name)
    return _run(fn, _global_batch(sum(sizes), seed), slice(None), targets)


@pytest.mark.parametrize("name", list(CASES))
def test_ranks_reproduce_the_global_batch(ranks: list[dict[str, Any]], name: str) -> None:
    _, sizes, _, local_loss = CASES[name]
    ref = _reference(name)
    per_rank = [r[name] for r in ranks]
    tol = {"rtol": 1e-9, "atol": 1e-10}
    torch.testing.assert_close(sum(r["loss"] for r in per_rank) / WORLD, ref["loss"], **tol)
    if not local_loss:  # every rank computes the full global loss
        for r in per_rank:
            torch.testing.assert_close(r["loss"], ref["loss"], **tol)
    start = 0
    for r, n in zip(per_rank, sizes, strict=True):
        for key in ("img", "txt"):
            torch.testing.assert_close(r[key], WORLD * ref[key][start : start + n], **tol)
        start += n
    for key in ("scale", "bias", "proj"):  # replicated: DDP averages
        torch.testing.assert_close(sum(r[key] for r in per_rank) / WORLD, ref[key], **tol)


@pytest.mark.parametrize(
    ("ours", "peer"),
    [
        ("clip_global", "clip_global"),
        ("clip_local", "clip_local"),
        ("siglip", "siglip_gather"),
        ("siglip", "siglip_bidir"),
    ],
)
def test_per_rank_values_match_open_clip(ranks: list[dict[str, Any]], ours: str, peer: str) -> None:
    """Even shards: per-rank loss and gradients equal open_clip's distributed losses (gather_with_grad=True)."""
    for r in ranks:
        mine, theirs = r["open_clip"][f"ours_{ours}"], r["open_clip"][peer]
        for key in ("loss", "img", "txt", "scale"):
            torch.testing.assert_close(mine[key], theirs[key], rtol=1e-9, atol=1e-10)


def test_layout_and_object_gather(ranks: list[dict[str, Any]]) -> None:
    for rank, r in enumerate(ranks):
        assert r["layout"] == mdist.Shard(WORLD, rank, (3, 5))
        assert r["layout"].offset == 3 * rank and r["layout"].total == 8
        assert r["objects"] == ["r0", "r1", None]
