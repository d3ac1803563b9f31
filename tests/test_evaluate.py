"""`medvlp evaluate`: a tiny run end to end produces a complete card (metrics, baselines, plots)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest

from medvlp.config import load_config
from medvlp.train.run import train

ROOT = Path(__file__).resolve().parents[1]
REQUIRED = [
    ("zero_shot", "mean_auroc"),
    ("retrieval", "image_to_report", "R@1"),
    ("retrieval", "image_to_report", "R@5"),
    ("retrieval", "image_to_report", "R@10"),
    ("retrieval", "report_to_image", "R@1"),
    ("retrieval", "report_to_image", "R@5"),
    ("retrieval", "report_to_image", "R@10"),
    ("grounding", "mean_cnr"),
    ("grounding", "mean_iou"),
    ("survival", "c_index"),
    ("linear_probe", "mean_auroc"),
]


def _get(d: dict, path: tuple[str, ...]):
    for k in path:
        d = d[k]
    return d


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from medvlp.data.synthetic import synthesize

    root = tmp_path_factory.mktemp("eval")
    yaml_path = synthesize("cxr", 60, root / "cxr", seed=7)
    # the form is chosen on val
    forms = "stages.stage2-align.prompt_forms=[sentence,report,report_section,mined,mined_report_section,mined_reports]"
    train(load_config(ROOT / "configs" / "tiny-2d.yaml", [forms]), yaml_path, root / "run")
    return yaml_path, root / "run"


def test_tiny_run_gives_a_complete_card(tiny_run: tuple[Path, Path], tmp_path: Path) -> None:
    yaml_path, run = tiny_run
    card = tmp_path / "card"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "medvlp",
            "evaluate",
            "--model",
            str(run),
            "--cohort",
            str(yaml_path),
            "--out",
            str(card),
            "--baseline",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads((card / "metrics.json").read_text())
    findings = metrics["cohort"]["findings"]
    for path in REQUIRED:
        v = _get(metrics, path)
        assert isinstance(v, float), (path, v)
        assert 0.0 <= v <= 1.0 or path[0] == "grounding", (path, v)
    for f in findings:
        assert "auroc" in metrics["zero_shot"]["per_finding"][f]
    zs = metrics["zero_shot"]  # training fitted a calibration on val; the card answers calibrated probabilities
    assert zs["calibrated"] is True and isinstance(zs["mean_ece_uncalibrated"], float)
    _check_the_prompt_form_was_chosen_on_val(run, zs)
    assert 0.0 < zs["mean_ece_floor"] < 1.0 and all(0.0 < zs["per_finding"][f]["ece_floor"] < 1.0 for f in findings)
    assert "ECE floor" in (card / "model_card.md").read_text()
    assert (run / "stage2-align" / "model" / "calibration.json").is_file()
    assert set(zs["operating_point"]["per_finding"]) == set(findings)
    assert isinstance(metrics["robustness"]["mean_accuracy"], float)
    assert set(metrics["baselines"]) == {"untrained", "align_only"}
    for b in metrics["baselines"].values():
        for path in REQUIRED:
            _get(b, path)
    assert (card / "baselines" / "align-only" / "stage2-align" / "model").is_dir()
    text = (card / "model_card.md").read_text()
    assert "| zero-shot mean AUROC |" in text and "untrained" in text and "align only" in text
    pngs = {p.name for p in card.glob("*.png")}
    assert {"roc_zero_shot.png", "calibration_zero_shot.png", "kaplan_meier.png", "data_efficiency.png"} <= pngs
    assert any(n.startswith("grounding_") for n in pngs)
    for p in card.glob("*.png"):
        img = mpimg.imread(p)
        assert img.shape[0] > 100 and img.std() > 0.01, p.name
        assert f"![{p.stem}]({p.name})" in text
    # no identifier of the cohort's manifest or headers reaches the card
    manifest = pd.read_csv(yaml_path.parent / "manifest.csv", dtype=str)
    everything = text + (card / "metrics.json").read_text()
    assert not [s for s in [*manifest["study_id"], *manifest["subject_id"]] if s in everything]


def _check_the_prompt_form_was_chosen_on_val(run: Path, zs: dict) -> None:
    """Every candidate form scored on val, the best kept (earlier wins ties), and the card answers with it."""
    from medvlp.artifacts import RunDir
    from medvlp.tasks.embed import embed_split
    from medvlp.tasks.prompt_forms import mined_report_prototypes
    from medvlp.tasks.zeroshot import classification_metrics, zero_shot_scores

    found = RunDir.open(run)
    cal = found.calibration()
    order, aurocs = cal["prompt_form_candidates"], cal["prompt_form_val_auroc"]
    assert order == ["sentence", "report", "report_section", "mined", "mined_report_section", "mined_reports"]
    assert set(aurocs) == set(order)
    assert cal["prompt_form"] == max(order, key=lambda f: (aurocs[f], -order.index(f)))
    assert zs["prompts"]["form"] == cal["prompt_form"]
    assert ("mined" in zs["prompts"]) == (cal["prompt_form"] in ("mined", "mined_report_section"))
    assert ("mined_reports" in zs["prompts"]) == (cal["prompt_form"] == "mined_reports")
    assert zs["prompts"].get("uses_training_labels", False) is False
    assert cal["mining_topic_readers"] == ["model"]  # the config's default reader of the training sentences' topics
    model, cache = found.load_model(), found.open_cache()
    # the mined sentences were mined from the training reports, without their labels, and stored with the calibration
    train_text = " ".join(cache.split("train")["report"])
    mined = {f: {pol: e[pol] for pol in ("positive", "negative")} for f, e in cal["mined_prompts"].items()}
    assert set(mined) == set(cache.findings)
    for e in cal["mined_prompts"].values():
        for pol in ("positive", "negative"):
            assert e[pol] and (pol in e["fallback"] or all(s in train_text for s in e[pol]))
    assert any(not e["fallback"] for e in cal["mined_prompts"].values())  # some sentence was mined
    # the report prototypes: two unit vectors per finding, the counts of the training reports behind them
    prototypes = mined_report_prototypes(cal)
    assert set(prototypes) <= set(cache.findings) and prototypes
    for f, e in cal["mined_report_prototypes"].items():
        assert sum(e["reports"].values()) == len(cache.split("train"))
        assert np.linalg.norm(prototypes[f], axis=1) == pytest.approx([1.0, 1.0], abs=1e-4)
    val = embed_split(model, cache, "val", found.report_sections)
    for form, stored in aurocs.items():
        scores = zero_shot_scores(model, val.image, cache.findings, form=form, mined=mined, prototypes=prototypes)
        assert classification_metrics(val.labels, scores, cache.findings)["mean_auroc"] == pytest.approx(stored)
    assert len({round(v, 9) for v in aurocs.values()}) > 1  # the forms do score differently


def test_baselines_can_be_chosen(tiny_run: tuple[Path, Path], tmp_path: Path) -> None:
    from medvlp.evaluate import evaluate

    yaml_path, run = tiny_run
    with pytest.raises(ValueError, match="unknown baseline"):
        evaluate(run, yaml_path, tmp_path / "bad", baselines=["random"])
    metrics = evaluate(run, yaml_path, tmp_path / "card", baselines=["untrained"])
    assert set(metrics["baselines"]) == {"untrained"}
    assert not (tmp_path / "card" / "baselines").exists()  # no align-only training
    text = (tmp_path / "card" / "model_card.md").read_text()
    assert "untrained" in text and "align only" not in text


def test_a_cohort_with_its_own_column_names_gets_a_complete_card(tiny_run: tuple[Path, Path], tmp_path: Path) -> None:
    """What a hospital export looks like: ``followup_days``/``deceased``/``age_years``, not time/event/age."""
    from medvlp.artifacts import default_cache_dir
    from medvlp.data.build import build_cohort
    from medvlp.evaluate import evaluate

    yaml_path, run = tiny_run
    folder = Path(shutil.copytree(yaml_path.parent, tmp_path / "export", ignore=shutil.ignore_patterns(".medvlp-*")))
    manifest = pd.read_csv(folder / "manifest.csv", dtype=str)
    names = {"time": "followup_days", "event": "deceased", "age": "age_years"}
    manifest.rename(columns=names).to_csv(folder / "manifest.csv", index=False)
    text = (folder / "cohort.yaml").read_text().replace("survival: {time: time, event: event}", "")
    text = text.replace("covariates: [age, sex]", "covariates: [age_years, sex]")
    text += "survival: {time: followup_days, event: deceased}\n"
    (folder / "cohort.yaml").write_text(text.replace("name: synthetic-cxr", "name: hospital-export"))
    cohort = folder / "cohort.yaml"
    with pytest.raises(FileNotFoundError, match="medvlp cohort build"):  # evaluation finds a cache, never builds one
        evaluate(run, cohort, tmp_path / "nothing")
    build_cohort(cohort, default_cache_dir(cohort), workers=0)
    metrics = evaluate(run, cohort, tmp_path / "card")
    s = metrics["survival"]
    assert s["columns"] == {"time": "followup_days", "event": "deceased", "covariates": ["age_years", "sex"]}
    for model in ("image+covariates", "covariates", "image"):
        for key in ("c_index", "ci_low", "ci_high", "uno_c_index", "uno_tau", "logrank_p"):
            assert isinstance(s[model][key], float), (model, key)
    assert isinstance(s["c_index"], float) and (tmp_path / "card" / "kaplan_meier.png").is_file()
    card = (tmp_path / "card" / "model_card.md").read_text()
    assert "Harrell C" in card and "Survival was not evaluated" not in card


def test_the_isotonic_step_is_a_switch_fitted_on_val_that_keeps_the_ranking(
    tiny_run: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`calibration_isotonic`: on in the 2D demo config, off by default and in 3D; when on, the model folder's
    calibration holds the knots, and the answered val probabilities rank the studies as the raw scores do."""
    from medvlp.artifacts import RunDir
    from medvlp.tasks import calibration as cal_mod
    from medvlp.tasks.embed import embed_split
    from medvlp.tasks.zeroshot import classification_metrics, zero_shot_scores

    assert load_config(ROOT / "configs" / "demo-2d.yaml").stages.stage2_align.calibration_isotonic is True
    assert load_config(ROOT / "configs" / "demo-3d.yaml").stages.stage2_align.calibration_isotonic is False
    assert load_config(None).stages.stage2_align.calibration_isotonic is False
    _, run = tiny_run
    found = RunDir.open(run)
    model_dir = tmp_path / "model"
    shutil.copytree(found.model_dir, model_dir)
    monkeypatch.setattr(cal_mod, "ISOTONIC_MIN_PER_CLASS", 2)  # the tiny cohort's val split is small
    cache = found.open_cache()
    cal = cal_mod.calibrate_model_dir(model_dir, cache, found.report_sections, ["sentence"], isotonic=True)
    assert cal == cal_mod.load_calibration(model_dir)
    assert any("isotonic" in entry for entry in cal["findings"].values())
    val = embed_split(found.load_model(), cache, "val", found.report_sections)
    raw = zero_shot_scores(found.load_model(), val.image, cache.findings)
    answered = cal_mod.apply_calibration(raw, cache.findings, cal)[0]
    before, after = (classification_metrics(val.labels, p, cache.findings) for p in (raw, answered))
    assert after["mean_auroc"] == pytest.approx(before["mean_auroc"], abs=1e-12)
    assert after["mean_ece"] <= before["mean_ece"]


def test_a_model_trained_on_the_phrase_boxes_says_its_grounding_is_supervised(
    tiny_run: tuple[Path, Path], tmp_path: Path
) -> None:
    from medvlp.evaluate import evaluate

    yaml_path, run = tiny_run
    assert evaluate(run, yaml_path, tmp_path / "plain")["grounding"]["supervised"] is False
    boxed = tmp_path / "boxed"
    train(load_config(ROOT / "configs" / "tiny-2d.yaml", ["stages.stage2-align.box_weight=1.0"]), yaml_path, boxed)
    logged = (boxed / "stage2-align" / "log.jsonl").read_text()
    assert '"box":' in logged, "the phrase-box term trained"
    metrics = evaluate(boxed, yaml_path, tmp_path / "card")
    assert metrics["grounding"]["supervised"] is True and metrics["grounding"]["n"] > 0
    assert "*Supervised*" in (tmp_path / "card" / "model_card.md").read_text()
    # a model folder copied out of its run does not carry the training config: unknown, not "not supervised"
    shutil.copytree(boxed / "stage2-align" / "model", tmp_path / "bare-model")
    bare = evaluate(tmp_path / "bare-model", yaml_path, tmp_path / "bare")
    assert bare["grounding"]["supervised"] is None


def test_the_side_edit_is_a_switch_fitted_after_training_before_the_calibration(
    tiny_run: tuple[Path, Path], tmp_path: Path
) -> None:
    """`side_edit`: off by default and in 3D, on in the 2D demo; on, a finished run resumed with it fits the edit
    into its model folder (the record beside it, the calibration fitted again afterwards on the edited model)."""
    from medvlp.artifacts import RunDir
    from medvlp.tasks.side_edit import SIDE_EDIT_RECORD, STRENGTHS

    assert load_config(None).stages.stage2_align.side_edit is False
    assert load_config(ROOT / "configs" / "demo-2d.yaml").stages.stage2_align.side_edit is True
    assert load_config(ROOT / "configs" / "demo-3d.yaml").stages.stage2_align.side_edit is False
    yaml_path, run = tiny_run
    edited = tmp_path / "run"
    shutil.copytree(run, edited)
    model_dir = RunDir.open(edited).model_dir
    calibrated = (model_dir / "calibration.json").stat().st_mtime_ns
    forms = "stages.stage2-align.prompt_forms=[sentence,report,report_section,mined,mined_report_section,mined_reports]"
    cfg = load_config(ROOT / "configs" / "tiny-2d.yaml", [forms, "stages.stage2-align.side_edit=true"])
    train(cfg, yaml_path, edited, resume=True)
    record = json.loads((model_dir / SIDE_EDIT_RECORD).read_text())
    assert record["strength"] in STRENGTHS and set(record["val_accuracy"]) == {str(k) for k in STRENGTHS}
    model = RunDir.open(edited).load_model()
    assert model.config.side_edit == "sentences"
    assert float(model.side_edit.strength) == pytest.approx(record["strength"])
    assert (model_dir / "calibration.json").stat().st_mtime_ns > calibrated
    from medvlp.evaluate import evaluate

    metrics = evaluate(edited, yaml_path, tmp_path / "card")  # the card says the suite measured the edited model
    assert metrics["robustness"]["side_edit"] == record
    assert "*Side edit*" in (tmp_path / "card" / "model_card.md").read_text()


def test_the_image_refit_is_a_switch_fitted_after_training_before_the_calibration(
    tiny_run: tuple[Path, Path], tmp_path: Path
) -> None:
    """`image_refit`: off by default and in the 2D demo, on in the 3D demo; on, a finished run resumed with it (and its
    tokens on cells, `image_refit_cell`) fits the refit into its model folder before the calibration, and the card
    says what the images' embedding and grounding's tokens are."""
    from medvlp.artifacts import RunDir
    from medvlp.evaluate import evaluate
    from medvlp.tasks.image_refit import IMAGE_REFIT_RECORD, RIDGES

    assert load_config(None).stages.stage2_align.image_refit is None
    assert load_config(ROOT / "configs" / "demo-2d.yaml").stages.stage2_align.image_refit is None
    demo_3d = load_config(ROOT / "configs" / "demo-3d.yaml").stages.stage2_align
    assert demo_3d.image_refit == ["margins", "levels", "contrast"] and demo_3d.image_refit_cell == 4
    assert load_config(None).stages.stage2_align.image_refit_cell is None
    with pytest.raises(ValueError, match="set image_refit too"):  # cells without the refit whose map they read
        load_config(None, ["stages.stage2-align.image_refit_cell=4"])
    yaml_path, run = tiny_run
    refitted = tmp_path / "run"
    shutil.copytree(run, refitted)
    model_dir = RunDir.open(refitted).model_dir
    calibrated = (model_dir / "calibration.json").stat().st_mtime_ns
    overrides = ["stages.stage2-align.image_refit=[margins,levels]", "stages.stage2-align.image_refit_cell=8"]
    train(load_config(ROOT / "configs" / "tiny-2d.yaml", overrides), yaml_path, refitted, resume=True)
    record = json.loads((model_dir / IMAGE_REFIT_RECORD).read_text())
    assert set(record["val_r10"]) == {"none", *(str(r) for r in RIDGES)} and record["kinds"] == ["margins", "levels"]
    assert (model_dir / "calibration.json").stat().st_mtime_ns > calibrated
    model = RunDir.open(refitted).load_model()
    assert (model.image_refit is None) == (record["ridge"] is None) and record["cell"] == 8
    if model.image_refit is not None:
        grid = [round(n / 8) for n in model.config.image_size]
        assert model.config.image_refit_cell == 8 and record["token_grid"] == grid == list(model.image_refit.grid)
    metrics = evaluate(refitted, yaml_path, tmp_path / "card")
    assert metrics["image_refit"] == (None if record["ridge"] is None else record)
    card = (tmp_path / "card" / "model_card.md").read_text()
    assert ("*Image refit*" in card) == ("cells of about 8 voxels" in card) == (record["ridge"] is not None)
    assert evaluate(run, yaml_path, tmp_path / "plain")["image_refit"] is None


def test_the_side_check_is_a_switch_fitted_after_training_and_the_suite_says_what_it_scored(
    tiny_run: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`side_check`: off by default; on, a finished run resumed with it fits the check into its model folder, the
    robustness suite ranks by the model's pair score and reports the embeddings' ranking beside it."""
    from medvlp.artifacts import RunDir
    from medvlp.evaluate import evaluate
    from medvlp.tasks.side_check import SIDE_CHECK_RECORD, STRENGTHS

    assert load_config(None).stages.stage2_align.side_check is False
    assert load_config(ROOT / "configs" / "demo-2d.yaml").stages.stage2_align.side_check is True
    assert load_config(ROOT / "configs" / "demo-3d.yaml").stages.stage2_align.side_check is False
    monkeypatch.setattr("medvlp.tasks.side_check.MIN_PER_SIDE", 2)  # the 60-study cohort's val has few of a side
    yaml_path, run = tiny_run
    checked = tmp_path / "run"
    shutil.copytree(run, checked)
    plain = evaluate(checked, yaml_path, tmp_path / "plain")
    cfg = load_config(ROOT / "configs" / "tiny-2d.yaml", ["stages.stage2-align.side_check=true"])
    train(cfg, yaml_path, checked, resume=True)
    model_dir = RunDir.open(checked).model_dir
    record = json.loads((model_dir / SIDE_CHECK_RECORD).read_text())
    assert record["strength"] in STRENGTHS and record["axis"] == 0
    assert RunDir.open(checked).load_model().config.side_check_axis == 0
    metrics = evaluate(checked, yaml_path, tmp_path / "card")
    rob = metrics["robustness"]
    assert rob["side_check"] == record and rob["side_edit"] is None
    without = rob["without_side_check"]  # the embeddings alone: the suite of the model before the check
    assert without["mean_accuracy"] == plain["robustness"]["mean_accuracy"]
    assert without["per_perturbation"] == plain["robustness"]["per_perturbation"]
    assert plain["robustness"]["side_check"] is None and "without_side_check" not in plain["robustness"]
    assert metrics["zero_shot"]["mean_auroc"] == plain["zero_shot"]["mean_auroc"]  # not a term of the zero-shot
    assert "*Side check*" in (tmp_path / "card" / "model_card.md").read_text()
