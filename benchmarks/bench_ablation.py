"""The zero-shot ablation: each stage-2 method on and off, on the built-in cohort and on other hospital styles.

    python benchmarks/bench_ablation.py [--kind cxr|ct] [--styles 0,1,2] [--arms report,mirror] [--n 500] [--keep DIR]

For each style (0 = the built-in cohort; others from `medvlp cohort synth --style`) the cohort and its cache are made
once; then each arm trains the demo config (configs/demo-2d.yaml or demo-3d.yaml) with the arm's overrides, same
seed, and is evaluated by `medvlp.evaluate.evaluate`. Per (style, arm): zero-shot AUROC and its gap to the linear
probe on the same embeddings, the worst finding, ECE after and before the calibration fitted on val, retrieval,
grounding, survival, the negation/laterality robustness suite, the training-label prompt prototypes when the
evaluation reports them, and the training time. A method "pays" only when it beats the `report` arm's zero-shot
AUROC on every style. Arms in :data:`DERIVED` (`*forms`, `*mined*`, `synonyms*`) act after training only: they
recalibrate a copy of their base arm's trained run with other prompt forms chosen on val (mined from the training
reports without labels; with a cohort YAML's synonyms, :data:`SYNONYMS`). The others train the demo config with
their overrides: stage1-text off (`align_only`), an attention pool (`attn_pool`, `avgattn_pool`), a cache sized from
the cohort (`auto_resolution`), the phrase-box term (`box*`), mirrored pairs (`mirror*`); each comment says which.
Writes benchmarks/results/ablation-<kind>.json after every run (--keep: a rerun reuses finished runs, resumes others).
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

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ablation_arms import (  # noqa: E402
    ARMS,
    DERIVED,
    PREPROCESS,
    SYNONYMS,
    WITH_SYNONYMS,
    arm_overrides,
    cache_arm,
)
from bench_styles import worst_finding  # noqa: E402
from machine import machine  # noqa: E402

from medvlp.card import get  # noqa: E402

COLUMNS = {
    "zero_shot_auroc": ("zero_shot", "mean_auroc"),
    "zero_shot_ece": ("zero_shot", "mean_ece"),
    "zero_shot_ece_uncalibrated": ("zero_shot", "mean_ece_uncalibrated"),
    "zero_shot_ece_floor": ("zero_shot", "mean_ece_floor"),
    "linear_probe_auroc": ("linear_probe", "mean_auroc"),
    "prompt_prototype_auroc": ("prompt_prototype", "mean_auroc"),
    "retrieval_i2r_R@10": ("retrieval", "image_to_report", "R@10"),
    "retrieval_r2i_R@10": ("retrieval", "report_to_image", "R@10"),
    "grounding_cnr": ("grounding", "mean_cnr"),
    "grounding_cnr_control": ("grounding", "mean_cnr_control"),  # the same phrases on images without the finding
    "grounding_miou": ("grounding", "mean_miou"),
    "survival_c_index": ("survival", "c_index"),
    "robustness": ("robustness", "mean_accuracy"),
    "robustness_negation": ("robustness", "per_perturbation", "negation", "accuracy"),
    "robustness_laterality": ("robustness", "per_perturbation", "laterality", "accuracy"),
    # the negation asked the other way round: the negated sentence on a study without the finding must win
    "robustness_absence": ("robustness", "per_perturbation", "absence", "accuracy"),
    "robustness_negation_balanced": ("robustness", "negation_balanced_accuracy"),
    "robustness_with_absence": ("robustness", "mean_accuracy_with_absence"),
    "robustness_without_side_check": ("robustness", "without_side_check", "mean_accuracy"),
    "robustness_absence_without_side_check": (
        "robustness",
        "without_side_check",
        "per_perturbation",
        "absence",
        "accuracy",
    ),
    "robustness_laterality_without_side_check": (
        "robustness",
        "without_side_check",
        "per_perturbation",
        "laterality",
        "accuracy",
    ),
}
GOALS = {"gap_to_probe": 0.05, "worst_finding_auroc": 0.85, "zero_shot_ece": 0.05, "robustness": 0.95}


def prepare(kind: str, style: int, n: int, work: Path) -> tuple[Path, Path, float]:
    """The style's cohort and its cache, made once (reused when already there); returns (yaml, cache, seconds)."""
    from medvlp.data.build import build_cohort
    from medvlp.data.synthetic import synthesize

    t0 = time.perf_counter()
    yaml_path = work / "cohort" / "cohort.yaml"
    if not yaml_path.is_file():
        yaml_path = synthesize(kind, n, work / "cohort", seed=0, style=style)
    build_cohort(yaml_path, work / "cache")
    return yaml_path, work / "cache", round(time.perf_counter() - t0, 1)


def prepare_preprocess(yaml_path: Path, work: Path, arm: str) -> tuple[Path, Path]:
    """The style's cohort YAML with the arm's :data:`PREPROCESS` settings (beside it, so paths still resolve) and
    its own cache, built once; returns (yaml, cache)."""
    import yaml

    from medvlp.data.build import build_cohort

    spec = yaml.safe_load(yaml_path.read_text())
    merged = {**spec["preprocess"], **PREPROCESS[arm]}
    spec["preprocess"] = {k: v for k, v in merged.items() if v is not None}
    variant = yaml_path.with_name(f"cohort-{arm}.yaml")
    variant.write_text(yaml.safe_dump(spec, sort_keys=False))
    build_cohort(variant, work / f"cache-{arm}")
    return variant, work / f"cache-{arm}"


def row_of(metrics: dict[str, Any]) -> dict[str, Any]:
    """One table row from a metrics.json: the columns, the worst finding, the gap and which goals are met."""
    row: dict[str, Any] = {name: get(metrics, path) for name, path in COLUMNS.items()}
    row["worst_finding"], row["worst_finding_auroc"] = worst_finding(metrics)
    row["zero_shot_per_finding"] = {
        f: get(m, ("auroc",)) for f, m in ((metrics.get("zero_shot") or {}).get("per_finding") or {}).items()
    }
    row["grounding_per_category"] = (metrics.get("grounding") or {}).get("per_category")  # CNR and its control
    zs, probe = row["zero_shot_auroc"], row["linear_probe_auroc"]
    row["gap_to_probe"] = None if zs is None or probe is None else probe - zs
    met = {}
    for key, bound in GOALS.items():
        v = row.get(key)
        ok = v is not None and math.isfinite(v)
        met[key] = ok and (v <= bound if key in ("gap_to_probe", "zero_shot_ece") else v >= bound)
    row["goals_met"] = met
    return row


def run_arm(
    config: Path,
    overrides: list[str],
    yaml_path: Path,
    cache: Path,
    out: Path,
    reevaluate: bool = False,
    synonyms: dict[str, list[str]] | None = None,
) -> dict[str, Any]:
    """Trains (resuming) and evaluates one arm; a finished arm's metrics.json is read back, not recomputed, unless
    ``reevaluate`` (its trained model evaluated again by today's code, the training time kept). With ``synonyms``,
    the trained model's cohort record gets them as its prompts and is calibrated again before the evaluation."""
    from medvlp.config import load_config
    from medvlp.evaluate import evaluate
    from medvlp.train.run import train

    seconds: dict[str, float] = {}
    done = out / "card" / "metrics.json"
    if done.is_file() and reevaluate:
        seconds = json.loads((out / "seconds.json").read_text()) if (out / "seconds.json").is_file() else {}
        t0 = time.perf_counter()
        metrics = evaluate(out / "run", yaml_path, out / "card", baselines=False, cache_dir=cache)
        seconds["evaluate_s"] = round(time.perf_counter() - t0, 1)
    elif done.is_file():
        metrics = json.loads(done.read_text())
        seconds = json.loads((out / "seconds.json").read_text()) if (out / "seconds.json").is_file() else {}
    else:
        copied = out / "seconds.json"  # a derived arm's copy of its base arm's timings
        seconds = json.loads(copied.read_text()) if copied.is_file() else {}
        t0 = time.perf_counter()
        cfg = load_config(config, ["seed=0", *overrides])
        train(cfg, yaml_path, out / "run", cache_dir=cache, resume=True)
        if synonyms is not None:  # after training, which writes the cohort record from the cache afresh
            recalibrate_with(out / "run", cfg, cache, synonyms)
        seconds["resume_s" if "train_s" in seconds else "train_s"] = round(time.perf_counter() - t0, 1)
        t0 = time.perf_counter()
        metrics = evaluate(out / "run", yaml_path, out / "card", baselines=False, cache_dir=cache)
        seconds["evaluate_s"] = round(time.perf_counter() - t0, 1)
        (out / "seconds.json").write_text(json.dumps(seconds) + "\n")
    diagnostics = {**text_side(out / "run", cache), **image_side(out / "run", cache)}
    return {**row_of(metrics), **diagnostics, **chosen_form(out / "run"), "seconds": seconds}


def chosen_form(run: Path) -> dict[str, Any]:
    """The prompt form the calibration chose on val, and every candidate's val AUROC (empty without a calibration)."""
    from medvlp.artifacts import RunDir

    calibration = RunDir.open(run).calibration() or {}
    return {k: calibration[k] for k in ("prompt_form", "prompt_form_val_auroc") if k in calibration}


def derive(base: Path, out: Path) -> None:
    """Start a derived arm from a copy of its base arm's finished run (and its timings)."""
    import shutil

    if not (base / "card" / "metrics.json").is_file():
        raise SystemExit(f"{out.name} starts from the finished {base.name} arm: run --arms {base.name} first")
    shutil.copytree(base / "run", out / "run")
    shutil.copy2(base / "seconds.json", out / "seconds.json")


def synonyms_by_column(kind: str) -> dict[str, list[str]]:
    """:data:`SYNONYMS` keyed by every column name a style may give the finding (``effusion`` as well as
    ``pleural_effusion``), as a hospital writes them under its own finding names."""
    from medvlp.data.synthetic.style import COLUMN_NAMES

    return {name: names for f, names in SYNONYMS[kind].items() for name in COLUMN_NAMES[kind].get(f, (f,))}


def recalibrate_with(run: Path, cfg: Any, cache: Path, synonyms: dict[str, list[str]]) -> None:
    """Put ``synonyms`` into every cohort record of a trained run, as a cohort YAML's ``prompts:`` would have, and
    fit the model folder's calibration again (its prompt form too) with them."""
    from medvlp.data.cache import COHORT_RECORD, CachedCohort, atomic_write_json
    from medvlp.tasks.calibration import calibrate_model_dir

    for path in run.rglob(COHORT_RECORD):
        record = json.loads(path.read_text())
        prompts = dict(record.get("prompts") or {})
        prompts["synonyms"] = {f: names for f, names in synonyms.items() if f in record.get("findings", synonyms)}
        atomic_write_json(path, {**record, "prompts": prompts})
    align = cfg.stages.stage2_align
    calibrate_model_dir(
        run / "stage2-align" / "model",
        CachedCohort.open(cache),
        list(cfg.data.report_sections),
        align.prompt_forms,
        isotonic=align.calibration_isotonic,
        topic_readers=align.mining_topic_readers,
    )


def mean_intensity(cohort: Any, studies: Any) -> np.ndarray:
    """Each study's cached image mean: a global cue (body size, fluid) that a tower which does not see a lesion may
    score it by instead (`image_side` here, the supervised run of bench_towers)."""
    return np.array([float(np.asarray(cohort.load_image(s), dtype=np.float32).mean()) for s in studies])


def image_side(run: Path, cache: Path) -> dict[str, Any]:
    """``laterality_probe_auroc``: how well a logistic regression on the frozen global image embeddings tells a
    finding written on the left from one written on the right (fitted on the train split's annotated phrases that
    name exactly one side, scored on test's). Near 0.5, the embedding does not carry the side, and the laterality
    half of the robustness suite cannot be met by any text; None when a split lacks one of the sides.
    ``zero_shot_mean_intensity_spearman``: per finding, the rank correlation on test between the zero-shot score
    (`sentence` prompts) and the image's mean intensity, a global shortcut (body size, fluid) that a tower which does
    not see a lesion may score it by instead.
    ``laterality_twin_accuracy``: per split, how often the image prefers its own report over that report with its
    first lateral sentence side-swapped (``report``: the twin term's task) and a finding phrase alone over its
    side-swapped twin (``sentence``: the robustness suite's task, on that split); beside them the report with every
    side swapped (``report_mirrored``) and ``report`` scored with other studies' images (``report_shuffled_images``:
    above 0.5, the text alone gives the twin away) and the share of one-sentence twins that contradict their report
    (``report_twins_contradictory``; :func:`report_twin_accuracy`)."""
    import re

    from scipy.stats import spearmanr
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    from medvlp.artifacts import RunDir
    from medvlp.data.cache import CachedCohort
    from medvlp.data.perturb import swap_laterality
    from medvlp.tasks.embed import embed_split
    from medvlp.tasks.grounding import grounding_pairs
    from medvlp.tasks.robustness import robustness_suite
    from medvlp.tasks.zeroshot import zero_shot_scores

    rd, cohort = RunDir.open(run), CachedCohort.open(cache)
    model = rd.load_model().eval()
    data, out = {}, {"laterality_twin_accuracy": {}}
    for split in ("train", "test"):
        emb = embed_split(model, cohort, split, rd.report_sections)
        suite = robustness_suite(model, cohort, emb.image, list(emb.records["study"]), split)["per_perturbation"]
        reports = report_twin_accuracy(model, emb.image, emb.reports, swap_laterality) or {}
        out["laterality_twin_accuracy"][split] = {
            "report": reports.get("one"),
            "sentence": suite.get("laterality", {}).get("accuracy"),
            "report_mirrored": reports.get("mirrored"),
            "report_shuffled_images": reports.get("shuffled"),
            "report_twins_contradictory": reports.get("contradictory"),
        }
        if split == "test":
            scores = zero_shot_scores(model, emb.image, cohort.findings)
            mean = mean_intensity(cohort, emb.records["study"])
            out["zero_shot_mean_intensity_spearman"] = {
                f: float(spearmanr(scores[:, j], mean).statistic) for j, f in enumerate(cohort.findings)
            }
        row = {s: i for i, s in enumerate(emb.records["study"])}
        x, y = [], []
        for p in grounding_pairs(cohort, split).itertuples(index=False):
            if swap_laterality(p.phrase) is not None:  # exactly one side named: the robustness suite's rule
                x.append(emb.image[row[p.study]])
                y.append(int(re.search(r"\bleft\b", p.phrase, re.I) is not None))
        data[split] = (np.asarray(x), np.asarray(y))
    (xtr, ytr), (xte, yte) = data["train"], data["test"]
    if len(set(ytr)) < 2 or len(set(yte)) < 2:
        return {**out, "laterality_probe_auroc": None}
    clf = LogisticRegression(max_iter=2000).fit(xtr, ytr)
    probe = float(roc_auc_score(yte, clf.predict_proba(xte)[:, 1]))
    return {**out, "laterality_probe_auroc": probe, "laterality_phrases": len(yte)}


def report_twin_accuracy(model: Any, images: np.ndarray, reports: list[str], rule: Any) -> dict[str, float] | None:
    """How often each image prefers its report over a twin (ties count against the model), on the reports that have
    a sentence ``rule`` changes; None when none has.

    - ``one``: the twin with that first sentence changed (the twin term's default draw). In a report that states the
      finding twice, the twin contradicts itself;
    - ``mirrored``: every side of the report swapped (:func:`medvlp.data.perturb.mirror_sides`), a twin as consistent
      as a real report, which only the image's side tells apart;
    - ``shuffled``: ``one`` with every image swapped for another study's (a seeded permutation): about 0.5 unless the
      tower tells twins from reports by their text alone (a contradiction cue);
    - ``contradictory``: the share of ``one`` twins that name both sides where their report named one.
    """
    import torch

    from medvlp.data.perturb import mirror_sides, named_sides
    from medvlp.data.reports import text_sentences
    from medvlp.tasks.embed import encode_texts

    rows, own, twin = [], [], []
    for i, text in enumerate(reports):
        flips = [(x, t) for x in text_sentences(text) if (t := rule(x)) is not None]
        if flips:
            rows.append(i)
            own.append(text)
            twin.append(text.replace(*flips[0], 1))
    if not rows:
        return None
    img = torch.nn.functional.normalize(torch.as_tensor(images[rows]).float(), dim=-1)
    a, b, c = encode_texts(model, own), encode_texts(model, twin), encode_texts(model, [mirror_sides(t) for t in own])
    other = img[torch.randperm(len(rows), generator=torch.Generator().manual_seed(0))]

    def accuracy(x: Any, y: Any, z: Any) -> float:
        return float(((x * y).sum(-1) > (x * z).sum(-1)).float().mean())

    both = [len(named_sides(t)) == 2 and len(named_sides(r)) == 1 for r, t in zip(own, twin, strict=True)]
    return {
        "one": accuracy(img, a, b),
        "mirrored": accuracy(img, a, c),
        "shuffled": accuracy(other, a, b),
        "contradictory": float(np.mean(both)),
    }


def text_side(run: Path, cache: Path) -> dict[str, Any]:
    """Diagnostics of the trained text tower, which zero-shot reads through its prompts (the `sentence` form for every
    arm, so a `*forms` arm shows its base arm's text tower).

    - ``prompt_cosine``: per finding, the cosine between its positive and negative prompt ensembles. Zero-shot scores
      an image along ``positive - negative``; near 1, the tower hardly reads "no" and that direction is short and
      noisy, whatever the images carry.
    - ``direction_cosine``: the mean cosine between different findings' directions; near 1, every finding is scored
      along one shared "abnormal or not" axis.
    - ``report_ceiling``: zero-shot metrics of the test **reports** scored in place of their images (the same
      prompts, scale and metric). An image tower that read each image exactly as its report would score this: it is
      how far the text side alone can carry zero-shot.
    - ``report_ceiling_form``: the same in the prompt form val chose (the calibration's; ``sentence`` without one),
      the form the arm's zero-shot figure is scored in.
    """
    import torch.nn.functional as F

    from medvlp.artifacts import RunDir
    from medvlp.data.cache import CachedCohort
    from medvlp.tasks import zeroshot as zs
    from medvlp.tasks.embed import embed_split
    from medvlp.tasks.prompt_forms import mined_prompts, mined_report_prototypes, prompt_form

    found = RunDir.open(run)
    model, record = found.load_model(), found.cohort_record() or {}
    findings = record["findings"]
    prompts = zs.build_prompt_embeddings(model, findings, *zs.prompt_spec(record))  # [F, 2, E]
    per = {f: float(prompts[i, 0] @ prompts[i, 1]) for i, f in enumerate(findings)}
    d = F.normalize(prompts[:, 0] - prompts[:, 1], dim=-1)  # [F, E]
    n = d.shape[0]
    shared = float(((d @ d.T).sum() - n) / (n * n - n)) if n > 1 else None
    test = embed_split(model, CachedCohort.open(cache), "test", found.report_sections)
    ceiling = zs.classification_metrics(
        test.labels, zs.zero_shot_probabilities(test.text, prompts, zs.model_logit_scale(model)), findings
    )
    calibration = found.calibration()
    in_form = zs.zero_shot_scores(
        model,
        test.text,
        findings,
        *zs.prompt_spec(record),
        prompt_form(calibration),
        mined_prompts(calibration),
        mined_report_prototypes(calibration),
    )
    form_ceiling = zs.classification_metrics(test.labels, in_form, findings)
    return {
        "prompt_cosine": per,
        "mean_prompt_cosine": sum(per.values()) / len(per) if per else None,
        "direction_cosine": shared,
        "report_ceiling_auroc": ceiling["mean_auroc"],
        "report_ceiling_per_finding": {f: m["auroc"] for f, m in ceiling["per_finding"].items()},
        "report_ceiling_form_auroc": form_ceiling["mean_auroc"],
        "report_ceiling_form_per_finding": {f: m["auroc"] for f, m in form_ceiling["per_finding"].items()},
    }


def verdicts(rows: dict[str, dict[str, dict[str, Any]]], base: str = "report") -> dict[str, Any]:
    """Per arm: its zero-shot AUROC minus the base arm's, per style, and whether it pays on every style."""
    out: dict[str, Any] = {}
    arms = {a for per in rows.values() for a in per}
    for arm in sorted(arms - {base}):
        deltas = {}
        for style, per in rows.items():
            a, b = (per.get(arm) or {}).get("zero_shot_auroc"), (per.get(base) or {}).get("zero_shot_auroc")
            deltas[style] = None if a is None or b is None else a - b
        known = [d for d in deltas.values() if d is not None]
        pays = bool(known) and len(known) == len(rows) and min(known) > 0
        out[arm] = {"zero_shot_delta": deltas, "pays_on_all": pays}
    return out


def table(rows: dict[str, dict[str, dict[str, Any]]]) -> str:
    def f(v: float | None) -> str:
        return "–" if v is None else f"{v:.3f}"

    head = (
        "| style | arm | zero-shot | gap to probe | worst finding | ECE (uncal.; floor) | probe | prototypes | "
        "i2r R@10 | CNR | mIoU | C-index | robustness (neg., lat.) | prompt cos | direction cos | report ceiling | "
        "train s |"
    )
    lines = [head, "|" + "---|" * 17]
    for style, per in rows.items():
        for arm, r in per.items():
            worst = f"{r['worst_finding']} {f(r['worst_finding_auroc'])}" if r["worst_finding"] else "–"
            ece = f"{f(r['zero_shot_ece'])} ({f(r['zero_shot_ece_uncalibrated'])}; {f(r.get('zero_shot_ece_floor'))})"
            rob = f"{f(r['robustness'])} ({f(r['robustness_negation'])}, {f(r['robustness_laterality'])})"
            lines.append(
                f"| {style} | {arm} | {f(r['zero_shot_auroc'])} | {f(r['gap_to_probe'])} | {worst} | "
                f"{ece} | {f(r['linear_probe_auroc'])} | "
                f"{f(r['prompt_prototype_auroc'])} | {f(r['retrieval_i2r_R@10'])} | {f(r['grounding_cnr'])} | "
                f"{f(r['grounding_miou'])} | {f(r['survival_c_index'])} | {rob} | "
                f"{f(r.get('mean_prompt_cosine'))} | {f(r.get('direction_cosine'))} | "
                f"{f(r.get('report_ceiling_auroc'))} | "
                f"{r['seconds'].get('train_s', '–')} |"
            )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kind", default="cxr", choices=["cxr", "ct"])
    ap.add_argument("--styles", default="0,1,2", help="comma-separated style seeds (0 = built-in)")
    ap.add_argument("--arms", default="report,sentence,sentence_hard", help=f"comma-separated, of {', '.join(ARMS)}")
    ap.add_argument("--n", type=int, default=500, help="studies per cohort (the demo's default)")
    ap.add_argument("--config", type=Path, help="default: configs/demo-2d.yaml or demo-3d.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="override for every arm")
    ap.add_argument("--keep", type=Path, help="work in this folder and keep it (reuses its cohorts and runs)")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--reevaluate", action="store_true", help="evaluate finished runs again (with --keep)")
    ap.add_argument("--finished-only", action="store_true", help="leave out (style, arm) runs not finished yet")
    args = ap.parse_args()
    styles = [int(s) for s in args.styles.split(",") if s.strip()]
    arms = [a for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS]
    if unknown or not arms or not styles:
        ap.error(f"--arms must name some of {', '.join(ARMS)} (got {args.arms!r}), --styles some seeds")
    config = args.config or ROOT / "configs" / ("demo-2d.yaml" if args.kind == "cxr" else "demo-3d.yaml")
    out_json = args.out or ROOT / "benchmarks" / "results" / f"ablation-{args.kind}.json"
    out_json.parent.mkdir(parents=True, exist_ok=True)
    rows: dict[str, dict[str, dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        base = args.keep or Path(tmp)
        for style in styles:
            yaml_path, cache, _ = prepare(args.kind, style, args.n, base / f"style{style}")
            for arm in arms:
                where = base / f"style{style}" / arm
                if args.finished_only and not (where / "card" / "metrics.json").is_file():
                    continue
                if arm in DERIVED and not (where / "run").exists():
                    derive(base / f"style{style}" / DERIVED[arm], where)
                synonyms = synonyms_by_column(args.kind) if arm in WITH_SYNONYMS else None
                arm_yaml, arm_cache = yaml_path, cache
                if (source := cache_arm(arm)) is not None:
                    arm_yaml, arm_cache = prepare_preprocess(yaml_path, base / f"style{style}", source)
                overrides = [*args.overrides, *arm_overrides(args.kind, arm)]
                row = run_arm(config, overrides, arm_yaml, arm_cache, where, args.reevaluate, synonyms)
                rows.setdefault(str(style), {})[arm] = row
                print(f"style {style} {arm}:", json.dumps({k: v for k, v in row.items() if k != "seconds"}), flush=True)
                result = {
                    "benchmark": f"bench_ablation --kind {args.kind} --styles {args.styles} --arms {args.arms} "
                    f"--n {args.n} --config {config.name} " + " ".join(f"--set {o}" for o in args.overrides),
                    "machine": machine(),
                    "arms": {a: arm_overrides(args.kind, a) for a in arms},
                    "goals": GOALS,
                    "complete": sum(len(v) for v in rows.values()) == len(styles) * len(arms),
                    "runs": {s: sorted(v) for s, v in rows.items()},
                    "styles": rows,
                    "verdicts": verdicts(rows),
                }
                out_json.write_text(json.dumps(result, indent=2) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
