"""`medvlp train`: build the cohort cache if needed, then run the stages in order into one run folder.

A run folder holds everything needed to repeat it::

    RUN/config.yaml        the resolved config (after --set overrides, image size from the cohort)
    RUN/run.json           code version (git commit, medvlp and torch versions), command, cohort, world size
    RUN/train.log          the log of rank 0
    RUN/stage1-text/       checkpoint.pt, log.jsonl, text/ (a transformers folder), mlm/
    RUN/stage1-image/      checkpoint.pt, log.jsonl, image_encoder.safetensors
    RUN/stage2-align/      checkpoint.pt, log.jsonl, model/ (config.json, model.safetensors, text/),
                           best.json (with select_metric: the val metric, the step model/ holds, its value)
"""

from __future__ import annotations

import functools
import json
import logging
import platform
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from medvlp.artifacts import RUN_CONFIG, RUN_INFO, default_cache_dir
from medvlp.config import STAGES, TrainConfig, dump_config
from medvlp.data.build import build_cohort
from medvlp.data.cache import CachedCohort
from medvlp.train.loop import run_stage
from medvlp.train.runtime import Runtime, barrier, init_runtime, seed_everything, shutdown_runtime

logger = logging.getLogger(__name__)


def code_version() -> dict[str, Any]:
    """The git commit of the medvlp source (and whether it had uncommitted changes), with package versions."""
    import medvlp

    src = Path(medvlp.__file__).resolve().parent.parent
    info: dict[str, Any] = {
        "medvlp": medvlp.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    try:
        commit = subprocess.run(
            ["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        )
        dirty = subprocess.run(
            ["git", "-C", str(src), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        )
        info |= {"git_commit": commit.stdout.strip(), "git_dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.CalledProcessError):
        info["git_commit"] = None
    return info


def model_config(cfg: TrainConfig, cache: CachedCohort, run: Path, stages: list[str]) -> dict[str, Any]:
    """The model fields of the config, completed from the cohort and from earlier stages' outputs."""
    m = {k: v for k, v in cfg.model.items() if k != "text_dropout"}
    m.setdefault("spatial_dims", cache.spatial_dims)
    m.setdefault("image_size", list(cache.summary["preprocess"]["size"]))
    if isinstance(m["image_size"], int):  # one int: the same size on every axis
        m["image_size"] = [m["image_size"]] * int(m["spatial_dims"])
    if list(m["image_size"]) != list(cache.summary["preprocess"]["size"]):
        raise ValueError(
            f"model.image_size {m['image_size']} differs from the cohort's preprocess size "
            f"{cache.summary['preprocess']['size']}; leave it out to take the cohort's"
        )
    text_dir = run / "stage1-text" / "text"
    if cfg.stages.stage1_text.enabled and ("stage1-text" in stages or text_dir.is_dir()):
        m["text_encoder"] = str(text_dir)
        m["text_num_layers"] = None  # the adapted folder already has the chosen depth
    image_ckpt = run / "stage1-image" / "image_encoder.safetensors"
    if cfg.stages.stage1_image.enabled and ("stage1-image" in stages or image_ckpt.is_file()):
        m["image_checkpoint"] = str(image_ckpt)
    return m


def _check_image_encoder(fields: dict[str, Any]) -> None:
    """Validate the model fields and build the image tower once (no checkpoint read), so that a bad
    ``image_encoder_args`` value (``token_stage: 5``, ``global_pool: median``) fails now, not after stage 1."""
    from medvlp.models import ModelConfig, create_image_encoder

    mc = ModelConfig.model_validate(fields)
    try:
        create_image_encoder(mc.image_encoder, mc.spatial_dims, mc.image_size, **mc.image_encoder_args)
    except (TypeError, ValueError) as err:
        raise ValueError(f"model.image_encoder_args {mc.image_encoder_args} for {mc.image_encoder!r}: {err}") from err


def _stage(name: str, cfg: TrainConfig, cache: CachedCohort, run: Path, stages: list[str]):
    from medvlp.models import ModelConfig, create_image_encoder

    if name == "stage1-text":
        from medvlp.train.stages.text import TextStage

        return TextStage(
            cfg.stages.stage1_text,
            cache,
            cfg.data.report_sections,
            cfg.seed,
            text_path=cfg.model.get("text_encoder"),
            num_layers=cfg.model.get("text_num_layers"),
            max_length=cfg.model.get("text_max_length", 128),
            dropout=cfg.model.get("text_dropout"),
        )
    mc = ModelConfig.model_validate(model_config(cfg, cache, run, stages))
    if name == "stage1-image":
        from medvlp.train.stages.image import ImageStage

        enc = create_image_encoder(mc.image_encoder, mc.spatial_dims, tuple(mc.image_size), **mc.image_encoder_args)
        return ImageStage(cfg.stages.stage1_image, cache, enc, cfg.seed, cfg.data.augment_interpolation)
    from medvlp.train.stages.align import AlignStage

    return AlignStage(
        cfg.stages.stage2_align,
        cache,
        mc,
        cfg.data.report_sections,
        cfg.seed,
        cfg.data.augment,
        text_dropout=cfg.model.get("text_dropout"),
        interpolation=cfg.data.augment_interpolation,
    )


def train(
    cfg: TrainConfig,
    cohort_yaml: str | Path,
    run: str | Path,
    stages: list[str] | None = None,
    resume: bool = False,
    cache_dir: str | Path | None = None,
    command: list[str] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, Any]:
    """Run the enabled stages (all three by default) in order; under torchrun every rank calls this.

    ``progress(phase, done, total)``, when given, receives the cache build (phase ``"build"``) and every stage's
    steps (phase = stage name) instead of their own progress bars.

    Returns:
        Per stage, ``{"steps", "loss", "resumed_from"}``.
    """
    run, cohort_yaml = Path(run), Path(cohort_yaml)
    unknown = [s for s in stages or [] if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; the stages are {', '.join(STAGES)}")
    wanted = [s for s in (stages or STAGES) if cfg.stages.get(s).enabled]
    rt = init_runtime(cfg.device)
    seed_everything(cfg.seed)
    handler = _setup(run, rt)
    try:
        cache_path = Path(cache_dir) if cache_dir else default_cache_dir(cohort_yaml)
        if rt.is_main:
            on_build = None if progress is None else (lambda done, total: progress("build", done, total))
            summary = build_cohort(cohort_yaml, cache_path, on_progress=on_build)
            logger.info(
                "cohort cache %s: %d studies, %d quarantined", cache_path, summary.ingested, summary.quarantined
            )
            (run / RUN_CONFIG).write_text(dump_config(cfg))
            info = {
                "code": code_version(),
                "command": command or sys.argv,
                "cohort": str(cohort_yaml.resolve()),
                "cache": str(cache_path.resolve()),
                "world_size": rt.world_size,
                "device": str(rt.device),
                "stages": wanted,
            }
            (run / RUN_INFO).write_text(json.dumps(info, indent=2) + "\n")
        barrier(rt)
        cache = CachedCohort.open(cache_path)
        if any(name != "stage1-text" for name in wanted):  # the joint model, completed from the cohort, is checked
            _check_image_encoder(model_config(cfg, cache, run, wanted))  # before the first stage spends any time
        if "stage2-align" in wanted and cfg.stages.stage2_align.mirror and cfg.data.augment:
            from medvlp.train.data import left_right_axis  # a cohort that cannot be mirrored fails before stage 1

            left_right_axis(cache)
        results: dict[str, Any] = {}
        for name in wanted:
            seed_everything(cfg.seed)
            stage = _stage(name, cfg, cache, run, wanted)
            on_step = None if progress is None else functools.partial(progress, name)
            results[name] = run_stage(
                stage, run / name, rt, cfg.seed, resume=resume, num_workers=cfg.data.num_workers, on_step=on_step
            )
            logger.info("%s done: %s", name, results[name])
        if "stage2-align" in wanted and rt.is_main:
            from medvlp.tasks.calibration import calibrate_model_dir

            align = cfg.stages.stage2_align
            model_dir, sections = run / "stage2-align" / "model", list(cfg.data.report_sections)
            if align.image_refit:  # first: the side edit, check and calibration read the refitted images
                from medvlp.tasks.image_refit import fit_image_refit

                fit_image_refit(model_dir, cache, sections, align.image_refit, cell=align.image_refit_cell)
            if align.side_edit:  # before the calibration, which then reads the edited text embeddings
                from medvlp.tasks.side_edit import fit_side_edit

                fit_side_edit(model_dir, cache, sections, align.side_edit_texts)
            if align.side_check:  # a term of the pair score: the calibrated zero-shot probabilities do not read it
                from medvlp.tasks.side_check import fit_side_check

                fit_side_check(model_dir, cache, sections)
            calibrate_model_dir(
                model_dir,
                cache,
                sections,
                align.prompt_forms,
                isotonic=align.calibration_isotonic,
                topic_readers=align.mining_topic_readers,
            )
        barrier(rt)
        return results
    finally:
        if handler is not None:
            logging.getLogger("medvlp").removeHandler(handler)
            handler.close()
        shutdown_runtime(rt)


def _setup(run: Path, rt: Runtime) -> logging.Handler | None:
    run.mkdir(parents=True, exist_ok=True)
    if not rt.is_main:
        return None
    handler = logging.FileHandler(run / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("medvlp")
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    return handler
