"""The model card: one Markdown page with the headline numbers, the baselines beside them, and the plots.

It names the cohort and counts, never a study or a patient.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

HEADLINE = (
    ("zero-shot mean AUROC", ("zero_shot", "mean_auroc")),
    ("image->report R@1", ("retrieval", "image_to_report", "R@1")),
    ("image->report R@10", ("retrieval", "image_to_report", "R@10")),
    ("report->image R@10", ("retrieval", "report_to_image", "R@10")),
    ("grounding mean CNR", ("grounding", "mean_cnr")),
    ("grounding mean IoU", ("grounding", "mean_iou")),
    ("grounding mean mIoU (cosine 0.1-0.5)", ("grounding", "mean_miou")),
    ("negation/laterality robustness accuracy", ("robustness", "mean_accuracy")),
    ("negation read both ways (present / absent finding)", ("robustness", "negation_balanced_accuracy")),
    ("survival C-index (image + covariates)", ("survival", "c_index")),
    ("linear probe mean AUROC (100% labels)", ("linear_probe", "mean_auroc")),
)


def get(metrics: dict[str, Any] | None, path: tuple[str, ...]) -> float | None:
    node: Any = metrics
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node if isinstance(node, int | float) else None


def _fmt(v: float | None) -> str:
    return "–" if v is None else f"{v:.3f}"


def write_model_card(out: Path, metrics: dict[str, Any], model_path: Path) -> Path:
    """Write ``out/model_card.md`` from the metrics of :func:`medvlp.evaluate.evaluate`."""
    base = metrics.get("baselines") or {}
    cols = ["this model", *[k.replace("_", " ") for k in base]]
    lines = [
        f"# Model card: {Path(model_path).name}",
        "",
        f"Cohort **{metrics['cohort']['name']}**, test split of {metrics['cohort']['test_studies']} studies; "
        f"findings: {', '.join(metrics['cohort']['findings'])}.",
        "",
        "| metric | " + " | ".join(cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    for label, path in HEADLINE:
        row = [_fmt(get(metrics, path)), *[_fmt(get(b, path)) for b in base.values()]]
        lines.append(f"| {label} | " + " | ".join(row) + " |")
    notes = {
        "untrained": "*untrained*: the same architecture with a random image tower and the generic text tower",
        "align_only": "*align only*: stage 2 without stage 1",
    }
    if base:
        lines += [
            "",
            "; ".join(notes[k] for k in base if k in notes) + ". The gaps between columns are what "
            "training (and each stage) buys.",
        ]
    zs = (metrics.get("zero_shot") or {}).get("per_finding", {})
    if zs:
        lines += [
            "",
            "## Zero-shot diagnosis per finding",
            "",
            "| finding | AUROC | AUPRC | F1 | ECE | ECE floor | pos / neg |",
            "|---|---|---|---|---|---|---|",
        ]
        for f, m in zs.items():
            lines.append(
                f"| {f} | {_fmt(m.get('auroc'))} | {_fmt(m.get('auprc'))} | {_fmt(m.get('f1'))} | "
                f"{_fmt(m.get('ece'))} | {_fmt(m.get('ece_floor'))} | {m.get('n_pos')} / {m.get('n_neg')} |"
            )
        lines += [
            "",
            "*ECE floor*: the ECE a perfectly calibrated model with the same probabilities would show on this many "
            "test studies (labels drawn from the probabilities); an ECE near its floor is within the metric's noise.",
        ]
        lines += _prompt_note((metrics.get("zero_shot") or {}).get("prompts") or {})
        refit = metrics.get("image_refit")
        if refit:
            lines += [
                "",
                "*Image refit*: the global image embedding is a ridge map, fitted after training on the training pairs "
                f"(no labels), of the trained embedding and {refit.get('num_statistics')} spot statistics "
                f"({', '.join(refit.get('kinds') or [])}) onto the report embeddings, its strength "
                f"{refit.get('ridge')} chosen on val by image -> report R@10; {_refit_tokens(refit)}",
            ]
    ground = (metrics.get("grounding") or {}).get("per_category") or {}
    if ground:
        lines += [
            "",
            "## Grounding per finding (similarity map against the phrase's boxes)",
            "",
            "| finding | CNR | IoU | mIoU | CNR on an image without it | phrases |",
            "|---|---|---|---|---|---|",
        ]
        for f, m in ground.items():
            cells = [_fmt(m.get(k)) for k in ("cnr", "iou", "miou", "cnr_control")]
            lines.append(f"| {f} | " + " | ".join(cells) + f" | {m.get('n')} |")
        lines += [
            "",
            "*CNR on an image without it*: the same phrase and boxes on a test image labelled without the finding; a "
            "CNR as high there means the map finds the anatomy the phrase names, not the lesion.",
        ]
        if (metrics.get("grounding") or {}).get("supervised"):
            lines += [
                "",
                "*Supervised*: this model trained on the training split's phrase boxes (`box_weight`), so its "
                "grounding was taught, not learned from the reports alone.",
            ]
    rob = metrics.get("robustness") or {}
    if rob.get("per_finding"):
        perts = sorted(rob["per_perturbation"])
        lines += [
            "",
            "## Robustness: the true finding sentence ranked above its negated and side-swapped twins (and, on "
            "images without the finding, the negated sentence above the affirmative)",
            "",
            "| finding | " + " | ".join(perts) + " |",
            "|---|" + "---|" * len(perts),
        ]
        for f, accs in rob["per_finding"].items():
            lines.append(f"| {f} | " + " | ".join(_fmt(accs.get(k)) for k in perts) + " |")
        lines.append(
            "| all | "
            + " | ".join(
                f"{_fmt(rob['per_perturbation'][k]['accuracy'])} (n={rob['per_perturbation'][k]['n']})" for k in perts
            )
            + " |"
        )
        if rob.get("negation_balanced_accuracy") is not None:
            lines += [
                "",
                "*Absence*: each negation case asked the other way round, on a test study without the finding, where "
                "the negated sentence must win (a model that scores every negated sentence low passes the negation "
                "column and fails this one); negation and absence together: "
                f"{_fmt(rob['negation_balanced_accuracy'])}; the whole suite with absence: "
                f"{_fmt(rob.get('mean_accuracy_with_absence'))}.",
            ]
        edit = rob.get("side_edit")
        if edit:
            which = "one-sentence texts" if edit["texts"] == "sentences" else "texts"
            lines += [
                "",
                f"*Side edit*: the text embeddings of {which} that name a side carry a rank-one edit fitted after "
                f"training (directions on train, strength {edit['strength']:g} chosen on val), so the laterality "
                "column measures the model with it.",
            ]
        check = rob.get("side_check")
        if check:
            plain = rob.get("without_side_check") or {}
            lines += [
                "",
                "*Side check*: a one-sided sentence is scored with a term that reads on which half of the image its "
                f"finding lights up (the image tokens; strength {check['strength']:g} chosen on val), so the table "
                "measures the model's pair score; by the embeddings alone the suite scores "
                f"{_fmt(plain.get('mean_accuracy'))}.",
            ]
    op = (metrics.get("zero_shot") or {}).get("operating_point")
    if op:
        lines += [
            "",
            f"## Operating point: {op['target_sensitivity']:.0%} sensitivity, threshold fitted on {op['fitted_on']}, "
            "scored on test",
            "",
            "| finding | threshold | sensitivity | specificity | PPV | NPV |",
            "|---|---|---|---|---|---|",
        ]
        for f, m in op["per_finding"].items():
            cells = [_fmt(m.get(k)) for k in ("threshold", "sensitivity", "specificity", "ppv", "npv")]
            lines.append(f"| {f} | " + " | ".join(cells) + " |")
    s = metrics.get("survival")
    if s and "error" in s:
        lines += ["", f"Survival was not evaluated: {s['error']}"]
    elif s:
        lines += [
            "",
            "## Survival (Cox on image-embedding components + covariates)",
            "",
            "| features | Harrell C (95% CI, by subject) | Uno C | mean td-AUC | integrated Brier | "
            "log-rank p (cut at the training median) |",
            "|---|---|---|---|---|---|",
        ]
        for name in ("image+covariates", "covariates", "image", "gain_from_image"):
            if name in s:
                m = s[name]
                ci = f" ({_fmt(m.get('ci_low'))}-{_fmt(m.get('ci_high'))})" if m.get("ci_low") is not None else ""
                p = m.get("logrank_p")
                lines.append(
                    f"| {name.replace('_', ' ')} | {_fmt(m.get('c_index'))}{ci} | {_fmt(m.get('uno_c_index'))} | "
                    f"{_fmt(m.get('td_auc_mean'))} | {_fmt(m.get('integrated_brier'))} | "
                    f"{'–' if p is None else f'{p:.3g}'} |"
                )
        errors = {
            f"{k}: {m}": r for k, v in s.items() if isinstance(v, dict) for m, r in (v.get("errors") or {}).items()
        }
        if errors:
            lines += ["", "Not computed: " + "; ".join(f"{k} ({r})" for k, r in errors.items())]
    lines += ["", "## Plots", ""]
    for png in sorted(out.glob("*.png")):
        lines.append(f"![{png.stem}]({png.name})")
    lines += ["", "All numbers: `metrics.json` beside this card.", ""]
    path = out / "model_card.md"
    path.write_text("\n".join(lines))
    return path


def summary(metrics_path: Path) -> dict[str, Any]:
    """The headline numbers of a card (for the API's /v1/model)."""
    metrics = json.loads(Path(metrics_path).read_text())
    return {label: get(metrics, path) for label, path in HEADLINE}


PROMPT_NOTES = {
    "sentence": "the template prompts alone",
    "report": "the template prompts, each framed as a report that denies the other findings",
    "report_section": "the template prompts, each framed as a report section that denies the other findings",
    "mined": "sentences mined from the training reports' text",
    "mined_report_section": "sentences mined from the training reports' text, framed as a report section",
    "mined_reports": "each finding's mean embedding of the training reports that state it, against the others",
}


def _prompt_note(prompts: dict[str, Any]) -> list[str]:
    """One line on what the zero-shot answers with (the form chosen on val) and whether it read training labels."""
    form = prompts.get("form")
    if form not in PROMPT_NOTES:
        return []
    labels = prompts.get("uses_training_labels")
    read = "" if labels is None else (" No training label was read." if labels is False else " Uses training labels.")
    return ["", f"*Prompts*: `{form}` (chosen on val): {PROMPT_NOTES[form]}.{read}"]


def _refit_tokens(refit: dict[str, Any]) -> str:
    """What the card says grounding reads under an image refit: the tower's tokens, or the refitted cells'."""
    grid = refit.get("token_grid")
    if not grid:
        return "grounding reads the tower's tokens, unchanged."
    return (
        f"grounding reads the same map on {' x '.join(str(g) for g in grid)} cells of about {refit.get('cell')} "
        "voxels, each from its own spot statistics standardised by that cell's training mean and scale."
    )
