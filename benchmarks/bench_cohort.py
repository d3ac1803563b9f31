"""Cohort build throughput and cached-read throughput against MONAI's plain LoadImage pipeline.

    python benchmarks/bench_cohort.py [--n2d 200] [--n3d 60] [--workers 2] [--out benchmarks/results/cohort.json]

For each of a 2D (radiograph) and a 3D (CT series) synthetic cohort it measures:
- build: `build_cohort` from DICOM to cache, studies/s (fresh cache, all workers);
- cached read: one pass over every cached study (memory-mapped .npy -> torch tensor), studies/s;
- MONAI: the same preprocessing done the usual way, `LoadImage` (PydicomReader) + transforms per study,
  studies/s, one process, i.e. what a training loop without a cache pays every epoch.
Prints and writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from machine import machine


def _monai_pipeline(spatial_dims: int, pp: dict):
    from monai.transforms import (
        Compose,
        EnsureChannelFirst,
        LoadImage,
        Orientation,
        Resize,
        ResizeWithPadOrCrop,
        ScaleIntensityRange,
        ScaleIntensityRangePercentiles,
        Spacing,
    )

    steps = [LoadImage(reader="PydicomReader", image_only=True), EnsureChannelFirst()]
    if spatial_dims == 3:
        steps += [Orientation(axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")))]
    if pp.get("spacing"):
        steps.append(Spacing(pixdim=pp["spacing"], mode="bilinear"))
    it = pp["intensity"]
    if it["mode"] == "window":
        lo, hi = it["center"] - it["width"] / 2, it["center"] + it["width"] / 2
        steps.append(ScaleIntensityRange(lo, hi, 0.0, 1.0, clip=True))
    else:
        steps.append(ScaleIntensityRangePercentiles(it["lower"], it["upper"], 0.0, 1.0, clip=True))
    steps.append(ResizeWithPadOrCrop(pp["size"]) if pp.get("spacing") else Resize(pp["size"]))
    return Compose(steps)


def _rate(n: int, seconds: float) -> float:
    return round(n / seconds, 2) if seconds > 0 else float("inf")


def bench(kind: str, n: int, workers: int, work: Path) -> dict:
    from medvlp.data.build import build_cohort
    from medvlp.data.cache import CachedCohort
    from medvlp.data.cohort import load_cohort
    from medvlp.data.synthetic import synthesize

    t = time.perf_counter()
    yaml_path = synthesize(kind, n, work / f"{kind}-src", seed=0)
    synth_s = time.perf_counter() - t

    t = time.perf_counter()
    s = build_cohort(yaml_path, work / f"{kind}-cache", workers=workers, progress=False)
    build_s = time.perf_counter() - t
    t = time.perf_counter()
    s2 = build_cohort(yaml_path, work / f"{kind}-cache", workers=workers, progress=False)
    rebuild_s = time.perf_counter() - t
    assert s2.reused == s.ingested

    cache = CachedCohort.open(work / f"{kind}-cache")
    studies = list(cache.records["study"])
    read_times = []
    for _ in range(3):
        t = time.perf_counter()
        for st in studies:
            x = torch.from_numpy(np.asarray(cache.load_image(st), dtype=np.float32))
        read_times.append(time.perf_counter() - t)
    read_s = min(read_times)

    cohort = load_cohort(yaml_path)
    pipe = _monai_pipeline(cohort.spec.spatial_dims, cache.summary["preprocess"])
    paths = [str(cohort.spec.resolve(p)) for p in cohort.manifest["image"]]
    torch.set_num_threads(1)
    t = time.perf_counter()
    for p in paths:
        x = pipe(p)
    monai_s = time.perf_counter() - t
    torch.set_num_threads(os.cpu_count() or 1)
    assert tuple(x.shape[1:]) == tuple(cache.summary["preprocess"]["size"])
    return {
        "kind": kind,
        "studies": n,
        "size": cache.summary["preprocess"]["size"],
        "synthesize_s": round(synth_s, 2),
        "build_s": round(build_s, 2),
        "build_studies_per_s": _rate(s.ingested, build_s),
        "rebuild_unchanged_s": round(rebuild_s, 2),
        "cached_read_studies_per_s": _rate(len(studies), read_s),
        "monai_loadimage_studies_per_s": _rate(len(paths), monai_s),
        "cached_read_speedup_vs_monai": round(monai_s / read_s, 1),
        "cache_mb": round(sum(f.stat().st_size for f in (work / f"{kind}-cache" / "images").iterdir()) / 2**20, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n2d", type=int, default=200)
    ap.add_argument("--n3d", type=int, default=60)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "cohort.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [bench("cxr", args.n2d, args.workers, Path(tmp)), bench("ct", args.n3d, args.workers, Path(tmp))]
    result = {
        "benchmark": "cohort build and cached read",
        "machine": machine(torch=torch.__version__),
        "workers": args.workers,
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
