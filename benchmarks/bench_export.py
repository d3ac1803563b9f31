"""CPU latency of scoring one study: onnxruntime (the ONNX export) against PyTorch, 2D and 3D.

    python benchmarks/bench_export.py [--repeats 50] [--threads 1] [--out benchmarks/results/export.json]

Models: the configs/tiny-2d.yaml and configs/tiny-3d.yaml architectures (weights untrained: they cost what trained
ones do), saved with their cohort record and exported with :func:`medvlp.export.export_onnx`. One study is one
preprocessed image ``[1, 1, *size]``; a timing covers the image tower and the probabilities of the model's findings
from the cached prompts: PyTorch with :class:`medvlp.serve.service.DiagnosisService`'s model and
:func:`medvlp.tasks.zeroshot.zero_shot_probabilities`, onnxruntime with
:class:`medvlp.hospital.onnx_scorer.OnnxScorer` (CPU provider). Reading and preprocessing the file are the same
for both and left out. Both engines use ``--threads`` CPU threads (default 1: on a shared machine more threads
measure the contention). Median and 90th percentile over ``--repeats`` calls after 5 warm-up calls, alternating
between the two engines. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
WARMUP = 5


def _model(kind: str, root: Path) -> Path:
    """The tiny config's architecture, untrained, saved as a model folder with its cohort record."""
    from medvlp.data.cohort import load_spec
    from medvlp.data.synthetic import synthesize
    from medvlp.models import MedVLP, ModelConfig
    from medvlp.serve.context import COHORT_RECORD

    config = yaml.safe_load((ROOT / "configs" / f"tiny-{'2d' if kind == 'cxr' else '3d'}.yaml").read_text())
    spec = load_spec(synthesize(kind, 20, root / kind, seed=3))
    torch.manual_seed(0)
    m = config["model"]
    cfg = ModelConfig(
        image_encoder=m["image_encoder"],
        spatial_dims=spec.spatial_dims,
        image_size=tuple(spec.preprocessing.size),
        text_num_layers=m["text_num_layers"],
        text_max_length=m["text_max_length"],
        embed_dim=m["embed_dim"],
    )
    folder = MedVLP(cfg).save_pretrained(root / f"model-{kind}")
    record = {
        "cohort": spec.name,
        "modality": spec.modality,
        "spatial_dims": spec.spatial_dims,
        "findings": list(spec.findings),
        "preprocess": spec.preprocessing.model_dump(mode="json"),
    }
    (folder / COHORT_RECORD).write_text(json.dumps(record))
    return folder


def _measure(kind: str, root: Path, repeats: int, threads: int) -> dict[str, Any]:
    from medvlp.export import export_onnx
    from medvlp.hospital.onnx_scorer import OnnxScorer
    from medvlp.serve.server import load_service
    from medvlp.tasks.zeroshot import zero_shot_probabilities

    service = load_service(_model(kind, root), device="cpu", corpus=False)
    folder = export_onnx(service, root / f"export-{kind}")
    scorer = OnnxScorer(folder, threads=threads)
    prompts = service.prompt_embeddings(service.findings)
    x = torch.rand(1, 1, *service.size)
    xn = x.numpy()

    def torch_call() -> np.ndarray:
        with torch.inference_mode():
            emb = service.model.forward_image(x).embedding
        return zero_shot_probabilities(emb, prompts, service.logit_scale)

    def ort_call() -> np.ndarray:
        return scorer.probabilities(xn)

    times: dict[str, list[float]] = {"pytorch": [], "onnxruntime": []}
    calls = {"pytorch": torch_call, "onnxruntime": ort_call}
    for k in range(WARMUP + repeats):
        for name in ("pytorch", "onnxruntime") if k % 2 == 0 else ("onnxruntime", "pytorch"):
            t0 = time.perf_counter()
            calls[name]()
            if k >= WARMUP:
                times[name].append((time.perf_counter() - t0) * 1000)
    diff = float(np.abs(torch_call() - ort_call()).max())
    row: dict[str, Any] = {"kind": "2D" if kind == "cxr" else "3D", "input": list(service.size)}
    row["max_abs_prob_diff"] = diff
    for name, t in times.items():
        row[name] = {"median_ms": round(float(np.median(t)), 3), "p90_ms": round(float(np.percentile(t, 90)), 3)}
    row["speedup"] = round(row["pytorch"]["median_ms"] / row["onnxruntime"]["median_ms"], 2)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for both engines")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "export.json")
    args = parser.parse_args()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        torch.set_num_threads(args.threads)
        rows = [_measure(kind, Path(tmp), args.repeats, args.threads) for kind in ("cxr", "ct")]
    result = {
        "benchmark": "export",
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
        },
        "repeats": args.repeats,
        "threads": args.threads,
        "rows": rows,
    }
    print(f"{'kind':<5} {'input':<14} {'pytorch ms':>11} {'onnxrt ms':>10} {'speedup':>8} {'max |dp|':>9}")
    for r in rows:
        print(
            f"{r['kind']:<5} {'x'.join(map(str, r['input'])):<14} {r['pytorch']['median_ms']:>11.2f} "
            f"{r['onnxruntime']['median_ms']:>10.2f} {r['speedup']:>8.2f} {r['max_abs_prob_diff']:>9.1e}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
