"""Where a served model's training preprocessing, findings, corpus and card come from; never guessed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from medvlp.artifacts import RunDir, find_card, find_model_dir
from medvlp.data.cohort import PreprocessSpec, load_spec
from medvlp.models import MedVLP
from medvlp.serve.context import COHORT_RECORD, ServingContext, cohort_record, resolve_context
from medvlp.serve.service import DiagnosisService

from .conftest import TinyRun


def test_a_run_folder_names_its_cache(tiny_run: TinyRun) -> None:
    run = tiny_run.run
    model_dir = find_model_dir(run)
    assert model_dir == run / "stage2-align" / "model"
    ctx = resolve_context(RunDir.open(run))
    summary = json.loads((tiny_run.cache / "summary.json").read_text())
    assert ctx.preprocess == PreprocessSpec.model_validate(summary["preprocess"])
    assert ctx.findings == summary["findings"] and ctx.cohort == cohort_record(summary)
    assert ctx.cache_dir == tiny_run.cache and ctx.metrics_path == run / "card" / "metrics.json"
    assert ctx.report_sections == ["findings", "impression"]


def test_a_copied_model_folder_needs_its_record_or_the_cohort(tiny_run: TinyRun, tmp_path: Path) -> None:
    model_dir = shutil.copytree(find_model_dir(tiny_run.run), tmp_path / "model")
    own = resolve_context(RunDir.open(model_dir))  # training left cohort.json in the model folder: enough alone
    assert own.preprocess == load_spec(tiny_run.cohort).preprocessing and own.cache_dir is None
    (model_dir / COHORT_RECORD).unlink()
    with pytest.raises(ValueError, match="--cohort"):
        resolve_context(RunDir.open(model_dir))
    from_yaml = resolve_context(RunDir.open(model_dir), cohort_yaml=tiny_run.cohort)
    spec = load_spec(tiny_run.cohort)
    assert from_yaml.preprocess == spec.preprocessing and from_yaml.findings == spec.findings
    assert from_yaml.cache_dir == tiny_run.cache  # the corpus, found beside the cohort
    record = cohort_record(json.loads((tiny_run.cache / "summary.json").read_text())) | {"findings": ["ascites"]}
    (model_dir / COHORT_RECORD).write_text(json.dumps(record))
    assert resolve_context(RunDir.open(model_dir), cohort_yaml=tiny_run.cohort).findings == ["ascites"]
    assert resolve_context(RunDir.open(model_dir)).cache_dir is None  # no corpus without a cohort


def test_cards_and_bad_paths(tiny_run: TinyRun, tmp_path: Path) -> None:
    card = tiny_run.run / "card"
    assert find_card(tmp_path, card) == card / "metrics.json"
    assert find_card(tmp_path, card / "metrics.json") == card / "metrics.json"
    assert find_card(tmp_path) is None
    with pytest.raises(FileNotFoundError, match="no evaluation card"):
        find_card(tmp_path, tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="not a built cohort cache"):
        resolve_context(RunDir.open(tiny_run.run), cache_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="no medvlp model"):
        find_model_dir(tmp_path)


def test_a_preprocessing_that_does_not_fit_the_model_is_refused(tiny_run: TinyRun) -> None:
    model = MedVLP.from_pretrained(find_model_dir(tiny_run.run))
    ctx = ServingContext(cohort={}, preprocess=PreprocessSpec(size=(96, 96)), findings=[])
    with pytest.raises(ValueError, match=r"\[96, 96\] images but the model reads \[128, 128\]"):
        DiagnosisService(model, ctx)


def test_the_server_answers_with_the_mined_sentences_of_its_calibration(tiny_run: TinyRun) -> None:
    """A calibration whose val choice was the `mined` form: the server embeds those sentences for the model's own
    findings and the templates for a finding asked for by name."""
    import dataclasses

    import torch

    from medvlp.tasks import zeroshot

    ctx = resolve_context(RunDir.open(tiny_run.run))
    model = MedVLP.from_pretrained(find_model_dir(tiny_run.run)).eval()
    first = ctx.findings[0]
    mined = {first: {"positive": ["A finding as the reports say it."], "negative": ["No such thing is seen."]}}
    calibration = dict(ctx.calibration or {}) | {
        "prompt_form": "mined",
        "mined_prompts": {first: mined[first] | {"fallback": []}},
    }
    service = DiagnosisService(model, dataclasses.replace(ctx, calibration=calibration))
    asked = [*ctx.findings, "small left pleural effusion"]
    got = service.prompt_embeddings(asked)
    expected = zeroshot.build_prompt_embeddings(model, asked, *ctx.prompts, form="mined", mined=mined)
    torch.testing.assert_close(got, expected)
    own = zeroshot.embed_prompt_sets(model, [mined[first]])
    torch.testing.assert_close(got[0], own[0])
    plain = zeroshot.build_prompt_embeddings(model, asked[1:], *ctx.prompts)  # the rest: templates, `sentence`
    torch.testing.assert_close(got[1:], plain)
    assert service.describe()["calibration"]["prompt_form"] == "mined"


def test_the_server_answers_with_the_report_prototypes_of_its_calibration(tiny_run: TinyRun) -> None:
    """A calibration whose val choice was `mined_reports`: the server (and so its exports) answers with the stored
    vectors for the model's own findings, the templates for a finding asked for by name, and says which form."""
    import dataclasses

    import torch

    from medvlp.tasks import zeroshot

    ctx = resolve_context(RunDir.open(tiny_run.run))
    model = MedVLP.from_pretrained(find_model_dir(tiny_run.run)).eval()
    first, dim = ctx.findings[0], int(model.config.embed_dim)
    vectors = {"positive": [1.0] + [0.0] * (dim - 1), "negative": [0.0, 1.0] + [0.0] * (dim - 2)}
    calibration = dict(ctx.calibration or {}) | {
        "prompt_form": "mined_reports",
        "mined_report_prototypes": {first: vectors | {"reports": {"positive": 5, "negative": 7}}},
    }
    service = DiagnosisService(model, dataclasses.replace(ctx, calibration=calibration))
    asked = [*ctx.findings, "small left pleural effusion"]
    got = service.prompt_embeddings(asked)
    torch.testing.assert_close(got[0], torch.tensor([vectors["positive"], vectors["negative"]]))
    plain = zeroshot.build_prompt_embeddings(model, asked[1:], *ctx.prompts)  # the rest: templates, `sentence`
    torch.testing.assert_close(got[1:], plain)
    assert service.describe()["calibration"]["prompt_form"] == "mined_reports"
