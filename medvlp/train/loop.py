"""One short training loop for every stage (the pattern of open_clip's task classes and MAE's engine).

A stage says what to train and how to compute its loss; this loop does the rest: optimizer (AdamW or
Lion), warmup + cosine schedule, gradient accumulation, clipping, mixed precision, DDP, atomic
checkpoints every N steps, exact resume (model, optimizer, scheduler, scaler, RNG, data position),
a progress bar and ``log.jsonl``; for a stage that can validate, evaluation on ``val`` every N steps, the
best step kept as the stage's result (``best.json`` names it) and optional early stopping.
"""

from __future__ import annotations

import io
import json
import logging
import math
import random
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from medvlp.config import OptimConfig
from medvlp.data.cache import atomic_write_bytes
from medvlp.train.data import StepBatchSampler, StepSchedule
from medvlp.train.ema import WeightAverage
from medvlp.train.runtime import Runtime, autocast, barrier, channels_last, resolve_precision, to_channels_last
from medvlp.train.select import BEST_FILE, BestTracker

logger = logging.getLogger(__name__)
CHECKPOINT = "checkpoint.pt"


class Stage(Protocol):
    """What a stage provides to the loop."""

    name: str
    config: OptimConfig

    def module(self) -> nn.Module:
        """The module whose trainable parameters this stage optimizes (wrapped in DDP by the loop)."""
        ...

    def dataset(self) -> Dataset: ...

    def collate(self, items: list[Any]) -> dict[str, Any]: ...

    def training_forward(self, module: nn.Module, batch: dict[str, Any], step: int) -> dict[str, torch.Tensor]:
        """Returns at least ``{"loss": scalar}``; other scalars are logged."""
        ...

    def save_final(self, out_dir: Path) -> None: ...

    # Optional: ``lr_plan(name) -> LrPlan`` gives a parameter (by its name in ``module()``) its own share of the
    # stage's learning rate and a number of steps to hold still (a new head learns before the pretrained body).
    # Optional: ``after_step()`` runs after every optimizer step (e.g. clamping a temperature into its range, as
    # open_clip clamps ``logit_scale`` after the step, never inside the forward).
    # Optional: ``validate(batch_size) -> {"val/<metric>": value}`` evaluates the stage on its val split; the loop
    # calls it every ``config.val_every`` steps and, with ``config.select_metric``, keeps the best step (select.py).


@dataclass(frozen=True)
class LrPlan:
    """A parameter group's learning rate: ``scale`` times the stage's schedule, zero for the first ``delay`` steps."""

    scale: float = 1.0
    delay: int = 0


def lr_lambda(cfg: OptimConfig, delay: int = 0):
    """Linear warmup, then cosine decay to ``min_lr_ratio`` of the peak; all zero for the first ``delay`` steps."""
    steps = max(1, cfg.steps - delay)

    def f(step: int) -> float:
        step -= delay
        if step < 0:
            return 0.0
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        span = max(1, steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def param_groups(
    module: nn.Module, cfg: OptimConfig, plan: Callable[[str], LrPlan] | None = None
) -> list[dict[str, Any]]:
    """Groups by (weight decay, learning-rate plan): no decay on biases, norms, temperatures (1-D parameters).

    Each group carries its plan's ``delay`` beside its ``lr``, so the scheduler can be built from the optimizer.
    """
    groups: dict[tuple[bool, LrPlan], list[nn.Parameter]] = {}
    for name, p in module.named_parameters():
        if p.requires_grad:
            key = (p.ndim > 1, plan(name) if plan is not None else LrPlan())
            groups.setdefault(key, []).append(p)
    if not groups:
        raise ValueError("the stage has no trainable parameters (is every tower locked?)")
    return [
        {
            "params": groups[(decay, lp)],
            "weight_decay": cfg.weight_decay if decay else 0.0,
            "lr": cfg.lr * lp.scale,
            "delay": lp.delay,
        }
        for decay, lp in sorted(groups, key=lambda k: (not k[0], k[1].scale, k[1].delay))
    ]


def make_optimizer(
    module: nn.Module, cfg: OptimConfig, plan: Callable[[str], LrPlan] | None = None
) -> torch.optim.Optimizer:
    """AdamW or Lion over :func:`param_groups`."""
    groups = param_groups(module, cfg, plan)
    if cfg.optimizer == "lion":
        from timm.optim import Lion

        return Lion(groups, lr=cfg.lr, betas=cfg.betas)
    try:  # the fused kernel (CPU and CUDA) is several times faster than the per-tensor loop
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=1e-6, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=1e-6)


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            out[k] = v.to(device, non_blocking=True)
        elif isinstance(v, list) and v and isinstance(v[0], torch.Tensor):
            out[k] = [t.to(device, non_blocking=True) for t in v]
        else:
            out[k] = v
    return out


def _trim_log(path: Path, step: int) -> None:
    """On resume, drop log lines past the checkpoint: they will be written again."""
    if not path.is_file():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
    atomic_write_bytes(path, ("\n".join(keep) + "\n").encode() if keep else b"")


def run_stage(
    stage: Stage,
    out_dir: Path,
    rt: Runtime,
    seed: int,
    resume: bool = False,
    num_workers: int = 0,
    on_step: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Train one stage to ``stage.config.steps`` optimizer steps, or continue it from its checkpoint.

    ``num_workers`` DataLoader processes prepare batches; batches and augmentations depend only on the step, so
    the result is the same for any number of workers. ``on_step(step, total)``, when given, is called on rank 0
    at the start and after every optimizer step, and replaces the stage's own progress bar (a caller showing one
    display for a whole pipeline).

    Returns:
        ``{"steps": ..., "loss": last logged loss, "resumed_from": step or None}``, and for a stage that selects
        its best step, ``"best"`` (metric, mode, step, value: the step whose weights the final outputs hold) and
        ``"stopped_early"``.
    """
    cfg = stage.config
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path, log_path = out_dir / CHECKPOINT, out_dir / "log.jsonl"
    module = stage.module().to(rt.device)
    if cfg.channels_last:
        to_channels_last(module)
    ema = WeightAverage(module, cfg.ema_decay) if cfg.ema_decay is not None else None
    opt = make_optimizer(module, cfg, getattr(stage, "lr_plan", None))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, [lr_lambda(cfg, g["delay"]) for g in opt.param_groups])
    amp_dtype = resolve_precision(cfg.precision, rt.device)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=amp_dtype == torch.float16)
    val_every = getattr(cfg, "val_every", None) if hasattr(stage, "validate") else None
    metric = getattr(cfg, "select_metric", None) if val_every else None
    tracker = BestTracker(metric, getattr(cfg, "patience", None)) if metric else None

    step, resumed_from, stopped = 0, None, False
    if resume and ckpt_path.is_file():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        module.load_state_dict(state["module"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        step = resumed_from = int(state["step"])
        stopped = bool(state.get("stopped", False))
        if tracker is not None and state.get("best") is not None:
            tracker.load_state_dict(state["best"])
        if ema is not None and state.get("ema") is not None:
            ema.load_state_dict(state["ema"])
        _set_rng_state(state["rng"][rt.rank] if isinstance(state["rng"], list) else state["rng"])
        if rt.is_main:
            _trim_log(log_path, step)
        logger.info("%s: resumed at step %d", stage.name, step)
    elif rt.is_main and log_path.exists():
        log_path.unlink()
    barrier(rt)
    report = on_step if rt.is_main else None
    if report is not None:
        report(step, cfg.steps)
    if step >= cfg.steps or stopped:  # finished; a kill may have come between the last checkpoint and the outputs
        _finish(stage, module, out_dir, tracker, step, stopped, rt, ema)
        return _result(step, None, resumed_from, tracker, stopped)

    ddp: nn.Module = module
    if rt.distributed:
        # A stage's module returns only what its loss uses, so DDP's walk back from the outputs finds exactly the
        # parameters that get a gradient (SimMIM leaves the pooled-embedding head unused, for one).
        ddp = DistributedDataParallel(
            module, device_ids=[rt.device.index] if rt.device.type == "cuda" else None, find_unused_parameters=True
        )
    after_step = getattr(stage, "after_step", None)
    ds = stage.dataset()
    schedule = StepSchedule(len(ds), cfg.batch_size, seed, rt.rank, rt.world_size)
    accum = cfg.grad_accum
    loader = DataLoader(
        ds,
        batch_sampler=StepBatchSampler(schedule, step * accum, cfg.steps * accum),
        collate_fn=stage.collate,
        num_workers=num_workers,
        pin_memory=rt.device.type == "cuda",
        generator=torch.Generator().manual_seed(seed),  # its own: iter() must not draw from the global RNG
    )
    batches = iter(loader)
    show = rt.is_main and on_step is None and sys.stderr.isatty()
    bar = tqdm(total=cfg.steps, initial=step, desc=stage.name, unit="step", disable=not show)
    module.train()
    last: dict[str, float] = {}
    t_log, samples = time.perf_counter(), 0
    with log_path.open("a") if rt.is_main else nullcontext() as log:
        while step < cfg.steps:
            sums: dict[str, float] = {}
            for micro in range(accum):
                batch = _to(next(batches), rt.device)
                if cfg.channels_last:  # images, views, masks: every 4-D and 5-D tensor
                    batch = {k: channels_last(v) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                sync = nullcontext() if (micro == accum - 1 or not rt.distributed) else ddp.no_sync()
                with sync:
                    with autocast(rt.device, amp_dtype):
                        out = stage.training_forward(ddp, batch, step)
                    if not torch.isfinite(out["loss"]):
                        raise FloatingPointError(f"{stage.name}: loss is {out['loss'].item()} at step {step}")
                    scaler.scale(out["loss"] / accum).backward()
                for k, v in out.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach()) / accum
                samples += len(batch["index"]) * rt.world_size
            scaler.unscale_(opt)
            grad_norm = None
            if cfg.clip_grad is not None:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(module.parameters(), cfg.clip_grad))
            scaler.step(opt)
            scaler.update()
            if after_step is not None:
                after_step()
            if ema is not None:
                ema.update(module)
            opt.zero_grad(set_to_none=True)
            sched.step()
            step += 1
            bar.update()
            if report is not None:
                report(step, cfg.steps)
            evaluate = bool(val_every) and (step % val_every == 0 or step == cfg.steps)
            t_val = time.perf_counter()
            val: dict[str, float] = {}
            if evaluate:  # with an average of the weights, val scores the average and the best step keeps it
                with ema.swapped_in(module) if ema is not None else nullcontext():
                    val = _validate(stage, module, rt, amp_dtype, cfg.batch_size * rt.world_size)
                    if tracker is not None and rt.is_main and tracker.update(step, val, module):
                        logger.info("%s: step %d is the best so far (%s %.4f)", stage.name, step, metric, tracker.value)
                if tracker is not None:
                    stopped = _agree(tracker.should_stop, rt)
            t_log += time.perf_counter() - t_val  # samples/s counts training time only
            if step % cfg.log_every == 0 or step == cfg.steps or evaluate:
                if rt.distributed:
                    vec = torch.tensor(list(sums.values()), dtype=torch.float64, device=rt.device)
                    dist.all_reduce(vec)
                    sums = dict(zip(sums, (vec / rt.world_size).tolist(), strict=True))
                now = time.perf_counter()
                last = {
                    "step": step,
                    **{k: round(v, 6) for k, v in sums.items()},
                    "lr": max(g["lr"] for g in opt.param_groups),
                    "samples_per_s": round(samples / max(now - t_log, 1e-9), 2),
                }
                if grad_norm is not None:
                    last["grad_norm"] = round(grad_norm, 4)
                last |= {k: round(v, 6) for k, v in val.items()}
                if evaluate and tracker is not None:
                    last["best_step"] = tracker.step
                t_log, samples = now, 0
                if log is not None:
                    log.write(json.dumps(last) + "\n")
                    log.flush()
                bar.set_postfix(loss=f"{sums['loss']:.4f}")
            if step % cfg.checkpoint_every == 0 or step == cfg.steps or stopped:
                extra = {
                    "stopped": stopped,
                    "best": tracker.state_dict() if tracker is not None else None,
                    "ema": ema.state_dict() if ema is not None else None,
                }
                _save_checkpoint(ckpt_path, module, opt, sched, scaler, step, rt, extra)
            if stopped:
                logger.info(
                    "%s: stopped early at step %d: %d evaluations without a better %s",
                    stage.name,
                    step,
                    tracker.bad if tracker is not None else 0,
                    metric,
                )
                break
    bar.close()
    _finish(stage, module, out_dir, tracker, step, stopped, rt, ema)
    return _result(step, last.get("loss"), resumed_from, tracker, stopped)


def _validate(stage: Stage, module: nn.Module, rt: Runtime, amp_dtype, batch_size: int) -> dict[str, float]:
    """Rank 0 evaluates the stage on val (the other ranks wait); the training RNG streams are left untouched."""
    metrics: dict[str, float] = {}
    if rt.is_main:
        rng = _rng_state()
        try:
            with autocast(rt.device, amp_dtype):
                metrics = {k: float(v) for k, v in stage.validate(batch_size).items()}  # type: ignore[attr-defined]
        finally:
            _set_rng_state(rng)
            module.train()
    barrier(rt)
    return metrics


def _agree(flag: bool, rt: Runtime) -> bool:
    """Rank 0's decision, on every rank."""
    if not rt.distributed:
        return flag
    box = [flag]
    dist.broadcast_object_list(box, src=0)
    return bool(box[0])


def _finish(
    stage: Stage,
    module: nn.Module,
    out_dir: Path,
    tracker: BestTracker | None,
    step: int,
    stopped: bool,
    rt: Runtime,
    ema: WeightAverage | None = None,
) -> None:
    """The stage's final outputs, from the best step's weights when it selects one (else the weights' average when
    the stage keeps one); ``best.json`` says which step."""
    if rt.is_main:
        if tracker is not None and tracker.weights is not None:
            module.load_state_dict(tracker.weights)
        elif ema is not None and ema.updates:
            module.load_state_dict(ema.weights())
        stage.save_final(out_dir)
        if tracker is not None:
            best = {**tracker.record(), "last_step": step, "stopped_early": stopped}
            atomic_write_bytes(out_dir / BEST_FILE, (json.dumps(best, indent=2) + "\n").encode())
            if tracker.weights is None:
                logger.warning("%s: no finite %s on val; the model is the last step's", stage.name, tracker.metric)
    barrier(rt)


def _result(
    step: int, loss: float | None, resumed_from: int | None, tracker: BestTracker | None, stopped: bool
) -> dict[str, Any]:
    out: dict[str, Any] = {"steps": step, "loss": loss, "resumed_from": resumed_from}
    if tracker is not None:
        out |= {"best": tracker.record(), "stopped_early": stopped}
    return out


def _save_checkpoint(
    path: Path, module: nn.Module, opt, sched, scaler, step: int, rt: Runtime, extra: dict[str, Any] | None = None
) -> None:
    """Rank 0 writes one file atomically, holding every rank's RNG state (and ``extra``: selection state)."""
    rng: Any = _rng_state()
    if rt.distributed:
        gathered: list[Any] = [None] * rt.world_size
        dist.all_gather_object(gathered, rng)
        rng = gathered
    if rt.is_main:
        buf = io.BytesIO()
        torch.save(
            {
                "step": step,
                "module": module.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "scaler": scaler.state_dict(),
                "rng": rng,
                **(extra or {}),
            },
            buf,
        )
        atomic_write_bytes(path, buf.getvalue())
    barrier(rt)
