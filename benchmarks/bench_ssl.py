"""Which self-supervised method for stage1-image? A linear probe on frozen embeddings decides.

    python benchmarks/bench_ssl.py [--n 500] [--steps 100] [--encoder timm/resnet10t] [--kind cxr]

For each method (none = random init, simmim, simclr) it pretrains the same encoder for the same number
of steps and batch on the training split of a synthetic cohort, then fits a logistic regression per
finding on the frozen global embeddings of the training split and reports the test AUROC (mean over
findings), plus the wall time of the pretraining. Prints and writes benchmarks/results/ssl.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from machine import machine
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler


@torch.no_grad()
def embed(encoder: torch.nn.Module, cache, split: str) -> tuple[np.ndarray, np.ndarray]:
    from medvlp.train.data import CachedImages

    ds = CachedImages(cache, split, views=0)
    encoder.eval()
    feats = []
    for i in range(0, len(ds), 64):
        x = torch.stack([ds.image(j) for j in range(i, min(i + 64, len(ds)))])
        feats.append(encoder(x).embedding)
    return torch.cat(feats).numpy(), ds.labels.numpy()


def probe(train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray], findings: list[str]) -> dict:
    scaler = StandardScaler().fit(train[0])
    xtr, xte = scaler.transform(train[0]), scaler.transform(test[0])
    out = {}
    for f, name in enumerate(findings):
        mtr, mte = train[1][:, f] >= 0, test[1][:, f] >= 0
        ytr, yte = train[1][mtr, f] == 1, test[1][mte, f] == 1
        if ytr.all() or not ytr.any() or yte.all() or not yte.any():
            continue
        clf = LogisticRegression(C=0.1, max_iter=2000, class_weight="balanced").fit(xtr[mtr], ytr)
        out[name] = round(float(roc_auc_score(yte, clf.decision_function(xte[mte]))), 4)
    out["mean"] = round(float(np.mean(list(out.values()))), 4)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kind", default="cxr")
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--encoder", default="timm/resnet10t")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "ssl.json")
    args = ap.parse_args()

    from medvlp.config import ImageStageConfig
    from medvlp.data.build import build_cohort
    from medvlp.data.cache import CachedCohort
    from medvlp.data.synthetic import synthesize
    from medvlp.models import create_image_encoder
    from medvlp.train.loop import run_stage
    from medvlp.train.runtime import init_runtime, seed_everything
    from medvlp.train.stages.image import ImageStage

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        build_cohort(synthesize(args.kind, args.n, tmp_path / "src", seed=0), tmp_path / "cache", progress=False)
        cache = CachedCohort.open(tmp_path / "cache")
        size = tuple(cache.summary["preprocess"]["size"])
        rt = init_runtime("auto")
        for method in ("none", "simmim", "simclr"):
            seed_everything(0)
            enc = create_image_encoder(args.encoder, cache.spatial_dims, size)
            t = time.perf_counter()
            if method != "none":
                cfg = ImageStageConfig(
                    method=method,
                    steps=args.steps,
                    batch_size=args.batch,
                    lr=2e-3,
                    warmup_steps=10,
                    mask_patch=16 if cache.spatial_dims == 2 else 8,
                    checkpoint_every=10**6,
                )
                run_stage(ImageStage(cfg, cache, enc, seed=0), tmp_path / method, rt, seed=0)
            seconds = time.perf_counter() - t
            enc = enc.cpu()
            result = probe(embed(enc, cache, "train"), embed(enc, cache, "test"), cache.findings)
            rows[method] = {"probe_auroc": result, "pretrain_s": round(seconds, 1)}
            print(method, rows[method], flush=True)
    out = {
        "benchmark": "stage1-image method: linear probe AUROC on frozen embeddings (test split)",
        "machine": machine(torch=torch.__version__),
        "args": {k: str(v) for k, v in vars(args).items()},
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
