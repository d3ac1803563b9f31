"""Peak memory and time of one forward + backward of the CLIP and SigLIP losses, with and without chunking.

    python benchmarks/bench_loss_memory.py [--batches 4096,16384] [--dim 512] [--chunk 1024]
        [--losses clip,siglip] [--device auto|cpu|cuda] [--out benchmarks/results/loss_memory.json]

One process holds the whole global batch B (what every rank computes with `clip_loss(local_loss=False)`; with
`local_loss=True` / SigLIP across N ranks each rank computes B/N rows, so its memory is about 1/N of these).
Every configuration runs in a fresh subprocess, so measurements do not leak into each other. What is measured:

- CUDA: `torch.cuda.max_memory_allocated()` during the step minus the allocated memory before it (inputs already
  resident), i.e. the peak of the loss's activations, temporaries and gradients. Time: median of `--repeats` steps
  after one warm-up step, with `torch.cuda.synchronize()`.
- CPU: the peak resident set size (`getrusage(RUSAGE_SELF).ru_maxrss`, Linux KiB) after the step minus the
  resident set size (/proc/self/statm) just before it. PyTorch's CPU allocator returns big blocks to the OS, so
  this tracks the step's peak allocation plus allocator slack; the pre-step high-water mark minus the pre-step RSS
  is reported as `rss_floor_mb` (the smallest peak this method can show). A 256-row warm-up step runs first so
  one-time lazy initialisation is not counted. Time: one full step (to keep the default run short); `--repeats`
  adds more and reports the median.

`bxb_matrix_mb` is the size of one B x B logits matrix in the benchmark dtype, for scale. Prints a table and
writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def child(cfg: dict[str, Any]) -> dict[str, Any]:
    """Run one configuration in this process and return its figures."""
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(ROOT))
    from medvlp.losses import clip_loss, siglip_loss

    dev = torch.device(cfg["device"])
    dtype = getattr(torch, cfg["dtype"])
    b, d, chunk = cfg["batch"], cfg["dim"], cfg["chunk"]
    g = torch.Generator(device=dev).manual_seed(0)
    img = F.normalize(torch.randn(b, d, generator=g, device=dev, dtype=dtype), dim=-1).requires_grad_()
    txt = F.normalize(torch.randn(b, d, generator=g, device=dev, dtype=dtype), dim=-1).requires_grad_()
    scale = torch.tensor(10.0, device=dev, dtype=dtype, requires_grad=True)
    bias = torch.tensor(-10.0, device=dev, dtype=dtype, requires_grad=True)

    def step(n: int | None = None) -> float:
        """Forward + backward on the first `n` rows (all by default)."""
        for t in (img, txt, scale, bias):
            t.grad = None
        i, t = (img, txt) if n is None else (img[:n], txt[:n])
        if cfg["loss"] == "clip":
            loss = clip_loss(i, t, scale, chunk_size=chunk)
        else:
            loss = siglip_loss(i, t, scale, bias, chunk_size=chunk)
        loss.backward()
        return float(loss)

    out: dict[str, Any] = {k: cfg[k] for k in ("loss", "batch", "dim", "chunk", "device", "dtype")}
    out["bxb_matrix_mb"] = round(b * b * torch.finfo(dtype).bits / 8 / 2**20, 1)
    times = []
    try:
        if dev.type == "cuda":
            step()  # warm-up (kernels, cuBLAS workspace)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            for _ in range(cfg["repeats"]):
                t0 = time.perf_counter()
                out["loss_value"] = step()
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            out["peak_mb"] = round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)
            out["memory_method"] = "cuda max_memory_allocated - allocated before"
        else:
            step(min(b, 256))  # one-time lazy initialisation (BLAS buffers, autograd threads) is not the step's
            base, floor = _rss_bytes(), _maxrss_bytes()
            for _ in range(cfg["repeats"]):
                t0 = time.perf_counter()
                out["loss_value"] = step()
                times.append(time.perf_counter() - t0)
            out["peak_mb"] = round((_maxrss_bytes() - base) / 2**20, 1)
            out["rss_floor_mb"] = round(max(floor - base, 0) / 2**20, 1)
            out["memory_method"] = "ru_maxrss after - RSS before (fresh process)"
        out["time_s"] = round(statistics.median(times), 4)
    except torch.OutOfMemoryError:
        out.update(oom=True, peak_mb=None, time_s=None)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--batches", default=None, help="comma-separated global batch sizes (default 4096,16384; plus 65536 on CUDA)"
    )
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--chunk", type=int, default=1024, help="chunk_size of the chunked runs")
    ap.add_argument("--losses", default="clip,siglip")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float64"])
    ap.add_argument("--repeats", type=int, default=None, help="timed steps (default 3 on CUDA, 1 on CPU)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "loss_memory.json")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return

    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    batches = (
        [int(x) for x in args.batches.split(",")]
        if args.batches
        else ([4096, 16384, 65536] if device == "cuda" else [4096, 16384])
    )
    repeats = args.repeats or (3 if device == "cuda" else 1)
    rows = []
    print(f"{'loss':7} {'batch':>6} {'chunk':>6} {'peak MB':>9} {'time s':>8} {'BxB MB':>8}", flush=True)
    for batch in batches:
        for loss in args.losses.split(","):
            for chunk in (None, args.chunk):
                cfg = {
                    "loss": loss,
                    "batch": batch,
                    "dim": args.dim,
                    "chunk": chunk,
                    "device": device,
                    "dtype": args.dtype,
                    "repeats": repeats,
                }
                proc = subprocess.run(
                    [sys.executable, __file__, "--child", json.dumps(cfg)], capture_output=True, text=True, check=False
                )
                if proc.returncode != 0:
                    row = {
                        **cfg,
                        "error": proc.stderr.strip().splitlines()[-1]
                        if proc.stderr.strip()
                        else f"exit {proc.returncode}",
                    }
                else:
                    row = json.loads(proc.stdout.strip().splitlines()[-1])
                rows.append(row)
                peak = "OOM" if row.get("oom") else row.get("peak_mb", "err")
                print(
                    f"{loss:7} {batch:>6} {chunk or '-':>6} {peak!s:>9} {row.get('time_s')!s:>8} "
                    f"{row.get('bxb_matrix_mb', '')!s:>8}",
                    flush=True,
                )
    meta = {
        "device": device,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
        "repeats": repeats,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
