"""The loop's parts: schedule, optimizers, accumulation, precision, the stage-1 objectives, sharded batches."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from medvlp.config import ImageStageConfig, OptimConfig
from medvlp.data.build import build_cohort
from medvlp.data.cache import CachedCohort
from medvlp.models import create_image_encoder
from medvlp.train.data import StepSchedule
from medvlp.train.loop import lr_lambda, make_optimizer, run_stage
from medvlp.train.runtime import Runtime, resolve_precision
from medvlp.train.stages.image import ImageStage, SimMIM, block_mask
from medvlp.train.stages.text import whole_word_mask


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> CachedCohort:
    from medvlp.data.synthetic import synthesize

    root = tmp_path_factory.mktemp("loop")
    build_cohort(synthesize("cxr", 24, root / "src", seed=5), root / "cache", workers=0)
    return CachedCohort.open(root / "cache")


def test_warmup_then_cosine_to_the_floor() -> None:
    cfg = OptimConfig(steps=110, warmup_steps=10, min_lr_ratio=0.1)
    f = lr_lambda(cfg)
    warm = [f(s) for s in range(10)]
    assert warm == sorted(warm) and warm[-1] < 1.0
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(110) == pytest.approx(0.1)


def test_no_weight_decay_on_biases_and_norms() -> None:
    m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    opt = make_optimizer(m, OptimConfig(weight_decay=0.1))
    decay, no_decay = opt.param_groups
    assert [p.ndim for p in decay["params"]] == [2] and decay["weight_decay"] == 0.1
    assert all(p.ndim == 1 for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0
    assert type(make_optimizer(m, OptimConfig(optimizer="lion"))).__name__ == "Lion"
    for p in m.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        make_optimizer(m, OptimConfig())


def test_precision_choice() -> None:
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) is None
    assert resolve_precision("bf16", cpu) is torch.bfloat16
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        resolve_precision("fp16", cpu)


@pytest.mark.parametrize("method", ["simmim", "simclr"])
def test_image_stage_with_lion_accumulation_and_bf16(method: str, cache: CachedCohort, tmp_path: Path) -> None:
    enc = create_image_encoder("tiny_resnet", 2, (128, 128))
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    cfg = ImageStageConfig(
        method=method,
        steps=4,
        batch_size=4,
        grad_accum=2,
        optimizer="lion",
        lr=1e-3,
        precision="bf16",
        warmup_steps=1,
        log_every=1,
        checkpoint_every=2,
        mask_patch=16,
    )
    out = run_stage(ImageStage(cfg, cache, enc, seed=0), tmp_path, Runtime(torch.device("cpu")), seed=0)
    assert out["steps"] == 4 and math.isfinite(out["loss"])
    log = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    changed = [k for k, v in enc.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])]
    assert len(changed) > len(before) // 2
    assert (tmp_path / "image_encoder.safetensors").is_file()


def test_simmim_learns_to_fill_in(cache: CachedCohort) -> None:
    torch.manual_seed(0)
    net = SimMIM(create_image_encoder("tiny_resnet", 2, (128, 128)), (128, 128))
    x = torch.stack([torch.from_numpy(cache.load_image(s).astype("float32")) for s in cache.records["study"][:8]])
    mask = block_mask(tuple(x.shape), 16, 0.5, torch.Generator().manual_seed(0))
    assert mask.shape == x.shape and abs(float(mask.mean()) - 0.5) < 0.05
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    first = None
    for _ in range(30):
        loss = net(x, mask)
        first = first if first is not None else float(loss.detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.6 * first


def test_whole_word_masking() -> None:
    from transformers import AutoTokenizer

    from medvlp.models.text import default_text_model_path

    tok = AutoTokenizer.from_pretrained(str(default_text_model_path()), local_files_only=True)
    enc = tok(["pneumothorax cardiomegaly effusion"] * 4, return_tensors="pt", padding=True)
    word_ids = [enc.word_ids(b) for b in range(4)]
    masked, labels = whole_word_mask(enc["input_ids"], word_ids, tok, 0.4, torch.Generator().manual_seed(0))
    again, labels2 = whole_word_mask(enc["input_ids"], word_ids, tok, 0.4, torch.Generator().manual_seed(0))
    assert torch.equal(masked, again) and torch.equal(labels, labels2)
    for b in range(4):
        picked = {w for t, w in enumerate(word_ids[b]) if labels[b, t] != -100}
        assert picked, "at least one word is masked"
        for t, w in enumerate(word_ids[b]):  # every piece of a picked word is predicted, nothing else is
            assert (labels[b, t] != -100) == (w in picked)
        assert (labels[b][labels[b] != -100] == enc["input_ids"][b][labels[b] != -100]).all()


def test_masks_depend_on_each_sample_not_on_its_batch() -> None:
    """A sample's stage-1 mask is a function of (seed, step, its dataset index): split the batch (as 2 ranks do,
    with their own padding) and every sample keeps its mask."""
    from transformers import AutoTokenizer

    from medvlp.models.text import default_text_model_path
    from medvlp.train.data import mask_generators

    tok = AutoTokenizer.from_pretrained(str(default_text_model_path()), local_files_only=True)
    texts = ["small left pleural effusion", "no acute cardiopulmonary abnormality seen today", "pneumothorax", "ok"]
    index = [17, 3, 40, 8]

    def text_masks(rows: list[int]) -> list[torch.Tensor]:
        enc = tok([texts[r] for r in rows], return_tensors="pt", padding=True)
        gens = mask_generators(5, 2, [index[r] for r in rows])
        masked, labels = whole_word_mask(enc["input_ids"], [enc.word_ids(b) for b in range(len(rows))], tok, 0.3, gens)
        real = enc["attention_mask"].bool()
        return [torch.stack([masked[b][real[b]], labels[b][real[b]]]) for b in range(len(rows))]

    whole, halves = text_masks([0, 1, 2, 3]), text_masks([0, 1]) + text_masks([2, 3])
    for a, b in zip(whole, halves, strict=True):
        assert torch.equal(a, b)

    shape = (4, 1, 64, 64)
    full = block_mask(shape, 16, 0.5, mask_generators(5, 2, index))
    split = torch.cat([block_mask((2, 1, 64, 64), 16, 0.5, mask_generators(5, 2, index[i : i + 2])) for i in (0, 2)])
    assert torch.equal(full, split)
    assert not torch.equal(full, block_mask(shape, 16, 0.5, mask_generators(5, 3, index))), "a new mask each step"


def test_sharded_batches_are_the_global_batch() -> None:
    one = StepSchedule(n=50, batch_size=8, seed=3)
    ranks = [StepSchedule(n=50, batch_size=4, seed=3, rank=r, world_size=2) for r in range(2)]
    for step in range(20):  # across epochs too
        assert one.indices(step) == ranks[0].indices(step) + ranks[1].indices(step)
    assert one.epoch_of(6) == 1 and one.batches_per_epoch == 6
    with pytest.raises(ValueError, match="larger than the 50 training samples"):
        StepSchedule(n=50, batch_size=32, seed=0, world_size=2)


def test_masked_lm_head_on_masked_positions_only_equals_the_full_forward() -> None:
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from medvlp.models.text import default_text_model_path, quiet_transformers
    from medvlp.train.stages.text import MaskedLM

    path = str(default_text_model_path())
    with quiet_transformers():
        m = AutoModelForMaskedLM.from_pretrained(
            path, local_files_only=True, num_hidden_layers=1, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
        )
    tok = AutoTokenizer.from_pretrained(path)
    enc = tok(
        ["No pleural effusion.", "Moderate cardiomegaly with small bilateral effusions."],
        padding=True,
        return_tensors="pt",
    )
    ids, labels = whole_word_mask(
        enc["input_ids"], [enc.word_ids(b) for b in range(2)], tok, 0.3, torch.Generator().manual_seed(0)
    )
    ref = m(input_ids=ids, attention_mask=enc["attention_mask"], labels=labels).loss
    ref.backward()
    g_ref = {k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None}
    m.zero_grad()
    loss = MaskedLM(m)(ids, enc["attention_mask"], labels)
    loss.backward()
    torch.testing.assert_close(loss, ref)
    for k, p in m.named_parameters():
        if k in g_ref:
            torch.testing.assert_close(p.grad, g_ref[k], rtol=1e-4, atol=1e-4, msg=k)


def _image_run(cache: CachedCohort, out: Path, num_workers: int, resume: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    enc = create_image_encoder("tiny_resnet", 2, (128, 128))
    cfg = ImageStageConfig(
        steps=3, batch_size=4, lr=1e-3, warmup_steps=1, log_every=1, checkpoint_every=3, mask_patch=16
    )
    run_stage(
        ImageStage(cfg, cache, enc, seed=0),
        out,
        Runtime(torch.device("cpu")),
        seed=0,
        resume=resume,
        num_workers=num_workers,
    )
    return enc


def test_worker_processes_do_not_change_the_result(cache: CachedCohort, tmp_path: Path) -> None:
    a = _image_run(cache, tmp_path / "w0", num_workers=0).state_dict()
    b = _image_run(cache, tmp_path / "w2", num_workers=2).state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resuming_a_finished_stage_restores_lost_final_outputs(cache: CachedCohort, tmp_path: Path) -> None:
    _image_run(cache, tmp_path, num_workers=0)
    final = tmp_path / "image_encoder.safetensors"
    saved = final.read_bytes()
    final.unlink()  # as if killed between the last checkpoint and the final save
    _image_run(cache, tmp_path, num_workers=0, resume=True)
    assert final.read_bytes() == saved


def test_lr_plan_scales_and_delays_parameter_groups() -> None:
    from medvlp.train.loop import LrPlan, param_groups

    m = torch.nn.ModuleDict({"body": torch.nn.Linear(4, 4), "head": torch.nn.Linear(4, 2)})
    cfg = OptimConfig(lr=1e-3, steps=20, warmup_steps=2)
    groups = param_groups(m, cfg, lambda n: LrPlan(0.1, 5) if n.startswith("body.") else LrPlan())
    assert len(groups) == 4  # (decay, no decay) x (body, head)
    body = {id(p) for p in m["body"].parameters()}
    for g in groups:
        in_body = {id(p) in body for p in g["params"]}
        assert len(in_body) == 1
        assert (g["lr"], g["delay"]) == ((pytest.approx(1e-4), 5) if in_body == {True} else (pytest.approx(1e-3), 0))
    f = lr_lambda(cfg, delay=5)
    assert [f(s) for s in range(5)] == [0.0] * 5 and f(5) > 0
    assert f(20) == pytest.approx(cfg.min_lr_ratio)  # the delayed schedule still ends at the floor


def test_text_stage_trains_its_new_head_alone_first(cache: CachedCohort, tmp_path: Path) -> None:
    from medvlp.config import TextStageConfig
    from medvlp.train.stages.text import TextStage

    cfg = TextStageConfig(steps=3, batch_size=4, head_only_steps=2, lr=1e-3, log_every=1, checkpoint_every=10)
    stage = TextStage(cfg, cache, ["findings", "impression"], seed=0, num_layers=1, max_length=32)
    body = {k: v.clone() for k, v in stage.model.base_model.state_dict().items()}
    head = {k: v.clone() for k, v in stage.model.cls.state_dict().items()}

    def moved(module: torch.nn.Module, before: dict[str, torch.Tensor]) -> int:
        return sum(not torch.equal(v, before[k]) for k, v in module.state_dict().items() if v.is_floating_point())

    cfg2 = cfg.model_copy(update={"steps": 2})
    stage.config = cfg2
    run_stage(stage, tmp_path / "a", Runtime(torch.device("cpu")), seed=0)
    assert moved(stage.model.base_model, body) == 0, "the encoder must hold still while the head warms up"
    assert moved(stage.model.cls, head) > 0
    stage2 = TextStage(cfg, cache, ["findings", "impression"], seed=0, num_layers=1, max_length=32)
    run_stage(stage2, tmp_path / "b", Runtime(torch.device("cpu")), seed=0)
    assert moved(stage2.model.base_model, body) > 0, "after the head-only steps the encoder learns too"
