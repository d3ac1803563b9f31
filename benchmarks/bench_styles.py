"""Today's model on cohorts of other hospital styles: the demo config trained and evaluated per style.

    python benchmarks/bench_styles.py [--kind cxr|ct] [--styles 0,1,2] [--n 500] [--set key=value ...]

For each style (0 = the built-in cohort), synthesizes the cohort (`medvlp cohort synth --style`), builds its
cache, trains the demo config (configs/demo-2d.yaml or demo-3d.yaml) through the library and evaluates it with
`medvlp.evaluate.evaluate`. Prints one table (zero-shot mean AUROC, worst finding and its AUROC, ECE, linear
probe mean AUROC, image-to-report R@10, grounding CNR, C-index) with the spread over the styles, and writes
benchmarks/results/styles-<kind>.json.
"""

from __future__ import annotations

import argparse
import json
import math
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
    "zero_shot_ece": ("zero_shot", "mean_ece"),
    "linear_probe_auroc": TASKS["linear_probe_auroc"],
    "retrieval_i2r_R@10": TASKS["retrieval_i2r_R@10"],
    "grounding_cnr": TASKS["grounding_cnr"],
    "survival_c_index": TASKS["survival_c_index"],
}


def worst_finding(metrics: dict[str, Any]) -> tuple[str | None, float | None]:
    """The finding with the lowest zero-shot AUROC (NaN ones left out) and that AUROC."""
    per = (metrics.get("zero_shot") or {}).get("per_finding") or {}
    scored = {f: get(m, ("auroc",)) for f, m in per.items()}
    scored = {f: v for f, v in scored.items() if v is not None and math.isfinite(v)}
    if not scored:
        return None, None
    name = min(scored, key=scored.__getitem__)
    return name, scored[name]


def run_style(kind: str, style: int, n: int, config: Path, overrides: list[str], work: Path) -> dict[str, Any]:
    """Synthesizes, builds, trains and evaluates one style; returns its row of the table."""
    from bench_ablation import prepare

    from medvlp.config import load_config
    from medvlp.evaluate import evaluate
    from medvlp.train.run import train

    timings = {}
    yaml_path, _, timings["synth_and_build_s"] = prepare(kind, style, n, work)  # its own column names, as they are
    cfg = load_config(config, ["seed=0", *overrides])
    t0 = time.perf_counter()
    train(cfg, yaml_path, work / "run", cache_dir=work / "cache", resume=True)
    timings["train_s"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    metrics = evaluate(work / "run", yaml_path, work / "card", baselines=False, cache_dir=work / "cache")
    timings["evaluate_s"] = round(time.perf_counter() - t0, 1)
    row: dict[str, Any] = {name: get(metrics, path) for name, path in COLUMNS.items()}
    row["worst_finding"], row["worst_finding_auroc"] = worst_finding(metrics)
    row["zero_shot_per_finding"] = {
        f: get(m, ("auroc",)) for f, m in ((metrics.get("zero_shot") or {}).get("per_finding") or {}).items()
    }
    row["seconds"] = timings
    return row


def spread(rows: dict[int, dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Per numeric column: min, max and max - min over the styles."""
    out: dict[str, dict[str, float | None]] = {}
    for col in [*COLUMNS, "worst_finding_auroc"]:
        vals = [r[col] for r in rows.values() if r.get(col) is not None and math.isfinite(r[col])]
        lo, hi = (min(vals), max(vals)) if vals else (None, None)
        out[col] = {"min": lo, "max": hi, "range": None if lo is None else hi - lo}
    return out


def table(rows: dict[int, dict[str, Any]], sp: dict[str, dict[str, float | None]]) -> str:
    def f(v: float | None) -> str:
        return "–" if v is None else f"{v:.3f}"

    head = "| style | zero-shot AUROC | worst finding | ECE | probe AUROC | i2r R@10 | grounding CNR | C-index |"
    lines = [head, "|" + "---|" * 8]
    for style, r in rows.items():
        worst = f"{r['worst_finding']} {f(r['worst_finding_auroc'])}" if r["worst_finding"] else "–"
        lines.append(
            f"| {style} | {f(r['zero_shot_auroc'])} | {worst} | {f(r['zero_shot_ece'])} | "
            f"{f(r['linear_probe_auroc'])} | {f(r['retrieval_i2r_R@10'])} | {f(r['grounding_cnr'])} | "
            f"{f(r['survival_c_index'])} |"
        )
    cols = ["zero_shot_auroc", "worst_finding_auroc", "zero_shot_ece", "linear_probe_auroc", "retrieval_i2r_R@10"]
    cells = [f(sp[c]["range"]) for c in [*cols, "grounding_cnr", "survival_c_index"]]
    lines.append("| spread (max - min) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kind", default="cxr", choices=["cxr", "ct"])
    ap.add_argument("--styles", default="0,1,2", help="comma-separated style seeds (0 = built-in)")
    ap.add_argument("--n", type=int, default=500, help="studies per cohort (the demo's default)")
    ap.add_argument("--config", type=Path, help="default: configs/demo-2d.yaml or demo-3d.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="config override key=value")
    ap.add_argument("--keep", type=Path, help="work in this folder and keep it (reuses its cohorts and runs)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    try:
        styles = [int(s) for s in args.styles.split(",") if s.strip()]
    except ValueError:
        ap.error(f"--styles must be comma-separated integers, got {args.styles!r}")
    if not styles or any(s < 0 for s in styles):
        ap.error(f"--styles must list non-negative integers, got {args.styles!r}")
    config = args.config or ROOT / "configs" / ("demo-2d.yaml" if args.kind == "cxr" else "demo-3d.yaml")
    out_json = args.out or ROOT / "benchmarks" / "results" / f"styles-{args.kind}.json"
    rows: dict[int, dict[str, Any]] = {}
    out_json.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        base = args.keep or Path(tmp)
        for style in styles:
            rows[style] = run_style(args.kind, style, args.n, config, args.overrides, base / f"style{style}")
            print(f"style {style}:", json.dumps({k: v for k, v in rows[style].items() if k != "seconds"}), flush=True)
            result = {  # written after every style, so that an interrupted run keeps the styles it finished
                "benchmark": f"bench_styles --kind {args.kind} --styles {args.styles} --n {args.n} "
                f"--config {config.name} " + " ".join(f"--set {o}" for o in args.overrides),
                "machine": machine(),
                "complete": len(rows) == len(styles),
                "styles": {str(k): v for k, v in rows.items()},
                "spread": spread(rows),
            }
            out_json.write_text(json.dumps(result, indent=2) + "\n")
    print(table(rows, spread(rows)))


if __name__ == "__main__":
    main()
