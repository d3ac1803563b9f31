"""Does stage 1 pay once the hospital's unpaired data is used? Align-only vs stage 1 + align, with K extra images.

    python benchmarks/bench_unpaired.py [--kind cxr|ct] [--n 500] [--multipliers 0,2,5] [--steps S]
        [--set key=value ...] [--keep DIR] [--out FILE]

For each multiplier m, K = m x (the paired cohort's train studies): `medvlp cohort synth --unpaired K` adds K image-only
and K report-only studies (all in train) to the same n paired studies, so train pairs, val and test are the same for
every K. Arms, trained through the library with the demo config (configs/demo-2d.yaml or demo-3d.yaml):

    align-only      stage2-align alone from the generic towers. Stage 2 and every evaluation use the pairs only, so
                    this arm does not depend on K: it is trained once, on the K = 0 cohort.
    stage1+align    stage1-text (every report) + stage1-image (every image; enabled here by override) + stage2-align,
                    once per K.

Each run is evaluated with `medvlp.evaluate.evaluate` on the test split: zero-shot mean AUROC, linear-probe mean
AUROC, image-to-report R@10 and grounding CNR. ``--steps S`` scales every stage's schedule to S stage-2 steps (the
stage-1 steps, warm-ups, head-only steps, checkpoint and val intervals in proportion) for a small trial run. Prints a
table and writes benchmarks/results/unpaired-<kind>.json (after every run, so an interrupted run keeps what it did).
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

from bench_demo import TASKS  # noqa: E402  (the same metric paths as the demo benchmark)

from medvlp.card import get  # noqa: E402

COLUMNS = {
    "zero_shot_auroc": TASKS["zero_shot_auroc"],
    "linear_probe_auroc": TASKS["linear_probe_auroc"],
    "retrieval_i2r_R@10": TASKS["retrieval_i2r_R@10"],
    "grounding_cnr": TASKS["grounding_cnr"],
}
STAGE1 = ("stage1-text", "stage1-image")
ARMS = {
    "align-only": [f"stages.{s}.enabled=false" for s in STAGE1],
    "stage1+align": ["stages.stage1-image.enabled=true"],
}


def scaled_schedule(config: Path, overrides: list[str], steps: int) -> list[str]:
    """Overrides that scale every stage of ``config`` to ``steps`` stage-2 steps, keeping the stages' proportions."""
    from medvlp.config import load_config

    if steps < 2:
        raise ValueError(f"--steps must be at least 2, got {steps}")
    cfg = load_config(config, overrides)
    factor = steps / cfg.stages.get("stage2-align").steps
    out = []
    for name in (*STAGE1, "stage2-align"):
        stage = cfg.stages.get(name)
        n = max(2, round(stage.steps * factor))
        out += [f"stages.{name}.steps={n}", f"stages.{name}.checkpoint_every={min(stage.checkpoint_every, n)}"]
        out.append(f"stages.{name}.warmup_steps={min(round(stage.warmup_steps * factor), n - 1)}")
        if getattr(stage, "head_only_steps", None) is not None:
            out.append(f"stages.{name}.head_only_steps={min(round(stage.head_only_steps * factor), n - 1)}")
        if getattr(stage, "val_every", None) is not None:
            out.append(f"stages.{name}.val_every={min(stage.val_every, n)}")
    return out


def cohort(kind: str, n: int, unpaired: int, work: Path) -> tuple[Path, Path, dict[str, Any]]:
    """The cohort with ``unpaired`` image-only and report-only studies: its YAML, its built cache, its summary."""
    from medvlp.data.build import build_cohort
    from medvlp.data.synthetic import synthesize

    folder = work / f"cohort-k{unpaired}"
    yaml_path = folder / "cohort" / "cohort.yaml"
    if not yaml_path.is_file():
        yaml_path = synthesize(kind, n, folder / "cohort", seed=0, unpaired=unpaired)
    build_cohort(yaml_path, folder / "cache")
    summary = json.loads((folder / "cache" / "summary.json").read_text())
    return yaml_path, folder / "cache", summary


def run_arm(arm: str, config: Path, overrides: list[str], yaml_path: Path, cache: Path, run: Path) -> dict[str, Any]:
    """Trains one arm through the library and evaluates it on the test split; returns its row."""
    from medvlp.config import load_config
    from medvlp.evaluate import evaluate
    from medvlp.train.run import train

    cfg = load_config(config, ["seed=0", *overrides, *ARMS[arm]])
    stages = ["stage2-align"] if arm == "align-only" else None
    t0 = time.perf_counter()
    train(cfg, yaml_path, run, stages=stages, cache_dir=cache, resume=True)
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    metrics = evaluate(run, yaml_path, run / "card", baselines=False, cache_dir=cache)
    row: dict[str, Any] = {name: get(metrics, path) for name, path in COLUMNS.items()}
    row["seconds"] = {"train": round(train_s, 1), "evaluate": round(time.perf_counter() - t0, 1)}
    return row


def table(rows: list[dict[str, Any]]) -> str:
    def f(v: float | None) -> str:
        return "–" if v is None else f"{v:.3f}"

    lines = [
        "| arm | unpaired (x train pairs) | extra images | extra reports | zero-shot AUROC | probe AUROC "
        "| i2r R@10 | CNR |",
        "|" + "---|" * 8,
    ]
    for r in rows:
        lines.append(
            f"| {r['arm']} | {r['multiplier']:g} | {r['image_only']} | {r['report_only']} | {f(r['zero_shot_auroc'])} "
            f"| {f(r['linear_probe_auroc'])} | {f(r['retrieval_i2r_R@10'])} | {f(r['grounding_cnr'])} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kind", default="cxr", choices=["cxr", "ct"])
    ap.add_argument("--n", type=int, default=500, help="paired studies (the demo's default)")
    ap.add_argument(
        "--multipliers", default="0,2,5", help="unpaired images (and reports) per train pair, comma-separated"
    )
    ap.add_argument("--steps", type=int, help="scale every stage's schedule to this many stage-2 steps (trial runs)")
    ap.add_argument("--config", type=Path, help="default: configs/demo-2d.yaml or demo-3d.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="config override key=value")
    ap.add_argument("--keep", type=Path, help="work in this folder and keep it (reuses its cohorts and runs)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    try:
        multipliers = [float(m) for m in args.multipliers.split(",") if m.strip()]
    except ValueError:
        ap.error(f"--multipliers must be comma-separated numbers, got {args.multipliers!r}")
    if not multipliers or any(m < 0 for m in multipliers):
        ap.error(f"--multipliers must list non-negative numbers, got {args.multipliers!r}")
    config = args.config or ROOT / "configs" / ("demo-2d.yaml" if args.kind == "cxr" else "demo-3d.yaml")
    overrides = list(args.overrides)
    if args.steps is not None:
        try:
            overrides += scaled_schedule(config, overrides, args.steps)
        except ValueError as exc:
            ap.error(str(exc))
    out_json = args.out or ROOT / "benchmarks" / "results" / f"unpaired-{args.kind}.json"
    out_json.parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp)
        yaml0, cache0, summary0 = cohort(args.kind, args.n, 0, work)
        train_pairs = summary0["splits"].get("train", 0)
        plan = [("align-only", 0.0)] + [("stage1+align", m) for m in multipliers]
        for arm, m in plan:
            k = round(m * train_pairs)
            yaml_path, cache, summary = (yaml0, cache0, summary0) if k == 0 else cohort(args.kind, args.n, k, work)
            row = {
                "arm": arm,
                "multiplier": m,
                "image_only": summary["image_only"],
                "report_only": summary["report_only"],
            }
            row |= run_arm(arm, config, overrides, yaml_path, cache, work / "runs" / f"{arm}-k{k}")
            rows.append(row)
            print(json.dumps(row), flush=True)
            result = {
                "benchmark": f"bench_unpaired --kind {args.kind} --n {args.n} --multipliers {args.multipliers} "
                + (f"--steps {args.steps} " if args.steps is not None else "")
                + f"--config {config.name} "
                + " ".join(f"--set {o}" for o in args.overrides),
                "machine": machine(),
                "paired_train_studies": train_pairs,
                "note": "align-only uses the pairs alone, so it is trained once (K = 0) and holds for every K",
                "overrides": overrides,
                "complete": len(rows) == len(plan),
                "rows": rows,
            }
            out_json.write_text(json.dumps(result, indent=2) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
