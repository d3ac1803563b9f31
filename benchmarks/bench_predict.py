"""Throughput of `medvlp predict` (studies/s), 2D and 3D, with models trained here from configs/tiny-*.yaml.

    python benchmarks/bench_predict.py [--n2d 200] [--n3d 24] [--out benchmarks/results/predict.json]

Per kind: a synthetic cohort is written and a tiny model trained on it (configs/tiny-2d.yaml on 40 radiographs,
configs/tiny-3d.yaml on 24 CT series), then a second synthetic cohort of `--n2d` / `--n3d` studies is scored with
:func:`medvlp.predict.predict` (the code behind `medvlp predict`; the model is loaded once, outside the timing), at
batch sizes 1 and 8, and (2D) with a DICOM SR per study. Every timing starts from an empty output folder: reading,
preprocessing, the forward pass and writing the outputs are all counted. CPU only, the machine's default threads;
the load average is recorded. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]


def _train(kind: str, root: Path) -> Path:
    from medvlp.config import load_config
    from medvlp.data.synthetic import synthesize
    from medvlp.train.run import train

    n, config = (40, "tiny-2d") if kind == "cxr" else (24, "tiny-3d")
    cohort = synthesize(kind, n, root / f"train-{kind}", seed=11)
    train(load_config(ROOT / "configs" / f"{config}.yaml", ["device=cpu"]), cohort, root / f"run-{kind}")
    return root / f"run-{kind}"


def _score(run: Path, cohort: Path, root: Path, batch_size: int, sr: bool) -> dict[str, Any]:
    from medvlp.predict import find_studies, predict
    from medvlp.serve.server import load_service

    service = load_service(run, device="cpu", corpus=False)
    out = root / "out"
    shutil.rmtree(out, ignore_errors=True)
    studies = find_studies(cohort=cohort, split=None, out=out)
    t0 = time.perf_counter()
    summary = predict(service, studies, out, sr=sr, batch_size=batch_size, progress=False)
    seconds = time.perf_counter() - t0
    return {
        "batch_size": batch_size,
        "sr": sr,
        "studies": len(studies),
        "quarantined": summary.quarantined,
        "seconds": round(seconds, 3),
        "studies_per_s": round(len(studies) / seconds, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n2d", type=int, default=200)
    parser.add_argument("--n3d", type=int, default=24)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "predict.json")
    args = parser.parse_args()
    from medvlp.data.synthetic import synthesize

    rows: list[dict[str, Any]] = []
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-predict-") as tmp:
        root = Path(tmp)
        for kind, n in (("cxr", args.n2d), ("ct", args.n3d)):
            run = _train(kind, root)
            cohort = synthesize(kind, n, root / f"score-{kind}", seed=5)
            for batch_size, sr in [(1, False), (8, False)] + ([(8, True)] if kind == "cxr" else []):
                row = {"kind": "2D" if kind == "cxr" else "3D", **_score(run, cohort, root, batch_size, sr)}
                rows.append(row)
    result = {
        "benchmark": "predict",
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
        },
        "rows": rows,
    }
    print(f"{'kind':<5} {'batch':>5} {'sr':>5} {'studies':>8} {'seconds':>8} {'studies/s':>10}")
    for r in rows:
        print(
            f"{r['kind']:<5} {r['batch_size']:>5} {r['sr']!s:>5} {r['studies']:>8} {r['seconds']:>8.2f} "
            f"{r['studies_per_s']:>10.2f}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
