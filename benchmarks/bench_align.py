"""Alignment training step: medvlp's loop against open_clip's own `train_one_epoch`, same towers, same batch.

    python benchmarks/bench_align.py [--steps 20] [--batch 32] [--encoder timm/resnet10t] [--text-layers 3]

Both sides train the same `MedVLP` towers (built from the same seed) on the same pre-tokenized batches of a
synthetic radiograph cohort, with AdamW and the CLIP loss, fp32 on the CPU (bf16 autocast on a GPU):
- medvlp: `medvlp.train.loop.run_stage` with the stage2-align stage (reading the memory-mapped cache);
- open_clip: `open_clip_train.train.train_one_epoch` with `open_clip.ClipLoss`, the model adapted to its
  `model(images, texts) -> {"image_features", "text_features", "logit_scale"}` interface.
Each side runs in its own subprocess, so peak memory (max RSS on the CPU, `torch.cuda.max_memory_allocated`
on a GPU) is its own. The first 3 steps are warm-up and not timed. Prints and writes benchmarks/results/align.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from machine import machine

WARMUP = 3


def _model_config(args: argparse.Namespace, cache):
    from medvlp.models import ModelConfig

    return ModelConfig(
        image_encoder=args.encoder,
        spatial_dims=cache.spatial_dims,
        image_size=tuple(cache.summary["preprocess"]["size"]),
        text_num_layers=args.text_layers,
        text_max_length=96,
        embed_dim=128,
    )


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_medvlp(args: argparse.Namespace, cache_dir: Path, work: Path) -> dict:
    from medvlp.config import AlignStageConfig
    from medvlp.data.cache import CachedCohort
    from medvlp.train.loop import run_stage
    from medvlp.train.runtime import init_runtime, seed_everything
    from medvlp.train.stages.align import AlignStage

    rt = init_runtime("auto")
    cache = CachedCohort.open(cache_dir)
    seed_everything(0)
    cfg = AlignStageConfig(
        steps=args.steps,
        batch_size=args.batch,
        lr=1e-4,
        warmup_steps=0,
        false_negatives="none",
        checkpoint_every=10**6,
        log_every=1,
        clip_grad=None,
    )
    stage = AlignStage(cfg, cache, _model_config(args, cache), ["findings", "impression"], seed=0, augment=False)
    t0 = time.perf_counter()
    run_stage(stage, work / "medvlp", rt, seed=0)
    total = time.perf_counter() - t0
    log = [json.loads(x) for x in (work / "medvlp" / "log.jsonl").read_text().splitlines()]
    timed = [r["samples_per_s"] for r in log if r["step"] > WARMUP]
    return {
        "samples_per_s": round(sum(timed) / len(timed), 2),
        "total_s": round(total, 2),
        "peak_mb": round(_peak_mb(rt.device), 1),
        "final_loss": log[-1]["loss"],
        "device": str(rt.device),
    }


class OpenClipAdapter(torch.nn.Module):
    """Our towers behind open_clip's model interface (token ids in, a dict of features out)."""

    def __init__(self, model, pad_id: int) -> None:
        super().__init__()
        self.model, self.pad_id = model, pad_id
        self.logit_scale = model.logit_scale

    def forward(self, images: torch.Tensor, texts: torch.Tensor) -> dict:
        tokens = {"input_ids": texts, "attention_mask": (texts != self.pad_id).long()}
        return {
            "image_features": self.model.encode_image(images),
            "text_features": self.model.encode_text(tokens),
            "logit_scale": self.model.logit_scale.exp(),
        }


def run_open_clip(args: argparse.Namespace, cache_dir: Path, work: Path) -> dict:
    import open_clip
    from open_clip_train.train import train_one_epoch

    from medvlp.data.cache import CachedCohort
    from medvlp.models import MedVLP
    from medvlp.train.data import CachedImages, StepSchedule
    from medvlp.train.runtime import resolve_device, seed_everything

    device = resolve_device("auto")
    cache = CachedCohort.open(cache_dir)
    seed_everything(0)
    model = MedVLP(_model_config(args, cache)).to(device)
    ds = CachedImages(cache, "train", ["findings", "impression"], views=0)
    schedule = StepSchedule(len(ds), args.batch, seed=0)
    batches = []
    for s in range(args.steps):  # the same batches medvlp's loop draws, pre-tokenized as open_clip expects
        idx = schedule.indices(s)
        images = torch.stack([ds.image(i) for i in idx])
        ids = model.text_encoder.tokenize([ds.text(i) for i in idx])["input_ids"]
        batches.append((images, ids))

    class Loader:
        num_batches, num_samples = len(batches), len(batches) * args.batch

        def __iter__(self):
            return iter(batches)

    class Data:
        dataloader = Loader()

        def set_epoch(self, epoch: int) -> None:
            pass

    adapter = OpenClipAdapter(model, model.text_encoder.tokenizer.pad_token_id)
    params = [p for p in adapter.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.98), eps=1e-6)
    targs = SimpleNamespace(
        accum_freq=1,
        device=str(device),
        distill=False,
        grad_clip_norm=None,
        horovod=False,
        log_every_n_steps=10**6,
        precision="amp_bf16" if device.type == "cuda" else "fp32",
        skip_scheduler=True,
        world_size=1,
        rank=0,
        batch_size=args.batch,
        wandb=False,
    )
    # time the steps after warm-up by running the warm-up batches as their own "epoch"
    Loader.num_batches = WARMUP
    warm, rest = batches[:WARMUP], batches[WARMUP:]
    batches[:] = warm
    train_one_epoch(adapter, {"train": Data()}, open_clip.ClipLoss(), 0, optimizer, None, None, None, targs)
    batches[:] = rest
    Loader.num_batches, Loader.num_samples = len(rest), len(rest) * args.batch
    t0 = time.perf_counter()
    train_one_epoch(adapter, {"train": Data()}, open_clip.ClipLoss(), 1, optimizer, None, None, None, targs)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return {
        "samples_per_s": round(len(rest) * args.batch / seconds, 2),
        "peak_mb": round(_peak_mb(device), 1),
        "device": str(device),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--encoder", default="timm/resnet10t")
    ap.add_argument("--text-layers", type=int, default=3)
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--side", choices=["medvlp", "open_clip"], help=argparse.SUPPRESS)
    ap.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "align.json")
    args = ap.parse_args()
    if args.side:  # one side, in its own process
        fn = run_medvlp if args.side == "medvlp" else run_open_clip
        print(json.dumps(fn(args, args.cache, args.work)))
        return

    from medvlp.data.build import build_cohort
    from medvlp.data.synthetic import synthesize

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        build_cohort(synthesize("cxr", args.n, tmp_path / "src", seed=0), tmp_path / "cache", progress=False)
        results = {}
        for side in ("open_clip", "medvlp"):
            cmd = [
                sys.executable,
                __file__,
                "--side",
                side,
                "--cache",
                str(tmp_path / "cache"),
                "--work",
                str(tmp_path),
                "--steps",
                str(args.steps),
                "--batch",
                str(args.batch),
                "--encoder",
                args.encoder,
                "--text-layers",
                str(args.text_layers),
            ]
            r = subprocess.run(cmd, capture_output=True, text=True, check=True)
            results[side] = json.loads(r.stdout.strip().splitlines()[-1])
            print(side, results[side], flush=True)
    out = {
        "benchmark": "stage2-align training step vs open_clip train_one_epoch (same towers, batches, optimizer)",
        "machine": machine(torch=torch.__version__),
        "args": {"steps": args.steps, "batch": args.batch, "encoder": args.encoder, "text_layers": args.text_layers},
        "results": results,
        "medvlp_vs_open_clip_throughput": round(
            results["medvlp"]["samples_per_s"] / results["open_clip"]["samples_per_s"], 3
        ),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
