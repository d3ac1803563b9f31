"""Exact top-k search over a large embedding database, and the memory/time of `retrieval_metrics`.

    python benchmarks/bench_retrieval.py [--db 1000000] [--dim 256] [--queries 1000] [--k 10]
        [--metric-sizes 10000,100000] [--out benchmarks/results/retrieval.json]

Part 1 (one subprocess): a database of `--db` random L2-normalized float32 embeddings and `--queries` random
normalized queries, searched for the top `--k` inner products by
- faiss `IndexFlatIP` (when faiss is installed),
- `EmbeddingIndex(use_faiss=False)`: torch matmul + top-k in blocks of 1024 queries x 65536 database rows,
- naive: one full `[Q, N]` score matrix and `topk` (only when MemAvailable holds 2x the matrix).
Times are wall-clock seconds for the whole query batch (after building the index; build time reported apart).
`recall@k` agreement is the mean overlap of each method's top-k id set with the reference (naive, else faiss).

Part 2 (one subprocess per N): `retrieval_metrics` on N random pairs (text = image + 8 x unit noise, E = `--dim`) with
5 binary labels (so precision@K runs too): wall time and peak RSS (`ru_maxrss`), absolute and above the RSS
right before the call (the inputs already resident).

Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MB = 1024**2


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def _normal(n: int, dim: int, seed: int) -> Any:
    import torch

    gen = torch.Generator().manual_seed(seed)
    out = torch.empty(n, dim)
    for s in range(0, n, 65536):  # normalize in place chunk by chunk: one copy of the data in memory
        block = torch.randn(min(65536, n - s), dim, generator=gen)
        out[s : s + len(block)] = torch.nn.functional.normalize(block, dim=1)
    return out


def search_child(cfg: dict[str, Any]) -> dict[str, Any]:
    import numpy as np
    import torch

    sys.path.insert(0, str(ROOT))
    from medvlp.tasks.retrieval import HAVE_FAISS, EmbeddingIndex

    n, dim, nq, k = cfg["db"], cfg["dim"], cfg["queries"], cfg["k"]
    t0 = time.perf_counter()
    db = _normal(n, dim, 0)  # [N, E]
    q = _normal(nq, dim, 1)  # [Q, E]
    out: dict[str, Any] = {"generate_s": time.perf_counter() - t0, "methods": {}}
    ids: dict[str, np.ndarray] = {}

    if HAVE_FAISS:
        t0 = time.perf_counter()
        index = EmbeddingIndex(dim, use_faiss=True)
        index.add(db.numpy())
        build = time.perf_counter() - t0
        t0 = time.perf_counter()
        _, ids["faiss"] = index.search(q, k)
        out["methods"]["faiss"] = {"build_s": build, "search_s": time.perf_counter() - t0}
        del index

    t0 = time.perf_counter()
    index = EmbeddingIndex(dim, use_faiss=False)
    index.add(db.numpy())  # shares the float32 buffer
    build = time.perf_counter() - t0
    t0 = time.perf_counter()
    _, ids["torch_blocked"] = index.search(q, k)
    out["methods"]["torch_blocked"] = {"build_s": build, "search_s": time.perf_counter() - t0}
    del index

    matrix = nq * n * 4
    if _mem_available() > 2 * matrix:
        with torch.no_grad():
            t0 = time.perf_counter()
            scores = q @ db.T  # [Q, N]
            ids["naive"] = scores.topk(k, dim=1).indices.numpy()
            out["methods"]["naive"] = {"build_s": 0.0, "search_s": time.perf_counter() - t0}
            del scores
    else:
        out["naive_skipped"] = f"a {matrix / MB:.0f} MiB score matrix does not fit twice in MemAvailable"
    ref = "naive" if "naive" in ids else "faiss" if "faiss" in ids else "torch_blocked"
    out["reference"] = ref
    for name, got in ids.items():
        overlap = [len(set(a.tolist()) & set(b.tolist())) / k for a, b in zip(got, ids[ref], strict=True)]
        out["methods"][name]["recall_at_k_vs_ref"] = float(np.mean(overlap))
        out["methods"][name]["ms_per_query"] = 1000 * out["methods"][name]["search_s"] / nq
    out["peak_rss_mb"] = _maxrss() / MB
    return out


def metrics_child(cfg: dict[str, Any]) -> dict[str, Any]:
    import numpy as np
    import torch

    sys.path.insert(0, str(ROOT))
    from medvlp.tasks.retrieval import retrieval_metrics

    n, dim = cfg["n"], cfg["dim"]
    img = _normal(n, dim, 2)
    txt = img + 8.0 * _normal(n, dim, 3)  # noisy pairs: R@K well below 1
    labels = np.random.default_rng(0).integers(0, 2, size=(n, 5)).astype(float)
    retrieval_metrics(img[:256], txt[:256], labels=labels[:256])  # warm-up: lazy initialisation not counted
    before, floor = _rss(), _maxrss()
    t0 = time.perf_counter()
    res = retrieval_metrics(img, txt, labels=labels)
    seconds = time.perf_counter() - t0
    peak = _maxrss()
    return {
        "n": n,
        "dim": dim,
        "seconds": seconds,
        "peak_rss_mb": peak / MB,
        "peak_above_inputs_mb": (peak - before) / MB,
        "rss_floor_mb": (floor - before) / MB,
        "nxn_matrix_mb": n * n * 4 / MB,
        "threads": torch.get_num_threads(),
        "image_to_report": res["image_to_report"],
        "report_to_image": res["report_to_image"],
    }


def _run_child(kind: str, cfg: dict[str, Any]) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", kind, json.dumps(cfg)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"rc {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--db", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--metric-sizes", default="10000,100000")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "retrieval.json"))
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, cfg = args.child[0], json.loads(args.child[1])
        result = search_child(cfg) if kind == "search" else metrics_child(cfg)
        sys.stdout.write(json.dumps(result) + "\n")
        return

    started = time.perf_counter()
    search = _run_child("search", {"db": args.db, "dim": args.dim, "queries": args.queries, "k": args.k})
    print(f"top-{args.k} search: {args.queries} queries over {args.db:,} x {args.dim} embeddings")
    if "error" in search:
        print(f"  failed: {search['error']}")
    else:
        agreement = f"recall@k vs {search['reference']}"
        print(f"  {'method':<14} {'build s':>8} {'search s':>9} {'ms/query':>9} {agreement:>20}")
        for name, m in search["methods"].items():
            print(
                f"  {name:<14} {m['build_s']:8.2f} {m['search_s']:9.2f} {m['ms_per_query']:9.3f}"
                f" {m['recall_at_k_vs_ref']:20.4f}"
            )
        if "naive_skipped" in search:
            print(f"  naive: skipped ({search['naive_skipped']})")
        print(f"  peak RSS {search['peak_rss_mb']:.0f} MiB")

    metrics = []
    print("retrieval_metrics (both directions, labels for precision@K)")
    print(f"  {'N':>8} {'seconds':>8} {'peak RSS MiB':>13} {'above inputs':>13} {'N x N would be':>15} {'i2r R@1':>8}")
    for n in (int(s) for s in args.metric_sizes.split(",") if s):
        m = _run_child("metrics", {"n": n, "dim": args.dim})
        metrics.append(m)
        if "error" in m:
            print(f"  {n:>8} failed: {m['error']}")
            continue
        print(
            f"  {n:>8} {m['seconds']:8.2f} {m['peak_rss_mb']:13.0f} {m['peak_above_inputs_mb']:13.0f}"
            f" {m['nxn_matrix_mb']:15.0f} {m['image_to_report']['R@1']:8.4f}"
        )

    import torch

    result = {
        "benchmark": "retrieval",
        "config": {"db": args.db, "dim": args.dim, "queries": args.queries, "k": args.k},
        "search": search,
        "retrieval_metrics": metrics,
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "machine": platform.machine(),
        },
        "total_seconds": time.perf_counter() - started,
    }
    try:
        import faiss

        result["environment"]["faiss"] = faiss.__version__
    except ImportError:
        result["environment"]["faiss"] = None
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"total {result['total_seconds']:.0f} s; wrote {out}")


if __name__ == "__main__":
    main()
