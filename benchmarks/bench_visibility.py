"""Are the CT findings in the cached voxels? Three hand-made image statistics, scored as if they were the finding.

    python benchmarks/bench_visibility.py [--styles 0,1,2] [--n 500] [--keep DIR [--runs ARM,...]]

A yardstick for the 3D issue, not a method: before asking why a tower does not learn a lesion, ask whether the
preprocessed volume (the demo's 64 x 64 x 32 at 6 x 6 x 8 mm, abdominal window) still holds it. Each statistic is one
number per series, computed from the cached array alone (no labels, no boxes, nothing fitted), on fixed voxel
neighbourhoods and fixed window fractions; the per-finding AUROC of that number against the finding's labels (the
project's :func:`~medvlp.tasks.zeroshot.classification_metrics`, ties against) says how much of the finding a
trivial detector sees. The neighbourhoods and fractions were chosen by looking at the built-in style (0), so on
style 0 the figures are an upper estimate; styles 1 and 2 (other spacing, contrast and sizes, resampled to the same
grid) were not looked at before they ran.

- ``bright_spot``: the largest margin by which a voxel exceeds every voxel 2 to 3 voxels away (a dense dot in
  soft tissue: a calcification; bone and the table are wider than the ring and do not count);
- ``bright_blob``: the brightest 3 x 3 x 2 mean among voxels with no bone within 3 voxels (an enhancing mass is
  brighter than any organ but darker than bone);
- ``dark_blob``: the deepest 3 x 3 x 2 mean below its 9 x 9 x 5 surroundings where those are parenchyma (a
  hypodense lesion in liver or spleen).

Per style and split, the AUROC of each statistic for each finding, and the linear-probe and zero-shot AUROC of the
demo's model on the same cohort where a bench_ablation result holds them. Beside them, ``blob_probe``: the project's
linear probe (fitted on train, scored on test: labels are read, so a yardstick of what the statistics hold, not a
detector) on the fixed spot statistics of :mod:`medvlp.models.blobs` alone: the margins, the margins with the
levels, the contrasts to noise, and the margins with the contrasts. With ``--runs``, ``head_parts``: how
bench_ablation's trained models (kept under the same DIR) carry the statistics in their embeddings. Writes
benchmarks/results/visibility-ct.json.
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

BONE = 0.92  # window fraction: above it, bone or the table (the abdominal window clips them at 1)
PARENCHYMA = (0.5, 0.6)  # window fraction of liver and spleen in the abdominal window (about 40 to 80 HU)
AIR = 0.3  # below it within 2 voxels, a border with fat or gas, not parenchyma


def statistics(volume: np.ndarray) -> dict[str, float]:
    """The three statistics of one cached volume ``[X, Y, Z]`` in [0, 1]."""
    from scipy.ndimage import maximum_filter, minimum_filter, uniform_filter

    v = volume.astype(np.float32)
    ring = np.ones((7, 7, 5), bool)
    ring[2:5, 2:5, 1:4] = False  # 2 to 3 voxels away in-plane, 2 across slices
    local = uniform_filter(v, (3, 3, 2))
    around = uniform_filter(v, (9, 9, 5))
    soft = maximum_filter(v, (7, 7, 5)) < BONE
    organ = (around > PARENCHYMA[0]) & (around < PARENCHYMA[1]) & (minimum_filter(v, (5, 5, 3)) > AIR)
    return {
        "bright_spot": float((v - maximum_filter(v, footprint=ring)).max()),
        "bright_blob": float(np.where(soft, local, 0.0).max()),
        "dark_blob": float(np.where(organ, around - local, 0.0).max()),
    }


def load_splits(cache_dir: Path) -> tuple[list[str], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """The cache's findings and, per split (train, test), its volumes ``[N, 1, *grid]`` and labels ``[N, F]``."""
    from medvlp.data.cache import CachedCohort

    cache = CachedCohort.open(cache_dir)
    splits = {}
    for split in ("train", "test"):
        records = cache.split(split)
        volumes = np.stack([np.asarray(cache.load_image(s)) for s in records["study"]])
        labels = records[cache.findings].to_numpy(dtype=np.float64)
        labels[labels < -1] = np.nan  # unknown; uncertain (-1) is left out by the metrics
        splits[split] = (volumes, labels)
    return list(cache.findings), splits


def visibility(findings: list[str], splits: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, Any]:
    """Per split, the AUROC of each statistic for each finding of the cache."""
    from medvlp.tasks.zeroshot import classification_metrics

    out: dict[str, Any] = {}
    for split, (volumes, labels) in splits.items():
        stats = [statistics(v[0]) for v in volumes]
        out[split] = {"n": len(volumes)}
        for name in stats[0]:
            score = np.repeat(np.array([s[name] for s in stats])[:, None], len(findings), axis=1)
            per = classification_metrics(labels, score, findings)["per_finding"]
            out[split][name] = {f: round(m["auroc"], 3) for f, m in per.items()}
    return out


BLOB_KINDS_PROBED = (("margins",), ("margins", "levels"), ("contrast",), ("margins", "contrast"))


def blob_probe(findings: list[str], splits: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, Any]:
    """Per kind list of :data:`BLOB_KINDS_PROBED`, the linear probe's test AUROC on the spot statistics alone."""
    import torch

    from medvlp.models.blobs import BlobStatistics
    from medvlp.tasks.probe import linear_probe

    (train_x, train_y), (test_x, test_y) = splits["train"], splits["test"]
    out: dict[str, Any] = {}
    for kinds in BLOB_KINDS_PROBED:
        blobs = BlobStatistics(1, kinds=list(kinds))
        train, test = (
            torch.cat([blobs.statistics(b) for b in torch.as_tensor(x).split(32)]) for x in (train_x, test_x)
        )
        probe = linear_probe(train, train_y, test, test_y, findings, (1.0,))
        res = probe["fractions"][1.0]
        out["+".join(kinds)] = {
            "n_statistics": blobs.num_statistics,
            "mean_auroc": round(res["mean_auroc"], 3),
            "per_finding": {f: round(m["auroc"], 3) for f, m in res["per_finding"].items()},
        }
    return out


def head_parts(run: Path, findings: list[str], splits: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, Any]:
    """How a trained 3D model's embedding holds the spot statistics: the statistics' map output (``blobs(x)``, added
    to the tower's pooled embedding) against the rest, as mean norms on test (``share``: their ratio), and the project's
    linear probe (fitted on train, scored on test) on the tower part, the map part and their sum, per finding."""
    import torch

    from medvlp.artifacts import RunDir
    from medvlp.tasks.probe import linear_probe

    encoder = RunDir.open(run).load_model().eval().image_encoder
    if getattr(encoder, "blobs", None) is None:
        raise SystemExit(f"{run} was trained without the spot statistics (image_encoder_args.blobs)")
    parts: dict[str, dict[str, torch.Tensor]] = {}
    with torch.no_grad():
        for split, (x, _) in splits.items():
            full, spot = [], []
            for batch in torch.as_tensor(x).float().split(32):
                full.append(encoder(batch).embedding)
                spot.append(encoder.blobs(batch))
            f, b = torch.cat(full), torch.cat(spot)
            parts[split] = {"tower": f - b, "map": b, "sum": f}
    test = parts["test"]
    out: dict[str, Any] = {
        "norm_tower": round(float(test["tower"].norm(dim=1).mean()), 3),
        "norm_map": round(float(test["map"].norm(dim=1).mean()), 3),
    }
    out["share"] = round(out["norm_map"] / out["norm_tower"], 3)
    (_, train_y), (_, test_y) = splits["train"], splits["test"]
    for part in ("tower", "map", "sum"):
        probe = linear_probe(parts["train"][part], train_y, test[part], test_y, findings, (1.0,))["fractions"][1.0]
        out[f"probe_{part}"] = {f: round(m["auroc"], 3) for f, m in probe["per_finding"].items()}
    return out


def demo_model(style: int) -> dict[str, Any] | None:
    """The demo-3d model's probe and zero-shot AUROC per finding on the same cohort, from bench_ablation's result."""
    path = ROOT / "benchmarks" / "results" / "ablation-ct-fpn.json"
    if not path.is_file():
        return None
    row = json.loads(path.read_text()).get("styles", {}).get(str(style), {}).get("report")
    if not row:
        return None
    return {
        "source": f"{path.name}, arm report",
        "linear_probe_auroc": row.get("linear_probe_auroc"),
        "zero_shot_per_finding": row.get("zero_shot_per_finding"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--styles", default="0,1,2")
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--keep", type=Path, help="keep (and reuse) each style's cohort and cache under DIR/style<S>")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "visibility-ct.json")
    ap.add_argument(
        "--runs",
        default="",
        help="bench_ablation arms trained with the spot statistics under --keep (DIR/style<S>/<arm>/run): "
        "how their embeddings hold the statistics (head_parts)",
    )
    args = ap.parse_args()
    styles = [int(s) for s in args.styles.split(",") if s.strip()]
    result: dict[str, Any] = {
        "benchmark": f"bench_visibility --styles {args.styles} --n {args.n}",
        "machine": machine(),
        "styles": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        base = args.keep or Path(tmp)
        for style in styles:
            _, cache, _ = prepare("ct", style, args.n, base / f"style{style}")
            findings, splits = load_splits(cache)
            result["styles"][str(style)] = {
                "statistics": visibility(findings, splits),
                "demo_model": demo_model(style),
                "blob_probe": blob_probe(findings, splits),
            }
            for arm in filter(None, args.runs.split(",")):
                if args.keep is None:
                    raise SystemExit("--runs reads bench_ablation's runs under --keep DIR")
                parts = result["styles"][str(style)].setdefault("head_parts", {})
                parts[arm] = head_parts(args.keep / f"style{style}" / arm / "run", findings, splits)
            print(style, json.dumps(result["styles"][str(style)]["statistics"]["test"]), flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
