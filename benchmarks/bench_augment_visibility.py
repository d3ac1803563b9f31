"""Does the training augmentation erase the small CT lesions? The visibility statistics on augmented volumes.

    python benchmarks/bench_augment_visibility.py [--styles 0,1,2] [--n 500] [--keep DIR]

The statistics of :mod:`bench_visibility` (a dense dot, a bright blob, a dark blob; nothing fitted) scored as if
they were the finding on the training split of each style's cache, once as cached (what the model is scored on)
and once through the demo's training augmentation (:func:`medvlp.train.data.augmentation`, one seeded draw per
series) with each affine resampling of ``data.augment_interpolation``, and through the affine alone (applied to
every series) in both modes. A statistic whose AUROC falls under the augmentation sees a lesion that training
samples hold more faintly than test images. Writes benchmarks/results/augment-visibility-ct.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from machine import machine

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_ablation import prepare  # noqa: E402
from bench_visibility import load_splits, visibility  # noqa: E402


def variants() -> dict[str, Any]:
    """The augmentations compared, by name: the demo's in both resamplings, and the affine alone in both."""
    from monai.transforms import RandAffine

    from medvlp.train.data import INTERPOLATIONS, augmentation

    out: dict[str, Any] = {f"demo_{mode}": augmentation(3, interpolation=mode) for mode in INTERPOLATIONS}
    for mode in INTERPOLATIONS:  # the demo's affine alone, applied to every series
        (affine,) = [t for t in augmentation(3, interpolation=mode).transforms if isinstance(t, RandAffine)]
        affine.prob = 1.0
        out[f"affine_{mode}"] = affine
    return out


def augmented(volumes: np.ndarray, transform: Any, seed: int = 0) -> np.ndarray:
    """``volumes`` ``[N, 1, *grid]`` through ``transform``, one draw each, seeded by ``seed`` and the series."""
    import torch

    out = []
    for i, v in enumerate(volumes):
        transform.set_random_state(seed=seed + i)
        out.append(np.asarray(torch.as_tensor(transform(torch.as_tensor(v)))).clip(0, 1))
    return np.stack(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--styles", default="0,1,2")
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--keep", type=Path, default=None, help="cohorts and caches here (reused), as bench_ablation")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "augment-visibility-ct.json")
    args = ap.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="medvlp-augvis-"))
    result: dict[str, Any] = {"benchmark": "bench_augment_visibility", "machine": machine(), "styles": {}}
    for style in (int(s) for s in args.styles.split(",")):
        _, cache, _ = prepare("ct", style, args.n, work / f"style{style}")
        findings, splits = load_splits(cache)
        volumes, labels = splits["train"]
        rows = {"cached": visibility(findings, {"train": (volumes, labels)})["train"]}
        for name, transform in variants().items():
            rows[name] = visibility(findings, {"train": (augmented(volumes, transform), labels)})["train"]
        result["styles"][str(style)] = rows
        for name, row in rows.items():
            print(style, name, {k: v for k, v in row.items() if k != "n"})
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
