"""3D image towers at equal wall-clock: each trains stage 2 for the same number of seconds, then is evaluated.

    python benchmarks/bench_towers.py [--style 0] [--n 500] [--budget-s 300] [--keep DIR]
        [--towers resnet3d,resnet3d_bf16,resnet3d_cl,resnet3d_max,slices,vit3d,swin3d] [--mode align|supervised|both]

The CT cohort of the style (0 = the built-in one, others `medvlp cohort synth --kind ct --style`) is made once. For
each tower a short timing run (`--probe-steps` stage-2 steps, stage 1 off) measures its training samples/s on this
machine; the real run then gets `budget_s * samples_per_s / batch_size` stage-2 steps of configs/demo-3d.yaml (its
warm-up and validation scaled to the step count), so every tower spends about the same seconds learning. Per tower:
samples/s, steps, training seconds, zero-shot AUROC per finding, linear probe AUROC, image-to-report R@10, grounding
CNR. With --mode supervised (or both), each tower also trains *with the finding labels* for the same seconds (a
linear head, binary cross-entropy): a yardstick for what zero-shot can reach with the tower at this budget. Writes
benchmarks/results/towers-ct.json after every tower.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from machine import machine

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_ablation import mean_intensity, prepare, row_of  # noqa: E402

#: Tower name -> config overrides on top of configs/demo-3d.yaml.
#: The ResNet rows pin the demo's spot statistics off (`blobs`, on in the demo since they were measured): the tower
#: alone, as these rows were measured; `resnet3d_blobs` is the demo's tower with them.
NO_BLOBS = "model.image_encoder_args.blobs=false"
TOWERS: dict[str, list[str]] = {
    "resnet3d": [NO_BLOBS],  # the demo's narrow MONAI ResNet-10
    "resnet3d_blobs": ["model.image_encoder_args.blobs=true"],
    # ... and the spot margins also as maps into its stem (`spot_maps`): can the tower learn where a spot counts?
    "resnet3d_spots": ["model.image_encoder_args.blobs=true", "model.image_encoder_args.spot_maps=true"],
    "resnet3d_bf16": [NO_BLOBS, "stages.stage2-align.precision=bf16"],
    "resnet3d_cl": [
        NO_BLOBS,
        "stages.stage2-align.channels_last=true",
    ],  # kernels and volumes in channels_last_3d order
    "resnet3d_max": [NO_BLOBS, "model.image_encoder_args.global_pool=max"],  # the maximum over the tokens
    # the SwinUNETR encoder, narrow (feature size 12) with 4-voxel windows: 2 x 2 x 1 tokens at 64 x 64 x 32
    "swin3d": ["model.image_encoder=monai_swin", "model.image_encoder_args={feature_size: 12, window_size: 4}"],
    "slices": ["model.image_encoder=resnet10t_slices", "model.image_encoder_args={}"],
    "vit3d": [
        "model.image_encoder=monai_vit",
        "model.image_encoder_args={patch_size: [16, 16, 8], hidden_size: 192, mlp_dim: 768, num_layers: 6, "
        "num_heads: 4}",
    ],
}


def samples_per_s(config: Path, overrides: list[str], yaml_path: Path, cache: Path, out: Path, steps: int) -> float:
    """Training samples/s of stage 2 over a short run (the loop's own measure, validation excluded)."""
    from medvlp.config import load_config
    from medvlp.train.run import train

    probe = [
        *overrides,
        "stages.stage1-text.enabled=false",
        f"stages.stage2-align.steps={steps}",
        "stages.stage2-align.warmup_steps=0",
        "stages.stage2-align.val_every=null",
        f"stages.stage2-align.log_every={max(1, steps // 2)}",
    ]
    train(load_config(config, ["seed=0", *probe]), yaml_path, out, cache_dir=cache, resume=True)
    logged = [json.loads(x) for x in (out / "stage2-align" / "log.jsonl").read_text().splitlines()]
    rates = [r["samples_per_s"] for r in logged if "samples_per_s" in r]
    return float(rates[-1])  # the last window: past the first step's warm-up


def run_tower(
    name: str, config: Path, yaml_path: Path, cache: Path, work: Path, budget_s: float, probe_steps: int
) -> dict[str, Any]:
    from medvlp.config import load_config
    from medvlp.evaluate import evaluate
    from medvlp.train.run import train

    overrides = TOWERS[name]
    rate = samples_per_s(config, overrides, yaml_path, cache, work / "probe", probe_steps)
    batch = load_config(config, overrides).stages.stage2_align.batch_size
    steps = max(10, round(budget_s * rate / batch))
    full = [
        *overrides,
        f"stages.stage2-align.steps={steps}",
        f"stages.stage2-align.warmup_steps={max(1, steps // 10)}",
        f"stages.stage2-align.val_every={max(1, steps // 3)}",
        f"stages.stage2-align.checkpoint_every={max(1, steps // 3)}",
    ]
    t0 = time.perf_counter()
    train(load_config(config, ["seed=0", *full]), yaml_path, work / "run", cache_dir=cache, resume=True)
    train_s = round(time.perf_counter() - t0, 1)
    metrics = evaluate(work / "run", yaml_path, work / "card", baselines=False, cache_dir=cache)
    return {"overrides": overrides, "samples_per_s": rate, "steps": steps, "train_s": train_s, **row_of(metrics)}


def supervised_ceiling(name: str, config: Path, cache_dir: Path, budget_s: float) -> dict[str, Any]:
    """What the tower learns *with the labels* in the same seconds: the tower and a linear head trained with binary
    cross-entropy on train's finding labels (uncertain and unknown left out), the config's batch size, learning rate,
    augmentation and seed, for ``budget_s`` seconds; per-finding AUROC on train, val and test (nothing is chosen on
    val or test), and the AUROC of each image's mean intensity per finding, a shortcut such a tower may fit.
    A yardstick, not a bound: the tower learns the findings most directly this way, so zero-shot far below it points
    at the alignment, and zero-shot near it at the image tower's limit."""
    import numpy as np
    import torch
    from torch.utils.data import DataLoader

    from medvlp.config import load_config
    from medvlp.data.cache import CachedCohort
    from medvlp.models.registry import create_image_encoder
    from medvlp.tasks.zeroshot import classification_metrics
    from medvlp.train.data import CachedImages, collate

    cfg = load_config(config, ["seed=0", *TOWERS[name]])
    align, cache = cfg.stages.stage2_align, CachedCohort.open(cache_dir)
    torch.manual_seed(cfg.seed)
    size = tuple(cache.summary["preprocess"]["size"])
    encoder, encoder_args = cfg.model["image_encoder"], cfg.model.get("image_encoder_args") or {}
    tower = create_image_encoder(encoder, cache.spatial_dims, size, **encoder_args)
    head = torch.nn.Linear(tower.embed_dim, len(cache.findings))
    params = [*tower.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=align.lr, weight_decay=align.weight_decay)
    train = CachedImages(cache, "train", views=1 if cfg.data.augment else 0, seed=cfg.seed)
    loader = DataLoader(train, batch_size=align.batch_size, shuffle=True, drop_last=True, collate_fn=collate)
    steps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < budget_s:
        for batch in loader:
            y = batch["labels"]
            known = (y >= 0).float()  # 1 / 0 only: uncertain (-1) and unknown (-2) are left out
            logits = head(tower(batch["image"]).embedding)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, (y == 1).float(), weight=known)
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
            if time.perf_counter() - t0 >= budget_s:
                break
    train_s = round(time.perf_counter() - t0, 1)
    tower.eval()
    out: dict[str, Any] = {"steps": steps, "train_s": train_s, "batch_size": align.batch_size}
    for split in ("train", "val", "test"):  # train: how far it fits what it was shown (memorizing, when far above val)
        data = CachedImages(cache, split, views=0)
        probs, labels = [], []
        with torch.no_grad():
            for batch in DataLoader(data, batch_size=32, collate_fn=collate):
                probs.append(torch.sigmoid(head(tower(batch["image"]).embedding)).numpy())
                labels.append(batch["labels"].numpy())
        y = np.where(np.concatenate(labels) < -1, np.nan, np.concatenate(labels))
        m = classification_metrics(y, np.concatenate(probs), cache.findings)
        out[f"{split}_auroc"] = m["mean_auroc"]
        out[f"{split}_per_finding"] = {f: v["auroc"] for f, v in m["per_finding"].items()}
        # a shortcut a tower that does not see the lesions can fit instead: the image's mean intensity (body size and
        # fluid), scored as if it were the finding; where its sign differs between splits, such a tower goes below 0.5
        mean = np.repeat(mean_intensity(cache, data.records["study"])[:, None], len(cache.findings), axis=1)
        shortcut = classification_metrics(y, mean, cache.findings)["per_finding"]
        out[f"{split}_mean_intensity_auroc"] = {f: v["auroc"] for f, v in shortcut.items()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--style", type=int, default=0)
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--budget-s", type=float, default=300.0, help="stage-2 training seconds per tower")
    ap.add_argument("--probe-steps", type=int, default=6)
    ap.add_argument("--towers", default=",".join(TOWERS), help=f"comma-separated, of {', '.join(TOWERS)}")
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "demo-3d.yaml")
    ap.add_argument("--keep", type=Path)
    ap.add_argument(
        "--mode",
        default="align",
        choices=["align", "supervised", "both"],
        help="stage 2 at equal seconds (align), the tower trained with the labels for the same seconds, or both",
    )
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "towers-ct.json")
    args = ap.parse_args()
    towers = [t for t in args.towers.split(",") if t.strip()]
    if not towers or any(t not in TOWERS for t in towers):
        ap.error(f"--towers must name some of {', '.join(TOWERS)}, got {args.towers!r}")
    rows: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        base = args.keep or Path(tmp)
        yaml_path, cache, _ = prepare("ct", args.style, args.n, base / f"style{args.style}")
        for name in towers:
            rows[name] = {}
            if args.mode != "supervised":
                work = base / name
                rows[name] = run_tower(name, args.config, yaml_path, cache, work, args.budget_s, args.probe_steps)
            if args.mode != "align":
                rows[name]["supervised"] = supervised_ceiling(name, args.config, cache, args.budget_s)
            print(name, json.dumps(rows[name]), flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(
                json.dumps(
                    {
                        "benchmark": f"bench_towers --style {args.style} --n {args.n} --budget-s {args.budget_s} "
                        f"--towers {args.towers} --mode {args.mode}",
                        "machine": machine(),
                        "complete": len(rows) == len(towers),
                        "towers": rows,
                    },
                    indent=2,
                )
                + "\n"
            )
    for name, r in rows.items():
        if "samples_per_s" not in r:
            sup = r["supervised"]
            print(f"{name:14s} supervised: val {sup['val_auroc']:.3f}  test {sup['test_auroc']:.3f}")
            continue
        print(
            f"{name:14s} {r['samples_per_s']:6.1f} samples/s {r['steps']:4d} steps  zero-shot {r['zero_shot_auroc']}  "
            f"probe {r['linear_probe_auroc']}  R@10 {r['retrieval_i2r_R@10']}  CNR {r['grounding_cnr']}"
            + (f"  supervised test {r['supervised']['test_auroc']:.3f}" if "supervised" in r else "")
        )


if __name__ == "__main__":
    main()
