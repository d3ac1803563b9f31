"""What each pretraining stage buys: the demo config trained with and without each stage 1, same cohort and seed.

    python benchmarks/bench_stages.py [--kind cxr|ct] [--n 500] [--variants two-stage align-only ...]
        [--set stages.stage2-align.steps=200 ...]

Variants (stage 2 always runs; stage-1 outputs are trained once and copied into the variants that use them):
    two-stage     stage1-text + stage1-image + stage2-align (the demo)
    align-only    stage2-align from the generic towers
    text+align    stage1-text + stage2-align
    image+align   stage1-image + stage2-align
    untrained     no training at all (the evaluation's floor)

Every variant is evaluated on the test split with the same tasks as `medvlp evaluate`. Prints and writes
benchmarks/results/stages-<kind>.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from machine import machine

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_demo import REPORTED, TASKS  # noqa: E402  (the same tasks as the demo benchmark; benchmarks/ is on sys.path)

from medvlp.card import get  # noqa: E402

VARIANTS = {
    "two-stage": ("stage1-text", "stage1-image"),
    "align-only": (),
    "text+align": ("stage1-text",),
    "image+align": ("stage1-image",),
    "untrained": None,
}


def main() -> None:
    from medvlp.config import load_config
    from medvlp.data.build import build_cohort
    from medvlp.data.cache import CachedCohort
    from medvlp.data.synthetic import synthesize
    from medvlp.evaluate import _untrained, evaluate_model
    from medvlp.models import load_model
    from medvlp.train.run import STAGES, train

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kind", default="cxr", choices=["cxr", "ct"])
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--config", type=Path, help="default: configs/demo-2d.yaml or demo-3d.yaml")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="config override key=value")
    ap.add_argument("--keep", type=Path, help="work in this folder and keep it (reuses its cohort and runs)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    config = args.config or ROOT / "configs" / ("demo-2d.yaml" if args.kind == "cxr" else "demo-3d.yaml")
    out_json = args.out or ROOT / "benchmarks" / "results" / f"stages-{args.kind}.json"

    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp)
        yaml_path = work / "cohort" / "cohort.yaml"
        if not yaml_path.is_file():
            yaml_path = synthesize(args.kind, args.n, work / "cohort", seed=0)
        build_cohort(yaml_path, work / "cache")
        cache = CachedCohort.open(work / "cache")
        cfg = load_config(config, args.overrides)
        sections = cfg.data.report_sections
        stage1_run = work / "stage1"
        needed = [s for s in STAGES[:2] if any(s in (VARIANTS[v] or ()) for v in args.variants)]
        timings: dict[str, float] = {}
        if needed:
            t0 = time.perf_counter()
            train(cfg, yaml_path, stage1_run, stages=needed, cache_dir=work / "cache", resume=True)
            timings["stage1"] = round(time.perf_counter() - t0, 1)
        rows: dict[str, dict[str, float | None]] = {name: {} for name in TASKS | REPORTED}
        for variant in args.variants:
            keep = VARIANTS[variant]
            t0 = time.perf_counter()
            if keep is None:
                model = _untrained(generic_model(cfg, cache))
            else:
                run = work / "runs" / variant
                run.mkdir(parents=True, exist_ok=True)
                for s in keep:
                    if not (run / s).exists():
                        shutil.copytree(stage1_run / s, run / s)
                off = [f"stages.{s}.enabled=false" for s in STAGES[:2] if s not in keep]
                vcfg = load_config(config, [*args.overrides, *off])
                train(vcfg, yaml_path, run, stages=["stage2-align"], cache_dir=work / "cache", resume=True)
                model = load_model(run)
            metrics = evaluate_model(model, cache, sections)
            timings[variant] = round(time.perf_counter() - t0, 1)
            for name, path in (TASKS | REPORTED).items():
                rows[name][variant] = get(metrics, path)
            print(variant, {k: None if v[variant] is None else round(v[variant], 3) for k, v in rows.items()})

    result = {
        "benchmark": f"bench_stages --kind {args.kind} --n {args.n} --config {config.name} "
        + " ".join(f"--set {o}" for o in args.overrides),
        "machine": machine(),
        "seconds": timings,
        "tasks": rows,
    }
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


def generic_model(cfg, cache):
    """The demo architecture with generic towers (its weights are then re-initialized by ``_untrained``)."""
    from medvlp.models import MedVLP, ModelConfig
    from medvlp.train.run import model_config

    return MedVLP(ModelConfig.model_validate(model_config(cfg, cache, Path("/nonexistent"), ["stage2-align"])))


if __name__ == "__main__":
    main()
