"""The weights' moving average: its formula, what val scores, what the stage writes, and exact resume."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from medvlp.config import OptimConfig
from medvlp.train.ema import WeightAverage, warmup_decay
from medvlp.train.loop import CHECKPOINT, run_stage
from medvlp.train.runtime import Runtime


def test_the_average_follows_the_warmed_up_decay_and_buffers_with_it() -> None:
    net = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    avg = WeightAverage(net, decay=0.9)
    snapshots = []
    for i in range(4):
        with torch.no_grad():
            for p in net.parameters():
                p.fill_(float(i + 1))
        net(torch.randn(5, 3))  # BatchNorm's running stats and its integer counter move
        snapshots.append({k: v.clone() for k, v in net.state_dict().items()})
        avg.update(net)
    assert avg.updates == 4
    expect = {k: v.clone() for k, v in snapshots[0].items()}  # the first update copies
    for n, snap in enumerate(snapshots[1:], start=1):
        d = warmup_decay(0.9, n)
        for k, v in snap.items():
            expect[k] = v.clone() if not v.is_floating_point() else d * expect[k] + (1 - d) * v
    got = avg.weights()
    for k, v in expect.items():
        torch.testing.assert_close(got[k], v, msg=k)
    assert got["1.num_batches_tracked"] == 4  # the counter takes the latest
    assert warmup_decay(0.9, 1) < warmup_decay(0.9, 10) < warmup_decay(0.9, 10_000) == 0.9


def test_swapped_in_holds_the_average_and_gives_the_weights_back() -> None:
    net = nn.Linear(2, 1)
    avg = WeightAverage(net, decay=0.5)
    with avg.swapped_in(net):  # nothing averaged yet: nothing to swap
        pass
    avg.update(net)
    with torch.no_grad():
        net.weight.add_(1.0)
    own = net.weight.detach().clone()
    avg.update(net)
    with avg.swapped_in(net):
        torch.testing.assert_close(net.weight, avg.weights()["weight"])
        assert not torch.equal(net.weight, own)
    assert torch.equal(net.weight, own)
    with pytest.raises(ValueError, match="decay"):
        WeightAverage(net, decay=1.0)


class _Cfg(OptimConfig):
    val_every: int = 2
    select_metric: str | None = "val/loss"


class _Kill(RuntimeError):
    pass


class _Keys(Dataset):
    """The loop's sampler hands ``(index, epoch)`` keys; the toy stage needs only the index."""

    def __len__(self) -> int:
        return 48

    def __getitem__(self, key: tuple[int, int]) -> int:
        return key[0]


class _Regression:
    """A tiny stage with a val split: a linear map fitted to noisy targets; val is scored on the module's weights."""

    name = "toy"

    def __init__(self, config: _Cfg) -> None:
        self.config = config
        torch.manual_seed(0)
        self.net = nn.Linear(4, 1)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(64, 4, generator=g)
        self.y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]) + 0.5 * torch.randn(64, 1, generator=g)
        self.x, self.val_scores = x, []

    def module(self) -> nn.Module:
        return self.net

    def dataset(self) -> _Keys:
        return _Keys()

    def collate(self, items: list[Any]) -> dict[str, Any]:
        return {"index": torch.tensor(items)}

    def training_forward(self, module: nn.Module, batch: dict[str, Any], step: int) -> dict[str, torch.Tensor]:
        i = batch["index"]
        return {"loss": nn.functional.mse_loss(module(self.x[i]), self.y[i])}

    def validate(self, batch_size: int) -> dict[str, float]:
        with torch.no_grad():
            loss = float(nn.functional.mse_loss(self.net(self.x[48:]), self.y[48:]))
        self.val_scores.append((self.net.weight.detach().clone(), loss))
        return {"val/loss": loss}

    def save_final(self, out_dir: Path) -> None:
        torch.save(self.net.state_dict(), out_dir / "final.pt")


def _run(out: Path, ema: float | None, kill_at: int | None = None, resume: bool = False) -> _Regression:
    cfg = _Cfg(steps=8, batch_size=8, lr=0.05, warmup_steps=0, log_every=1, checkpoint_every=2, ema_decay=ema)
    stage = _Regression(cfg)

    def on_step(step: int, total: int) -> None:
        if kill_at is not None and step == kill_at:
            raise _Kill

    with contextlib.suppress(_Kill):
        run_stage(stage, out, Runtime(torch.device("cpu")), seed=0, resume=resume, on_step=on_step)
    return stage


def test_val_scores_the_average_the_stage_writes_it_and_a_killed_run_resumes_it(tmp_path: Path) -> None:
    raw = _run(tmp_path / "raw", ema=None)
    stage = _run(tmp_path / "ema", ema=0.9)
    ckpt = torch.load(tmp_path / "ema" / CHECKPOINT, weights_only=False)
    average = {k.removeprefix("module."): v for k, v in ckpt["ema"]["average"].items() if k.startswith("module.")}
    # the training weights are the raw run's: the average does not feed back into training
    assert torch.equal(
        ckpt["module"]["weight"], torch.load(tmp_path / "raw" / CHECKPOINT, weights_only=False)["module"]["weight"]
    )
    assert not torch.equal(average["weight"], ckpt["module"]["weight"])
    # val saw the average at the last evaluation, and the log holds what val returned
    torch.testing.assert_close(stage.val_scores[-1][0], average["weight"])
    log = [json.loads(x) for x in (tmp_path / "ema" / "log.jsonl").read_text().splitlines()]
    assert [r["val/loss"] for r in log if "val/loss" in r] == pytest.approx([s for _, s in stage.val_scores])
    # the stage writes the best evaluated step's average, which best.json names
    best = json.loads((tmp_path / "ema" / "best.json").read_text())
    i = [2, 4, 6, 8].index(best["step"])
    torch.testing.assert_close(torch.load(tmp_path / "ema" / "final.pt")["weight"], stage.val_scores[i][0])
    assert raw.val_scores[-1][1] != stage.val_scores[-1][1]
    # killed after step 5 (last checkpoint at 4) and resumed: the same average, the same outputs
    _run(tmp_path / "cut", ema=0.9, kill_at=5)
    assert torch.load(tmp_path / "cut" / CHECKPOINT, weights_only=False)["step"] == 4
    _run(tmp_path / "cut", ema=0.9, resume=True)
    cut = torch.load(tmp_path / "cut" / CHECKPOINT, weights_only=False)
    for k, v in ckpt["ema"]["average"].items():
        torch.testing.assert_close(cut["ema"]["average"][k], v, rtol=0, atol=0, msg=k)
    assert (tmp_path / "cut" / "final.pt").read_bytes() == (tmp_path / "ema" / "final.pt").read_bytes()


def test_without_selection_the_stage_writes_the_last_average(tmp_path: Path) -> None:
    cfg = _Cfg(steps=4, batch_size=8, lr=0.05, warmup_steps=0, checkpoint_every=4, ema_decay=0.9, select_metric=None)
    run_stage(_Regression(cfg), tmp_path, Runtime(torch.device("cpu")), seed=0)
    ckpt = torch.load(tmp_path / CHECKPOINT, weights_only=False)
    final = torch.load(tmp_path / "final.pt")
    torch.testing.assert_close(final["weight"], ckpt["ema"]["average"]["module.weight"])
    assert not torch.equal(final["weight"], ckpt["module"]["weight"])
    assert not (tmp_path / "best.json").exists()
