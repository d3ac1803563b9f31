"""The cohort's own words: synonyms in the cohort YAML travel with a trained model (summary.json -> cohort.json) and
are the prompts of evaluation, calibration, the server and ``medvlp predict``; the prompt-prototype section of the
card says it uses the training labels."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from medvlp.artifacts import RunDir, default_cache_dir, find_model_dir
from medvlp.config import load_config
from medvlp.data.cache import COHORT_RECORD, CachedCohort
from medvlp.tasks import zeroshot
from medvlp.tasks.calibration import fit_calibration, load_calibration
from medvlp.tasks.embed import embed_split

ROOT = Path(__file__).resolve().parents[1]
SYNONYMS = {
    "cardiomegaly": ["enlarged cardiac silhouette", "enlarged heart"],
    "pleural_effusion": ["fluid in the pleural space"],
}
SECTIONS = ["findings", "impression"]
OLD_ZERO_SHOT_KEYS = {
    "per_finding",
    "mean_auroc",
    "mean_auprc",
    "mean_f1",
    "mean_ece",
    "n_findings",
    "calibrated",
    "mean_ece_uncalibrated",
    "operating_point",
}
OLD_PER_FINDING_KEYS = {"auroc", "auprc", "f1", "ece", "n_pos", "n_neg", "threshold", "ece_uncalibrated"}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """tiny-2d trained on 40 synthetic radiographs whose cohort YAML gives synonyms."""
    from medvlp.data.synthetic import synthesize
    from medvlp.train.run import train

    root = tmp_path_factory.mktemp("prompts")
    cohort = synthesize("cxr", 40, root / "cxr", seed=11)
    spec = yaml.safe_load(cohort.read_text())
    spec["prompts"] = {"synonyms": SYNONYMS}
    cohort.write_text(yaml.safe_dump(spec))
    train(load_config(ROOT / "configs" / "tiny-2d.yaml"), cohort, root / "run")
    return cohort, root / "run"


def _zero_shot(model, split, findings, prompts) -> np.ndarray:
    return zeroshot.zero_shot_scores(model, split.image, findings, *prompts)


def test_synonyms_reach_the_model_folder_and_its_calibration(run: tuple[Path, Path]) -> None:
    cohort, run_dir = run
    model_dir = find_model_dir(run_dir)
    record = json.loads((model_dir / COHORT_RECORD).read_text())
    assert record["prompts"] == {"synonyms": SYNONYMS, "templates": None}
    cache = CachedCohort.open(default_cache_dir(cohort))
    assert cache.summary["prompts"] == record["prompts"]
    assert zeroshot.prompt_spec(record) == (None, SYNONYMS)
    # calibration, fitted at the end of training, was fitted on the probabilities of the synonym prompts
    model = RunDir.open(run_dir).load_model()
    val = embed_split(model, cache, "val", SECTIONS)
    fitted = load_calibration(model_dir)
    assert fitted is not None
    with_syn = fit_calibration(val.labels, _zero_shot(model, val, cache.findings, (None, SYNONYMS)), cache.findings)
    plain = fit_calibration(val.labels, _zero_shot(model, val, cache.findings, (None, None)), cache.findings)
    for name, c in fitted["findings"].items():
        assert c["a"] == pytest.approx(with_syn["findings"][name]["a"], rel=1e-4, abs=1e-6)
        assert c["b"] == pytest.approx(with_syn["findings"][name]["b"], rel=1e-4, abs=1e-6)
    moved = [n for n in SYNONYMS if n in fitted["findings"]]
    assert moved and any(
        abs(fitted["findings"][n]["a"] - plain["findings"][n]["a"]) > 1e-4
        or abs(fitted["findings"][n]["b"] - plain["findings"][n]["b"]) > 1e-4
        for n in moved
    )


def test_the_server_and_predict_ask_with_the_synonyms(run: tuple[Path, Path], tmp_path: Path) -> None:
    from medvlp.predict import find_studies, predict, read_predictions
    from medvlp.serve.context import resolve_context
    from medvlp.serve.server import load_service
    from medvlp.serve.service import DiagnosisService

    cohort, run_dir = run
    copied = shutil.copytree(find_model_dir(run_dir), tmp_path / "model")  # the model folder alone is enough
    ctx = resolve_context(RunDir.open(copied))
    assert ctx.prompts == (None, SYNONYMS)
    service = load_service(copied, corpus=False)
    findings = service.findings
    model = service.model
    expected = zeroshot.build_prompt_embeddings(model, findings, None, SYNONYMS)
    torch.testing.assert_close(service.prompt_embeddings(findings), expected)
    plain = DiagnosisService(model, dataclasses.replace(ctx, prompts=(None, None)))
    without = plain.prompt_embeddings(findings)
    changed = [findings.index(f) for f in SYNONYMS]
    assert not torch.allclose(without[changed, 0], expected[changed, 0])
    torch.testing.assert_close(without[findings.index("pneumothorax")], expected[findings.index("pneumothorax")])
    # `medvlp predict` answers from the same service: its probabilities move with the prompts
    studies = find_studies(cohort=cohort, split="test", out=tmp_path / "p1")[:3]
    predict(service, studies, tmp_path / "p1", progress=False)
    predict(plain, studies, tmp_path / "p2", progress=False)
    a, b = read_predictions(tmp_path / "p1"), read_predictions(tmp_path / "p2")
    merged = a.merge(b, on=["study", "finding"], suffixes=("_syn", "_plain"))
    assert len(merged) == 3 * len(findings)
    moved = merged[merged["finding"].isin(list(SYNONYMS))]
    assert not np.allclose(moved["probability_syn"], moved["probability_plain"])
    same = merged[merged["finding"] == "pneumothorax"]
    np.testing.assert_allclose(same["probability_syn"], same["probability_plain"], rtol=1e-6)


def test_evaluate_uses_the_synonyms_and_reports_prompt_prototypes_beside(
    run: tuple[Path, Path], tmp_path: Path
) -> None:
    from medvlp.evaluate import evaluate

    cohort, run_dir = run
    card = tmp_path / "card"
    with pytest.raises(ValueError, match="'everything'"):
        evaluate(run_dir, cohort, card, prompts="everything")
    metrics = evaluate(run_dir, cohort, card, prompts="auto")
    written = json.loads((card / "metrics.json").read_text())
    zs = written["zero_shot"]
    assert set(zs) >= OLD_ZERO_SHOT_KEYS and zs["prompts"] == {
        "templates": "default",
        "synonyms": SYNONYMS,
        "form": "sentence",
    }
    for name, m in zs["per_finding"].items():
        assert set(m) >= OLD_PER_FINDING_KEYS, name
    # the card's zero-shot numbers are those of the synonym prompts, not of the bare templates
    run_ = RunDir.open(run_dir)
    model, cache = run_.load_model(), CachedCohort.open(default_cache_dir(cohort))
    val, test = (embed_split(model, cache, s, SECTIONS) for s in ("val", "test"))
    cal = run_.calibration()
    with_syn, _ = zeroshot.zero_shot_task(model, val, test, cache.findings, cal, prompts=(None, SYNONYMS))
    plain, _ = zeroshot.zero_shot_task(model, val, test, cache.findings, cal)
    for name in SYNONYMS:
        got = metrics["zero_shot"]["per_finding"][name]
        assert got["ece_uncalibrated"] == pytest.approx(with_syn["per_finding"][name]["ece_uncalibrated"], rel=1e-9)
        assert abs(got["ece_uncalibrated"] - plain["per_finding"][name]["ece_uncalibrated"]) > 1e-5
    proto = written["prompt_prototype"]
    assert proto["uses_training_labels"] is True and proto["zero_shot"] is False and proto["chosen"] is True
    assert isinstance(proto["mean_auroc"], float) and set(proto["per_finding"]) == set(cache.findings)
    assert set(proto["prototypes"]) == set(cache.findings)
    for name, chosen in proto["prototypes"].items():
        assert set(chosen["fallback"]) <= {"positive", "negative"}
        assert (name in proto["fallback_findings"]) == bool(chosen["fallback"])
    assert "not zero-shot" in written["protocol"]["prompt_prototype"]
    assert {"roc_prompt_prototype.png", "calibration_prompt_prototype.png", "roc_zero_shot.png"} <= {
        p.name for p in card.glob("*.png")
    }


def test_the_cli_refuses_an_unknown_prompt_mode(run: tuple[Path, Path], tmp_path: Path) -> None:
    cohort, run_dir = run
    args = ["--model", str(run_dir), "--cohort", str(cohort), "--out", str(tmp_path / "c"), "--prompts", "magic"]
    r = subprocess.run([sys.executable, "-m", "medvlp", "evaluate", *args], capture_output=True, text=True, check=False)
    assert r.returncode != 0 and "magic" in r.stdout + r.stderr
    assert not (tmp_path / "c" / "metrics.json").exists()
