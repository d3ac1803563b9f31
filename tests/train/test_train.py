"""Training: a tiny run end to end, exact resume after a kill, and torchrun (2 gloo ranks == 1 process)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from medvlp.config import ConfigError, load_config
from medvlp.models import create_image_encoder, load_model
from medvlp.train.run import train

ROOT = Path(__file__).resolve().parents[2]
TINY_2D = ROOT / "configs" / "tiny-2d.yaml"
TINY_3D = ROOT / "configs" / "tiny-3d.yaml"


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from medvlp.data.synthetic import synthesize

    return synthesize("cxr", 48, tmp_path_factory.mktemp("train-cxr"), seed=3)


def _params(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / "model.safetensors"))


def _log(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def test_tiny_run_end_to_end(cohort: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    cfg = load_config(TINY_2D)
    results = train(cfg, cohort, run)
    assert list(results) == ["stage1-text", "stage1-image", "stage2-align"]
    for stage, steps in (("stage1-text", 6), ("stage1-image", 6), ("stage2-align", 10)):
        log = _log(run / stage / "log.jsonl")
        assert [r["step"] for r in log] == list(range(2, steps + 1, 2)), stage
        assert all("loss" in r and r["loss"] == r["loss"] for r in log), stage
        assert (run / stage / "checkpoint.pt").is_file()
    evals = [r["step"] for r in _log(run / "stage2-align" / "log.jsonl") if "val/zero_shot_auroc" in r]
    assert evals == [4, 8, 10], "stage 2 is evaluated on val every val_every steps and at the last"
    assert (run / "stage1-text" / "text" / "config.json").is_file()  # a plain transformers folder
    assert (run / "stage1-image" / "image_encoder.safetensors").is_file()
    resolved = load_config(run / "config.yaml")
    assert resolved == cfg  # the run folder's config repeats the run
    info = json.loads((run / "run.json").read_text())
    assert info["code"]["medvlp"] and "git_commit" in info["code"] and info["world_size"] == 1

    # the model folder carries what using it on new images needs: the preprocessing and the findings
    record = json.loads((run / "stage2-align" / "model" / "cohort.json").read_text())
    from medvlp.artifacts import default_cache_dir

    summary = json.loads((default_cache_dir(cohort) / "summary.json").read_text())
    assert record["preprocess"] == summary["preprocess"] and record["findings"] == summary["findings"]
    assert record["spatial_dims"] == 2

    # stage 2 started from both stage-1 results
    model = load_model(run)
    assert model.text_encoder.num_layers == 1
    stage1_img = load_file(str(run / "stage1-image" / "image_encoder.safetensors"))
    assert stage1_img, "stage 1 image weights saved"
    x = torch.rand(2, 1, 128, 128)
    with torch.no_grad():
        img = model.encode_image(x)
        txt = model.encode_text(["No pleural effusion.", "Large right pleural effusion."])
    assert img.shape == txt.shape == (2, 64)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(2))


def test_tiny_3d_run(tmp_path: Path) -> None:
    from medvlp.data.synthetic import synthesize

    yaml_path = synthesize("ct", 20, tmp_path / "ct", seed=4)
    cfg = load_config(
        TINY_3D, ["stages.stage1-text.enabled=false", "stages.stage2-align.steps=4", "stages.stage1-image.steps=2"]
    )
    results = train(cfg, yaml_path, tmp_path / "run")
    assert list(results) == ["stage1-image", "stage2-align"]
    model = load_model(tmp_path / "run")
    with torch.no_grad():
        emb = model.encode_image(torch.rand(1, 1, 64, 64, 32))
    assert emb.shape == (1, 64) and torch.isfinite(emb).all()


def test_channels_last_trains_the_same_model_in_another_memory_order(tmp_path: Path) -> None:
    """`channels_last: true` keeps the 3D kernels in channels_last_3d order (the checkpoint says so) and trains the
    same model as the default order, up to float rounding; what it saves loads like any other run."""
    from medvlp.data.synthetic import synthesize

    yaml_path = synthesize("ct", 20, tmp_path / "ct", seed=4)
    runs = {}
    for on in (False, True):
        over = ["stages.stage1-text.enabled=false", "stages.stage2-align.steps=4", "stages.stage1-image.steps=2"]
        over += [f"stages.{s}.channels_last={str(on).lower()}" for s in ("stage1-image", "stage2-align")]
        train(load_config(TINY_3D, over), yaml_path, tmp_path / f"run-{on}")
        runs[on] = tmp_path / f"run-{on}"
    kernels = {
        k: v
        for k, v in torch.load(runs[True] / "stage2-align" / "checkpoint.pt", weights_only=False)["module"].items()
        if v.dim() == 5
    }
    assert kernels and all(v.is_contiguous(memory_format=torch.channels_last_3d) for v in kernels.values())
    assert not all(v.is_contiguous() for v in kernels.values()), "some kernels are stored in another order"
    # A kernel in another memory order rounds differently (how much depends on the CPU's kernels), and Adam, which
    # moves a weight by about lr per step whatever the size of its gradient, turns a rounding difference in a
    # near-zero gradient into one of up to ~lr per step: the first logged loss agrees to rounding, the later ones
    # and the weights within what 4 steps at lr 1e-3 (tiny-3d's stage 2) can drift, not beyond.
    for stage in ("stage1-image", "stage2-align"):
        a, b = _log(runs[False] / stage / "log.jsonl"), _log(runs[True] / stage / "log.jsonl")
        assert b[0]["loss"] == pytest.approx(a[0]["loss"], rel=1e-3, abs=1e-4)
        assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=1e-2, abs=1e-4)
    a, b = _params(runs[False] / "stage2-align" / "model"), _params(runs[True] / "stage2-align" / "model")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=5e-2, atol=2 * 4 * 1e-3) for k in a)
    with torch.no_grad():
        assert torch.isfinite(load_model(runs[True]).encode_image(torch.rand(1, 1, 64, 64, 32))).all()


def test_tiny_3d_run_grounds_on_finer_tokens(tmp_path: Path) -> None:
    """token_stage 3 with the phrase-box term: the saved model answers tokens on a grid twice as fine, its laterals
    trained away from zero, and the evaluation grounds on them."""
    from medvlp.data.synthetic import synthesize
    from medvlp.evaluate import evaluate

    yaml_path = synthesize("ct", 20, tmp_path / "ct", seed=4)
    sets = ["stages.stage1-text.enabled=false", "stages.stage1-image.enabled=false", "stages.stage2-align.steps=4"]
    sets += ["stages.stage2-align.box_weight=1.0", "model.image_encoder_args={token_stage: 3}"]
    train(load_config(TINY_3D, sets), yaml_path, tmp_path / "run")
    model = load_model(tmp_path / "run")
    assert model.image_encoder.laterals["3"].weight.abs().sum() > 0
    with torch.no_grad():
        _, grid = model.encode_image_tokens(torch.rand(1, 1, 64, 64, 32))
    last = create_image_encoder("tiny_resnet", 3, (64, 64, 32)).eval()(torch.rand(1, 1, 64, 64, 32)).grid
    assert grid == tuple(2 * g for g in last)
    metrics = evaluate(tmp_path / "run", yaml_path, tmp_path / "card", baselines=False)
    assert metrics["grounding"]["n"] > 0 and metrics["grounding"]["supervised"] is True


def _cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "medvlp", "train", *args]


ALIGN_ONLY = [
    "--stages",
    "stage2-align",
    "--set",
    "stages.stage2-align.steps=12",
    "--set",
    "stages.stage2-align.checkpoint_every=4",
    "--set",
    "stages.stage2-align.log_every=1",
    "--set",
    "stages.stage2-align.select_metric=val/loss",  # evaluated at 4, 8, 12 (tiny-2d's val_every): a kill falls between
]


def test_killed_run_resumes_exactly(cohort: Path, tmp_path: Path) -> None:
    full = tmp_path / "full"
    r = subprocess.run(
        _cmd("--config", str(TINY_2D), "--cohort", str(cohort), "--out", str(full), *ALIGN_ONLY),
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0, r.stderr[-3000:]

    cut = tmp_path / "cut"
    proc = subprocess.Popen(
        _cmd("--config", str(TINY_2D), "--cohort", str(cohort), "--out", str(cut), *ALIGN_ONLY),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    ckpt = cut / "stage2-align" / "checkpoint.pt"
    deadline = time.time() + 300
    while time.time() < deadline and not ckpt.exists() and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert ckpt.exists(), err[-3000:]
    step_at_kill = torch.load(ckpt, weights_only=False)["step"]
    assert step_at_kill < 12, "the run finished before it was killed: the test proves nothing"
    assert not (cut / "stage2-align" / "model").exists()

    r = subprocess.run(
        _cmd("--config", str(TINY_2D), "--cohort", str(cohort), "--out", str(cut), *ALIGN_ONLY, "--resume"),
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = _params(full / "stage2-align" / "model"), _params(cut / "stage2-align" / "model")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    log_full, log_cut = _log(full / "stage2-align" / "log.jsonl"), _log(cut / "stage2-align" / "log.jsonl")
    assert [r["step"] for r in log_cut] == list(range(1, 13))
    assert [r["loss"] for r in log_cut] == [r["loss"] for r in log_full]
    val = ("step", "val/zero_shot_auroc", "val/r10", "val/loss", "best_step")
    evals_full = [{k: r.get(k) for k in val} for r in log_full if "val/loss" in r]
    assert [r["step"] for r in evals_full] == [4, 8, 12]
    assert [{k: r.get(k) for k in val} for r in log_cut if "val/loss" in r] == evals_full
    best = json.loads((cut / "stage2-align" / "best.json").read_text())
    assert best == json.loads((full / "stage2-align" / "best.json").read_text())
    assert best["step"] == evals_full[-1]["best_step"] and best["metric"] == "val/loss"


def _per_stage(**values: object) -> list[str]:
    return [
        arg
        for stage in ("stage1-text", "stage1-image", "stage2-align")
        for key, value in values.items()
        for arg in ("--set", f"stages.{stage}.{key}={value}")
    ]


def test_torchrun_two_ranks_equal_one_process_on_the_global_batch(cohort: Path, tmp_path: Path) -> None:
    """2 gloo ranks x batch 4 == 1 process x batch 8, every stage: same losses, same weights after 3 steps each.

    Stage 1 masks each report and image by its own dataset index, and normalizes by the global count of masked
    tokens/voxels, so the split of the global batch over ranks changes nothing.
    """
    common = [
        "--config",
        str(TINY_2D),
        "--cohort",
        str(cohort),
        "--set",
        "model.image_encoder=tiny_vit",  # LayerNorm: no per-rank batch statistics
        "--set",
        "model.text_dropout=0.0",
        *_per_stage(steps=3, log_every=1, clip_grad="null"),
        "--cache",
        str(tmp_path / "cache"),
    ]
    one = subprocess.run(
        [*_cmd(*common, "--out", str(tmp_path / "one")), *_per_stage(batch_size=8)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "medvlp",
            "train",
            *common,
            "--out",
            str(tmp_path / "two"),
            *_per_stage(batch_size=4),
        ],
        capture_output=True,
        text=True,
        check=False,
        env=env,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert json.loads((tmp_path / "two" / "run.json").read_text())["world_size"] == 2
    outputs = {
        "stage1-text": "text/model.safetensors",
        "stage1-image": "image_encoder.safetensors",
        "stage2-align": "model/model.safetensors",
    }
    for stage, weights in outputs.items():
        l1, l2 = _log(tmp_path / "one" / stage / "log.jsonl"), _log(tmp_path / "two" / stage / "log.jsonl")
        assert [r["step"] for r in l2] == [1, 2, 3], stage
        for a, b in zip(l1, l2, strict=True):
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-5), stage
            for key in ("val/zero_shot_auroc", "val/r10", "val/loss"):  # rank 0 evaluates the whole val split
                assert (key in a) == (key in b) == (stage == "stage2-align" and a["step"] == 3), (stage, key)
                if key in a:
                    assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5, nan_ok=True), key
        p1, p2 = load_file(str(tmp_path / "one" / stage / weights)), load_file(str(tmp_path / "two" / stage / weights))
        assert p1.keys() == p2.keys()
        for k in p1:
            torch.testing.assert_close(p1[k], p2[k], rtol=1e-4, atol=1e-5, msg=f"{stage}: {k}")


def test_config_overrides_and_errors(tmp_path: Path) -> None:
    cfg = load_config(TINY_2D, ["stages.stage2-align.lr=3e-4", "stages.stage1_text.enabled=false", "seed=7"])
    assert cfg.stages.stage2_align.lr == 3e-4 and not cfg.stages.stage1_text.enabled and cfg.seed == 7
    with pytest.raises(ConfigError, match=r"stages\.stage2-align\.optimizer"):
        load_config(TINY_2D, ["stages.stage2-align.optimizer=sgd"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(TINY_2D, ["seed"])
    with pytest.raises(ConfigError, match="device must be auto"):
        load_config(None, ["device=tpu"])
    with pytest.raises(ConfigError, match=r"stages\.stage2-align\.lrr"):
        load_config(None, ["stages.stage2-align.lrr=1"])
    with pytest.raises(ConfigError, match="the encoder never learns"):
        load_config(None, ["stages.stage1-text.steps=5", "stages.stage1-text.head_only_steps=5"])


def test_a_bad_model_section_fails_before_any_stage_runs(cohort: Path, tmp_path: Path) -> None:
    """A typo in `model:` is a config error at load time; what needs the cohort fails before stage 1 starts."""
    with pytest.raises(ConfigError, match=r"model: unknown key 'image_encodr'.*did you mean 'image_encoder'"):
        load_config(TINY_2D, ["model.image_encodr=tiny_resnet"])
    with pytest.raises(ConfigError, match=r"model: text_num_layers: .*greater than or equal to 1"):
        load_config(TINY_2D, ["model.text_num_layers=0"])
    with pytest.raises(ConfigError, match="does not support spatial_dims=3"):
        load_config(TINY_2D, ["model.image_encoder=tiny_timm_vit", "model.spatial_dims=3"])

    bad = tmp_path / "bad.yaml"
    bad.write_text(TINY_2D.read_text().replace("  image_encoder: tiny_resnet", "  image_encodr: tiny_resnet"))
    assert "image_encodr" in bad.read_text()
    r = subprocess.run(
        _cmd("--config", str(bad), "--cohort", str(cohort), "--out", str(tmp_path / "run")),
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode != 0 and "image_encodr" in r.stdout + r.stderr
    assert not (tmp_path / "run" / "stage1-text").exists()

    cfg = load_config(TINY_2D, ["model.image_size=64"])  # one int for every axis; the cohort's images are 128 x 128
    with pytest.raises(ValueError, match=r"image_size \[64, 64\] differs from the cohort"):
        train(cfg, cohort, tmp_path / "run2")
    assert not (tmp_path / "run2" / "stage1-text").exists(), "stage 1 must not run first"

    for bad_args, match in (("{token_stage: 5}", "token_stage must be 2, 3 or 4"), ("{depht: 10}", "depht")):
        cfg = load_config(TINY_2D, [f"model.image_encoder_args={bad_args}"])
        with pytest.raises(ValueError, match=rf"model.image_encoder_args .*{match}"):
            train(cfg, cohort, tmp_path / "run3")
        assert not (tmp_path / "run3" / "stage1-text").exists(), "a bad tower argument fails before stage 1"


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_are_valid(path: Path) -> None:
    from medvlp.models.registry import list_image_encoders

    cfg = load_config(path)
    name = cfg.model["image_encoder"]
    assert name.startswith("timm/") or name in list_image_encoders(), name


def test_the_run_mines_with_the_configured_topic_readers(cohort: Path, tmp_path: Path) -> None:
    cfg = load_config(
        TINY_2D,
        [
            "stages.stage1-text.enabled=false",
            "stages.stage1-image.enabled=false",
            "stages.stage2-align.prompt_forms=[sentence,mined_reports]",
            "stages.stage2-align.mining_topic_readers=[model,general]",
        ],
    )
    train(cfg, cohort, tmp_path / "run")
    calibration = json.loads((tmp_path / "run" / "stage2-align" / "model" / "calibration.json").read_text())
    assert calibration["mining_topic_readers"] == ["model", "general"]
    assert calibration["prompt_form_candidates"] == ["sentence", "mined_reports"]


def test_a_cohort_that_cannot_be_mirrored_fails_before_any_stage_runs(tmp_path: Path) -> None:
    import yaml

    from medvlp.data.synthetic import synthesize

    yaml_path = synthesize("ct", 12, tmp_path / "ct", seed=5)
    spec = yaml.safe_load(yaml_path.read_text())
    spec["preprocess"]["orientation"] = None  # volumes kept as stored: no known left-right axis
    yaml_path.write_text(yaml.safe_dump(spec, sort_keys=False))
    cfg = load_config(TINY_3D, ["stages.stage2-align.mirror=0.5"])
    with pytest.raises(ValueError, match="names no left-right axis"):
        train(cfg, yaml_path, tmp_path / "run")
    assert not (tmp_path / "run" / "stage1-text").exists() and not (tmp_path / "run" / "stage1-image").exists()
