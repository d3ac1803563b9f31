"""Wall time of `concordance_index` and `CoxPH.fit` against lifelines and scikit-survival, in one run.

    python benchmarks/bench_survival.py [--sizes 10000,100000,1000000] [--p 10] [--budget 120]
        [--out benchmarks/results/survival.json]

Data (seeded): X ~ N(0, 1)^p, true log-hazard X @ beta with beta = linspace(-0.5, 0.5, p), event times
Exp(rate exp(X @ beta)), independent Exp(scale 1.5) censoring (~42% censored), times rounded to 1e-3 so there are
many tied times (Efron's correction matters). Concordance is scored on the true risk exp(X @ beta).

Implementations, each timed in this process, one after the other:

- concordance: ours (`medvlp.tasks.survival.concordance_index`, O(n log n) vectorised), lifelines
  `utils.concordance_index(t, -risk, e)` (O(n log n), Python loop over subjects), sksurv
  `concordance_index_censored` (a Python loop over events with an O(n) mask each: O(n^2)).
- Cox fit (Efron ties, no penalty): ours `CoxPH().fit`, lifelines `CoxPHFitter().fit`, sksurv
  `CoxPHSurvivalAnalysis(ties="efron").fit`. Each fit's total time includes what the library does in `fit`
  (lifelines also computes standard errors, baseline hazards; ours also the training concordance).

Timing: one call; calls under 1 s are repeated up to 3 times and the minimum is kept. A peer is skipped at a size
when its time extrapolated from the smaller sizes (empirical exponent from the last two sizes, else its known
complexity) exceeds `--budget` seconds; the record says "skipped: est. N s". Agreement is recorded at every size:
max |coef diff| of each peer against ours, and |C diff| for concordance. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from medvlp.tasks.survival import CoxPH, concordance_index  # noqa: E402

# known asymptotic exponents, used to extrapolate when only one smaller size was measured
COMPLEXITY = {"concordance/sksurv": 2.0}


def make_data(n: int, p: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, p))
    beta = np.linspace(-0.5, 0.5, p)
    t_event = rng.exponential(1.0 / np.exp(x @ beta))
    t_cens = rng.exponential(1.5, size=n)
    time_ = np.round(np.minimum(t_event, t_cens), 3)
    event = (t_event <= t_cens).astype(np.int64)
    return x, time_, event, beta


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    best, out = math.inf, None
    for _ in range(3):
        t0 = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t0
        best = min(best, dt)
        if dt >= 1.0:
            break
    return best, out


def estimate(history: list[tuple[int, float]], n: int, key: str) -> float | None:
    if not history:
        return None
    (n1, t1) = history[-1]
    if len(history) >= 2:
        n0, t0 = history[-2]
        k = math.log(max(t1, 1e-6) / max(t0, 1e-6)) / math.log(n1 / n0)
        k = min(max(k, 1.0), 2.2)
    else:
        k = COMPLEXITY.get(key, 1.1)
    return t1 * (n / n1) ** k


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--p", type=int, default=10)
    ap.add_argument("--budget", type=float, default=120.0, help="skip a peer whose estimated time exceeds this")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "survival.json"))
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]

    import lifelines
    import sklearn
    import sksurv
    from lifelines import CoxPHFitter
    from lifelines.utils import concordance_index as ll_cindex
    from sksurv.linear_model import CoxPHSurvivalAnalysis
    from sksurv.metrics import concordance_index_censored
    from sksurv.util import Surv

    def fit_ours(x: np.ndarray, t: np.ndarray, e: np.ndarray) -> np.ndarray:
        return CoxPH().fit(x, t, e).coef_

    def fit_lifelines(x: np.ndarray, t: np.ndarray, e: np.ndarray) -> np.ndarray:
        df = pd.DataFrame(x, columns=[f"x{j}" for j in range(x.shape[1])]).assign(T=t, E=e)
        return CoxPHFitter().fit(df, "T", "E").params_.to_numpy()

    def fit_sksurv(x: np.ndarray, t: np.ndarray, e: np.ndarray) -> np.ndarray:
        return CoxPHSurvivalAnalysis(ties="efron").fit(x, Surv.from_arrays(e.astype(bool), t)).coef_

    tasks: dict[str, dict[str, Callable[..., Any]]] = {
        "concordance": {
            "ours": lambda x, t, e, r: concordance_index(t, r, e),
            "lifelines": lambda x, t, e, r: ll_cindex(t, -r, e),
            "sksurv": lambda x, t, e, r: concordance_index_censored(e.astype(bool), t, r)[0],
        },
        "coxph_fit": {
            "ours": lambda x, t, e, r: fit_ours(x, t, e),
            "lifelines": lambda x, t, e, r: fit_lifelines(x, t, e),
            "sksurv": lambda x, t, e, r: fit_sksurv(x, t, e),
        },
    }
    history: dict[str, list[tuple[int, float]]] = {}
    rows: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    for n in sizes:
        x, t, e, beta = make_data(n, args.p)
        risk = np.exp(x @ beta)
        print(f"n={n}: censored {1 - e.mean():.1%}, distinct times {np.unique(t).size}", flush=True)
        for task, impls in tasks.items():
            ours_out = None
            for impl, fn in impls.items():
                key = f"{task}/{impl}"
                row: dict[str, Any] = {"task": task, "impl": impl, "n": n}
                est = estimate(history.get(key, []), n, key)
                if impl != "ours" and est is not None and est > args.budget:
                    row["skipped"] = f"skipped: est. {est:.0f} s"
                else:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        sec, out = timed(lambda fn=fn, data=(x, t, e, risk): fn(*data))
                    history.setdefault(key, []).append((n, sec))
                    row["seconds"] = round(sec, 4)
                    if impl == "ours":
                        ours_out = out
                    if task == "concordance":
                        row["c_index"] = float(out)
                        row["abs_diff_vs_ours"] = abs(float(out) - float(ours_out))
                    else:
                        row["max_abs_coef_diff_vs_ours"] = float(np.abs(np.asarray(out) - ours_out).max())
                        row["max_abs_coef_err_vs_truth"] = float(np.abs(np.asarray(out) - beta).max())
                rows.append(row)
                shown = row.get("skipped") or f"{row['seconds']:.3f} s"
                print(f"  {task:12s} {impl:10s} {shown}", flush=True)

    def speedup(task: str, impl: str, n: int) -> float | None:
        by = {(r["task"], r["impl"], r["n"]): r for r in rows}
        a, b = by[(task, "ours", n)], by[(task, impl, n)]
        return round(b["seconds"] / a["seconds"], 1) if "seconds" in b else None

    for r in rows:
        if r["impl"] != "ours":
            r["speedup_of_ours"] = speedup(r["task"], r["impl"], r["n"])
    result = {
        "benchmark": "survival",
        "machine": {
            "cpu_count": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
        },
        "versions": {
            "numpy": np.__version__,
            "pandas": pd.__version__,
            "lifelines": lifelines.__version__,
            "scikit-survival": sksurv.__version__,
            "scikit-learn": sklearn.__version__,
        },
        "config": {"sizes": sizes, "p": args.p, "budget_s": args.budget, "censoring": "Exp(scale 1.5)"},
        "total_seconds": round(time.perf_counter() - t_start, 1),
        "results": rows,
    }
    print()
    print(f"{'task':12s} {'n':>9s} {'impl':10s} {'time':>22s} {'speedup':>8s} {'agreement vs ours':>18s}")
    for r in rows:
        shown = r.get("skipped") or f"{r['seconds']:.3f} s"
        agree = r.get("abs_diff_vs_ours", r.get("max_abs_coef_diff_vs_ours"))
        sp = r.get("speedup_of_ours")
        print(
            f"{r['task']:12s} {r['n']:>9d} {r['impl']:10s} {shown:>22s} {'' if sp is None else f'{sp}x':>8s} "
            f"{'' if agree is None or r['impl'] == 'ours' else f'{agree:.1e}':>18s}"
        )
    print(f"total {result['total_seconds']} s")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
