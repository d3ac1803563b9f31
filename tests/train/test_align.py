"""Stage 2 in the loop: the temperature's post-step clamp, validation on `val`, best-checkpoint selection."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from medvlp.config import AlignStageConfig
from medvlp.data.build import build_cohort
from medvlp.data.cache import CachedCohort
from medvlp.models import ModelConfig, load_model
from medvlp.train.loop import param_groups, run_stage
from medvlp.train.runtime import Runtime, seed_everything
from medvlp.train.select import BestTracker
from medvlp.train.stages.align import MAX_LOG_SCALE, AlignStage

CPU = Runtime(torch.device("cpu"))
SECTIONS = ["findings", "impression"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> CachedCohort:
    from medvlp.data.synthetic import synthesize

    root = tmp_path_factory.mktemp("align")
    build_cohort(synthesize("cxr", 40, root / "src", seed=6), root / "cache", workers=0)
    return CachedCohort.open(root / "cache")


def _model_config(cache: CachedCohort, **kw) -> ModelConfig:
    return ModelConfig(
        image_encoder="tiny_resnet",
        spatial_dims=2,
        image_size=tuple(cache.summary["preprocess"]["size"]),
        text_num_layers=1,
        text_max_length=32,
        embed_dim=32,
        **kw,
    )


def _stage(cache: CachedCohort, model_kw: dict | None = None, **cfg) -> AlignStage:
    base = {"steps": 4, "batch_size": 4, "lr": 1e-3, "warmup_steps": 0, "log_every": 1, "checkpoint_every": 2}
    seed_everything(0)  # the same initial weights for every stage built here, as `train` does per stage
    return AlignStage(
        AlignStageConfig(**(base | cfg)), cache, _model_config(cache, **(model_kw or {})), SECTIONS, seed=0
    )


def test_logit_scale_is_clamped_after_the_optimizer_step_not_in_the_forward(
    cache: CachedCohort, tmp_path: Path
) -> None:
    stage = _stage(cache, {"init_logit_scale": 5.0}, steps=1)
    batch = stage.collate([stage.dataset()[i] for i in range(4)])
    stage.training_forward(stage.module(), batch, 0)
    assert stage.model.logit_scale.item() == 5.0, "the forward must not change a parameter"

    run_stage(stage, tmp_path / "high", CPU, seed=0)
    assert stage.model.logit_scale.item() == pytest.approx(MAX_LOG_SCALE), "clamped after the step"
    saved = torch.load(tmp_path / "high" / "checkpoint.pt", weights_only=False)["module"]["model.logit_scale"]
    assert float(saved) == pytest.approx(math.log(100.0))

    low = _stage(cache, {"init_logit_scale": -1.0}, steps=1)
    run_stage(low, tmp_path / "low", CPU, seed=0)
    assert low.model.logit_scale.item() == 0.0, "the lower bound is ln 1"


def test_the_loop_calls_after_step_once_per_optimizer_step(cache: CachedCohort, tmp_path: Path) -> None:
    stage = _stage(cache, steps=3, grad_accum=2)
    seen: list[float] = []
    before = stage.model.logit_scale.item()
    stage.after_step = lambda: seen.append(stage.model.logit_scale.item())  # type: ignore[method-assign]
    run_stage(stage, tmp_path, CPU, seed=0)
    assert len(seen) == 3, "once per optimizer step, not per micro-batch"
    assert seen[0] != before, "after the optimizer has updated the parameters"


# ------------------------------------------------------------------------------------------ validation
def test_best_tracker_ties_count_against_the_model() -> None:
    net = torch.nn.Linear(2, 1)
    t = BestTracker("val/zero_shot_auroc", patience=2)
    for step, value in ((1, float("nan")), (2, 0.6), (3, 0.7), (4, 0.7), (5, 0.65)):
        with torch.no_grad():
            net.bias.fill_(step)
        t.update(step, {"val/zero_shot_auroc": value}, net)
    assert (t.step, t.value, t.bad, t.should_stop) == (3, 0.7, 2, True), "a tie does not replace the best"
    assert float(t.weights["bias"]) == 3.0
    low = BestTracker("val/loss")
    for step, value in ((1, 2.0), (2, 1.5), (3, 1.5)):
        low.update(step, {"val/loss": value}, net)
    assert (low.step, low.mode, low.should_stop) == (2, "min", False)
    with pytest.raises(ValueError, match="val/auc"):
        BestTracker("val/auc")


def test_selection_needs_validation() -> None:
    with pytest.raises(ValidationError, match="needs val_every"):
        AlignStageConfig(select_metric="val/r10")
    with pytest.raises(ValidationError, match="needs select_metric"):
        AlignStageConfig(val_every=5, patience=2)


def test_mining_topic_readers_are_named() -> None:
    assert AlignStageConfig().mining_topic_readers == ["model"]
    assert AlignStageConfig(mining_topic_readers=["model", "general"]).mining_topic_readers == ["model", "general"]
    with pytest.raises(ValidationError, match="mining_topic_readers"):
        AlignStageConfig(mining_topic_readers=["oracle"])
    with pytest.raises(ValidationError, match="mining_topic_readers"):
        AlignStageConfig(mining_topic_readers=[])


def _val_records(path: Path) -> list[dict]:
    return [r for r in map(json.loads, path.read_text().splitlines()) if "val/loss" in r]


def test_validation_keeps_the_best_step_as_the_model(cache: CachedCohort, tmp_path: Path) -> None:
    stage = _stage(cache, steps=6, val_every=2, select_metric="val/zero_shot_auroc", checkpoint_every=3, lr=3e-3)
    weights: dict[int, dict[str, torch.Tensor]] = {}
    clamp = stage.after_step

    def after_step() -> None:
        clamp()
        weights[len(weights) + 1] = {k: v.clone() for k, v in stage.model.state_dict().items()}

    stage.after_step = after_step  # type: ignore[method-assign]
    result = run_stage(stage, tmp_path, CPU, seed=0)

    evals = _val_records(tmp_path / "log.jsonl")
    assert [r["step"] for r in evals] == [2, 4, 6]
    for r in evals:
        assert {"loss", "val/zero_shot_auroc", "val/r10", "val/loss", "best_step"} <= r.keys()
        assert 0 <= r["val/r10"] <= 1 and r["val/loss"] > 0
    values = [r["val/zero_shot_auroc"] for r in evals]
    best_step = evals[values.index(max(values))]["step"]  # the first of equal maxima
    best = json.loads((tmp_path / "best.json").read_text())
    assert best == {
        "metric": "val/zero_shot_auroc",
        "mode": "max",
        "step": best_step,
        "value": pytest.approx(max(values), abs=1e-6),
        "last_step": 6,
        "stopped_early": False,
    }
    assert result["best"]["step"] == best_step and result["stopped_early"] is False
    assert evals[-1]["best_step"] == best_step

    saved = load_model(tmp_path / "model")  # the model folder holds the best step's weights
    for k, v in saved.state_dict().items():
        torch.testing.assert_close(v, weights[best_step][k], rtol=0, atol=0, msg=k)

    # the logged number is what the task functions give for the saved model on val
    from medvlp.tasks.zeroshot import (
        build_prompt_embeddings,
        classification_metrics,
        model_logit_scale,
        zero_shot_probabilities,
    )

    val = cache.split("val")
    with torch.no_grad():
        images = torch.stack([torch.from_numpy(cache.load_image(s).astype("float32")) for s in val["study"]])
        emb = saved.encode_image(images)
    probs = zero_shot_probabilities(emb, build_prompt_embeddings(saved, cache.findings), model_logit_scale(saved))
    auroc = classification_metrics(val[cache.findings].astype("float32").to_numpy(), probs, cache.findings)
    assert auroc["mean_auroc"] == pytest.approx(best["value"], abs=1e-5)


def test_early_stopping_on_a_tie_and_a_stopped_run_stays_stopped(cache: CachedCohort, tmp_path: Path) -> None:
    stage = _stage(cache, steps=10, val_every=1, select_metric="val/loss", patience=1, lr=1e-12, image_lr_scale=0)
    result = run_stage(stage, tmp_path, CPU, seed=0)
    assert result["steps"] == 2 and result["stopped_early"] and result["best"]["step"] == 1
    assert [r["step"] for r in _val_records(tmp_path / "log.jsonl")] == [1, 2]
    again = run_stage(_stage(cache, **stage.config.model_dump()), tmp_path, CPU, seed=0, resume=True)
    assert again["steps"] == 2 and again["stopped_early"] and again["best"] == result["best"]


class _Kill(Exception):
    pass


def test_a_killed_run_resumes_across_a_val_evaluation(cache: CachedCohort, tmp_path: Path) -> None:
    cfg = {"steps": 6, "val_every": 2, "select_metric": "val/r10", "checkpoint_every": 3, "lr": 3e-3}
    full = run_stage(_stage(cache, **cfg), tmp_path / "full", CPU, seed=0)

    def kill_at_5(step: int, total: int) -> None:
        if step == 5:  # after the checkpoint at 3, which carries the best of the evaluation at 2
            raise _Kill

    with pytest.raises(_Kill):
        run_stage(_stage(cache, **cfg), tmp_path / "cut", CPU, seed=0, on_step=kill_at_5)
    assert torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=False)["best"]["step"] == 2
    cut = run_stage(_stage(cache, **cfg), tmp_path / "cut", CPU, seed=0, resume=True)
    assert cut["resumed_from"] == 3 and cut["best"] == full["best"]

    def strip(path: Path) -> list[dict]:
        return [{k: v for k, v in json.loads(x).items() if k != "samples_per_s"} for x in path.read_text().splitlines()]

    assert strip(tmp_path / "cut" / "log.jsonl") == strip(tmp_path / "full" / "log.jsonl")
    assert (tmp_path / "cut" / "best.json").read_text() == (tmp_path / "full" / "best.json").read_text()
    a, b = (load_file(str(tmp_path / r / "model" / "model.safetensors")) for r in ("full", "cut"))
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_validation_under_bf16_autocast_computes_its_metrics_in_fp32(cache: CachedCohort) -> None:
    stage = _stage(cache, val_every=1)
    plain = stage.validate(batch_size=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what the loop does with precision: bf16 on a CPU
        mixed = stage.validate(batch_size=4)
    assert set(mixed) == set(plain) and all(math.isfinite(v) for v in mixed.values())
    assert mixed["val/zero_shot_auroc"] == pytest.approx(plain["val/zero_shot_auroc"], abs=0.1)


def test_label_aware_targets_group_studies_with_the_same_labels(cache: CachedCohort) -> None:
    """`false_negatives: labels`: fully labelled studies with the same finding labels are positives of each other;
    a study with an unknown label is only its own positive; `report` groups by the report's text instead."""
    from medvlp.losses.contrastive import duplicate_groups

    stage = _stage(cache, false_negatives="labels")
    ds = stage.dataset()
    batch = stage.collate([ds[(i, 0)] for i in range(len(cache.split("train")))])
    labels = batch["labels"].clone()
    labels[0] = -1.0  # one unknown label
    labels[1] = labels[2]
    groups = duplicate_groups(stage._keys(batch | {"labels": labels})).tolist()
    same = [(i, j) for i in range(len(groups)) for j in range(i) if groups[i] == groups[j]]
    assert same and all(bool((labels[i] == labels[j]).all()) for i, j in same), "same group, same labels"
    assert groups[1] == groups[2] and groups.count(groups[0]) == 1
    assert len(set(groups)) < len(set(batch["text"])), "fewer groups than reports: labels merge different reports"
    by_report = duplicate_groups(_stage(cache, false_negatives="report")._keys(batch)).tolist()
    assert len(set(by_report)) == len(set(batch["text"]))
    assert _stage(cache, false_negatives="none")._keys(batch) is None


def test_head_lr_scale_gives_the_image_towers_new_heads_their_own_rate(cache: CachedCohort) -> None:
    blobs = {"image_encoder_args": {"blobs": True}}
    same = _stage(cache, blobs, image_lr_scale=0.5)
    fast = _stage(cache, blobs, image_lr_scale=0.5, head_lr_scale=10.0)
    head, body = "model.image_encoder.blobs.proj.weight", "model.image_encoder.backbone.conv1.weight"
    assert same.lr_plan(head).scale == same.lr_plan(body).scale == 0.5, "None: the heads move with the tower"
    assert fast.lr_plan(head).scale == 10.0 and fast.lr_plan(body).scale == 0.5
    assert fast.lr_plan("model.text_encoder.embeddings.word_embeddings.weight").scale == 0.1

    def moved(stage: AlignStage) -> float:
        opt = torch.optim.AdamW(param_groups(stage.module(), stage.config, stage.lr_plan), lr=stage.config.lr, eps=1e-6)
        batch = stage.collate([stage.dataset()[i] for i in range(4)])
        stage.training_forward(stage.module(), batch, 0)["loss"].backward()
        opt.step()
        return stage.model.image_encoder.blobs.proj.weight.abs().max().item()  # it starts at zero

    assert moved(fast) == pytest.approx(20 * moved(same), rel=1e-3), "Adam's first step is the rate itself"


def test_branch_weight_aligns_the_spot_statistics_branch_alone_with_the_reports_held_fixed(cache: CachedCohort) -> None:
    with pytest.raises(ValueError, match="has none here"):
        _stage(cache, branch_weight=1.0)  # a tower without the statistics has no branch
    blobs = {"image_encoder_args": {"blobs": True}}
    plain, aligned = _stage(cache, blobs), _stage(cache, blobs, branch_weight=0.5)
    aligned.model.load_state_dict(plain.model.state_dict())
    batch = plain.collate([plain.dataset()[i] for i in range(4)])
    plain.model.eval(), aligned.model.eval()  # no dropout, fixed batch norms: the two forwards must agree
    base = plain.training_forward(plain.module(), batch, 0)
    terms = aligned.training_forward(aligned.module(), batch, 0)
    assert "branch" not in base and terms["branch"] > 0
    torch.testing.assert_close(terms["loss"], base["loss"] + 0.5 * terms["branch"])

    with torch.no_grad():  # the term is the plain contrastive loss of the branch alone against the reports
        image = aligned.model.forward_image(batch["image"], with_branch=True)
        reports = aligned.model.encode_text(batch["tokens"])
        again = aligned.branch_loss(image.branch, reports, aligned.model.logit_scale.exp(), keys=aligned._keys(batch))
    torch.testing.assert_close(terms["branch"], again["contrastive"])
    assert not torch.allclose(image.branch, image.embedding), "the branch is not the whole embedding"

    aligned.model.zero_grad()
    terms["branch"].backward()
    head = aligned.model.image_encoder.blobs
    assert head is not None and head.proj.weight.grad is not None and head.proj.weight.grad.abs().sum() > 0
    text_grads = [p.grad for p in aligned.model.text_encoder.parameters() if p.grad is not None]
    assert all(g.abs().sum() == 0 for g in text_grads), "the reports are held fixed in the branch term"
    tower = aligned.model.image_encoder.backbone.conv1.weight.grad
    assert tower is None or tower.abs().sum() == 0, "the statistics are fixed: the tower gets nothing from it"
