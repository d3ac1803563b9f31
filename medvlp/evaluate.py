"""`medvlp evaluate`: every downstream task on the cohort's test split, written as metrics.json and plots.

Tasks: zero-shot diagnosis (prompt ensembles), report retrieval, phrase grounding, survival (Cox on frozen
image embeddings plus the cohort's covariates), and linear probes with a data-efficiency curve. With
``baselines=True`` the same architecture is also evaluated untrained and after alignment alone (stage 2
without stage 1, trained here from the run's own config), so the card shows what each stage buys.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from medvlp.data.cache import CachedCohort
from medvlp.models import MedVLP, load_model
from medvlp.tasks import grounding, plots, probe, retrieval, survival, zeroshot

logger = logging.getLogger(__name__)
PCA_COMPONENTS = 8
BASELINES = ("untrained", "align_only")
ALIGN_ONLY_DIR = Path("baselines") / "align-only"  # inside the card folder


@dataclass
class SplitEmbeddings:
    """Frozen embeddings of one split: images ``[N, E]``, reports ``[N, E]``, labels ``[N, F]`` (NaN unknown)."""

    records: pd.DataFrame
    image: np.ndarray
    text: np.ndarray
    labels: np.ndarray


def _images(cache: CachedCohort, studies: list[str]) -> torch.Tensor:
    return torch.stack([torch.from_numpy(np.asarray(cache.load_image(s), dtype=np.float32)) for s in studies])


@torch.no_grad()
def embed_split(model: MedVLP, cache: CachedCohort, split: str, sections: list[str], batch_size: int = 32):
    """Batched, gradient-free embeddings of a split's images and reports."""
    from medvlp.data.reports import report_text

    model.eval()
    rec = cache.split(split)
    imgs, txts = [], []
    for i in range(0, len(rec), batch_size):
        part = rec.iloc[i : i + batch_size]
        imgs.append(model.encode_image(_images(cache, list(part["study"])).to(model.device)).cpu())
        txts.append(model.encode_text([report_text(r, sections) for r in part["report"]]).cpu())
    labels = rec[cache.findings].astype("float32").to_numpy() if cache.findings else np.zeros((len(rec), 0))
    return SplitEmbeddings(rec, torch.cat(imgs).numpy(), torch.cat(txts).numpy(), labels)


def _zero_shot(model: MedVLP, cache: CachedCohort, test: SplitEmbeddings, plot_dir: Path | None) -> dict[str, Any]:
    prompts = zeroshot.build_prompt_embeddings(model, cache.findings)
    probs = zeroshot.zero_shot_probabilities(test.image, prompts, zeroshot.model_logit_scale(model))
    out = zeroshot.classification_metrics(test.labels, probs, cache.findings)
    if plot_dir is not None:
        plots.plot_roc_curves(test.labels, probs, cache.findings, plot_dir / "roc_zero_shot.png", "Zero-shot ROC")
        plots.plot_calibration(test.labels, probs, cache.findings, plot_dir / "calibration_zero_shot.png")
    return out


def _grounding(model: MedVLP, cache: CachedCohort, plot_dir: Path | None, max_plots: int = 4) -> dict[str, Any]:
    test = set(cache.split("test")["study"])
    g = cache.grounding[cache.grounding["study"].isin(test)].reset_index(drop=True)
    if g.empty:
        return {"n": 0, "mean_cnr": None, "mean_iou": None}
    boxes = grounding.boxes_from_frame(g, cache.spatial_dims)
    images = _images(cache, list(g["study"]))
    df = grounding.grounding_metrics(model, images, list(g["label_text"]), boxes, list(g["category_name"]))
    per_cat = df.groupby("category")[["cnr", "iou"]].mean().round(4).to_dict(orient="index")
    if plot_dir is not None:
        for k, i in enumerate(df.sort_values("cnr", ascending=False).index[:max_plots]):
            with torch.no_grad():
                emb = model.forward_image(images[i : i + 1].to(model.device))
                phrase = model.encode_text([g.at[i, "label_text"]])
            sim = grounding.similarity_map(emb.tokens[0], emb.grid, phrase[0], images.shape[2:])
            plots.plot_grounding_overlay(
                images[i, 0].numpy(),
                sim.cpu().numpy(),
                boxes[i],
                plot_dir / f"grounding_{k}.png",
                title=f"{g.at[i, 'label_text']} (CNR {df.at[i, 'cnr']:.2f})",
            )
    return {
        "n": len(df),
        "mean_cnr": float(df["cnr"].mean()),
        "mean_iou": float(df["iou"].mean()),
        "per_category": per_cat,
    }


def _survival(cache: CachedCohort, train: SplitEmbeddings, test: SplitEmbeddings, plot_dir: Path | None):
    """Cox on the first principal components of the image embeddings plus covariates, vs covariates alone."""
    from sklearn.decomposition import PCA

    if not cache.summary.get("survival"):
        return None
    tcol, ecol = "time", "event"
    cov = list(cache.summary.get("covariates") or [])
    tr, te = train.records, test.records
    ok_tr = tr[[tcol, ecol, *cov]].notna().all(axis=1).to_numpy()
    ok_te = te[[tcol, ecol, *cov]].notna().all(axis=1).to_numpy()
    k = min(PCA_COMPONENTS, train.image.shape[1], int(ok_tr.sum()) - 1)
    pca = PCA(n_components=k, random_state=0).fit(train.image[ok_tr])
    feats = [f"pc{i + 1}" for i in range(k)]

    def frame(emb: SplitEmbeddings, ok: np.ndarray) -> pd.DataFrame:
        z = pd.DataFrame(pca.transform(emb.image[ok]), columns=feats)
        return pd.concat([z, emb.records.loc[ok, cov].reset_index(drop=True).astype(float)], axis=1)

    xtr, xte = frame(train, ok_tr), frame(test, ok_te)
    t_tr, e_tr = tr.loc[ok_tr, tcol].to_numpy(float), tr.loc[ok_tr, ecol].to_numpy(float)
    t_te, e_te = te.loc[ok_te, tcol].to_numpy(float), te.loc[ok_te, ecol].to_numpy(float)
    out: dict[str, Any] = {"n_train": int(ok_tr.sum()), "n_test": int(ok_te.sum()), "features": feats + cov}
    for name, cols in (("image+covariates", feats + cov), ("covariates", cov), ("image", feats)):
        if not cols:
            continue
        cox = survival.CoxPH(penalizer=0.1).fit(xtr[cols], t_tr, e_tr)
        risk = cox.predict_risk(xte[cols])
        times = np.quantile(t_te[e_te == 1], [0.25, 0.5, 0.75]) if (e_te == 1).sum() >= 4 else None
        res = {"c_index": survival.concordance_index(t_te, risk, e_te)}
        try:
            res["uno_c_index"] = survival.uno_c_index(t_tr, e_tr, t_te, risk, e_te)
            if times is not None:
                times = times[(times > t_te.min()) & (times < min(t_tr.max(), t_te.max()))]
                res["td_auc_mean"] = survival.time_dependent_auc(t_tr, e_tr, t_te, risk, e_te, times)[1]
                surv = cox.predict_survival(xte[cols], times)
                res["integrated_brier"] = survival.integrated_brier_score(t_tr, e_tr, t_te, e_te, surv, times)
        except ValueError as exc:  # too few events for a time-dependent metric: recorded, not fatal
            res["note"] = str(exc)
        lo_hi = survival.risk_groups(risk, 2)
        res["logrank_p"] = survival.logrank_test(t_te, e_te, lo_hi)["p_value"]
        out[name] = res
        if name == "image+covariates" and plot_dir is not None:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            fig, ax = plt.subplots(figsize=(6, 4.5), dpi=100)
            survival.plot_kaplan_meier(t_te, e_te, lo_hi, ax=ax, labels=["low risk", "high risk"])
            fig.savefig(plot_dir / "kaplan_meier.png", bbox_inches="tight")
            plt.close(fig)
    out["c_index"] = out["image+covariates"]["c_index"] if "image+covariates" in out else out["image"]["c_index"]
    return out


def evaluate_model(
    model: MedVLP, cache: CachedCohort, sections: list[str], plot_dir: Path | None = None
) -> dict[str, Any]:
    """All tasks for one model; plots go to ``plot_dir`` when given."""
    if plot_dir is not None:
        plot_dir.mkdir(parents=True, exist_ok=True)
    train, test = embed_split(model, cache, "train", sections), embed_split(model, cache, "test", sections)
    pr = probe.linear_probe(train.image, train.labels, test.image, test.labels, cache.findings)
    metrics = {
        "zero_shot": _zero_shot(model, cache, test, plot_dir),
        "retrieval": retrieval.retrieval_metrics(test.image, test.text, labels=test.labels),
        "grounding": _grounding(model, cache, plot_dir),
        "survival": _survival(cache, train, test, plot_dir),
        "linear_probe": {
            "mean_auroc": pr["curve"].get(1.0),
            "curve": pr["curve"],
            "fractions": pr["fractions"],
            "skipped": pr["skipped"],
        },
    }
    return metrics


def _untrained(model: MedVLP) -> MedVLP:
    """The same architecture with no pretraining: random image tower, the generic (not adapted) text tower."""
    cfg = model.config.model_copy(
        update={"text_encoder": None, "image_checkpoint": None, "text_num_layers": model.text_encoder.num_layers}
    )
    torch.manual_seed(0)
    return MedVLP(cfg)


def evaluate(
    model_path: str | Path,
    cohort_yaml: str | Path,
    out: str | Path,
    baselines: bool | Sequence[str] = False,
    cache_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Evaluate a run (or model folder) on a cohort's test split; write ``out/metrics.json``, plots and the card.

    ``baselines``: True for both, or a list of ``"untrained"`` (same architecture, random image tower and
    projections, generic text tower) and ``"align_only"`` (stage 2 alone, trained here with the run's settings).
    """
    from medvlp.data.build import build_cohort
    from medvlp.train.run import default_cache_dir

    wanted = set(BASELINES if baselines is True else baselines or ())
    if wanted - set(BASELINES):
        raise ValueError(f"unknown baseline(s) {sorted(wanted - set(BASELINES))}; known: {', '.join(BASELINES)}")
    out, model_path = Path(out), Path(model_path)
    out.mkdir(parents=True, exist_ok=True)
    cache_path = Path(cache_dir) if cache_dir else default_cache_dir(Path(cohort_yaml))
    build_cohort(cohort_yaml, cache_path)
    cache = CachedCohort.open(cache_path)
    run_cfg = _run_config(model_path)
    sections = run_cfg.data.report_sections if run_cfg else ["findings", "impression"]
    model = load_model(model_path)
    metrics = evaluate_model(model, cache, sections, out)
    metrics["cohort"] = {
        "name": cache.summary["cohort"],
        "test_studies": len(cache.split("test")),
        "findings": cache.findings,
    }
    if wanted:
        metrics["baselines"] = {}
        if "untrained" in wanted:
            metrics["baselines"]["untrained"] = evaluate_model(_untrained(model), cache, sections)
        if "align_only" in wanted and run_cfg is not None:
            metrics["baselines"]["align_only"] = evaluate_model(
                load_model(train_align_only(run_cfg, cohort_yaml, cache_path, out)), cache, sections
            )
        curves = {"model": metrics["linear_probe"]["curve"]}
        curves |= {k: v["linear_probe"]["curve"] for k, v in metrics["baselines"].items()}
        plots.plot_data_efficiency(curves, out / "data_efficiency.png")
    else:
        plots.plot_data_efficiency({"model": metrics["linear_probe"]["curve"]}, out / "data_efficiency.png")
    (out / "metrics.json").write_text(json.dumps(_jsonable(metrics), indent=2) + "\n")
    from medvlp.card import write_model_card

    write_model_card(out, metrics, model_path)
    return metrics


def _run_config(path: Path):
    from medvlp.config import load_config

    for cand in (path / "config.yaml", path.parent.parent / "config.yaml", path.parent / "config.yaml"):
        if cand.is_file():
            return load_config(cand)
    return None


def train_align_only(
    cfg, cohort_yaml: str | Path, cache_path: Path, out: Path, progress: Callable[[str, int, int], None] | None = None
) -> Path:
    """Stage 2 alone from the generic towers, with the run's own stage-2 settings, into ``out/baselines/align-only``.

    Resumable: a card folder whose align-only run is already trained (``medvlp demo`` trains it under its own
    progress display) is evaluated without training again. Returns the run folder.
    """
    from medvlp.train.run import train

    run = out / ALIGN_ONLY_DIR
    train(cfg, cohort_yaml, run, stages=["stage2-align"], cache_dir=cache_path, resume=True, progress=progress)
    return run


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, float) and not np.isfinite(x):
        return None
    return x
