"""Training configuration: frozen, validated, loaded from YAML, overridable with ``--set key=value``.

The resolved config (after overrides, with the image size taken from the cohort) is written into the
run folder, so a run can be repeated from it alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

STAGES = ("stage1-text", "stage1-image", "stage2-align")


class ConfigError(ValueError):
    """A training config is wrong; the message lists each problem with its dotted key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class OptimConfig(_Strict):
    """One short loop serves every stage; these are its knobs."""

    steps: int = Field(default=100, ge=1)
    batch_size: int = Field(default=16, ge=1, description="per process; the global batch is this times world size")
    lr: float = Field(default=1e-4, gt=0)
    weight_decay: float = Field(default=0.05, ge=0)
    optimizer: Literal["adamw", "lion"] = "adamw"
    betas: tuple[float, float] = (0.9, 0.98)
    warmup_steps: int = Field(default=10, ge=0)
    min_lr_ratio: float = Field(default=0.05, ge=0, le=1)
    grad_accum: int = Field(default=1, ge=1)
    clip_grad: float | None = Field(default=1.0, gt=0)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    channels_last: bool = Field(
        default=False,
        description="image batches and convolution kernels in channels-last order (channels_last_3d for volumes): "
        "faster convolutions where oneDNN or cuDNN have kernels for it; the same model up to float rounding",
    )
    checkpoint_every: int = Field(default=50, ge=1)
    log_every: int = Field(default=5, ge=1)
    ema_decay: float | None = Field(
        default=None,
        gt=0,
        lt=1,
        description="keep an exponential moving average of the weights (decay warmed up, capped here; "
        "medvlp.train.ema): val scores it, the best step keeps it and the stage writes it; None: the raw weights",
    )


class TextStageConfig(OptimConfig):
    """Stage 1, language: masked-language-model domain adaptation of the text tower on the reports."""

    enabled: bool = True
    lr: float = 5e-5
    mlm_probability: float = Field(default=0.15, gt=0, lt=1)
    whole_word_mask: bool = True
    freeze_embeddings: bool = Field(
        default=True,
        description="keep the word embeddings (and the decoder tied to them) fixed: a cohort's reports "
        "are too few to relearn a 30k vocabulary, and it halves the step on a CPU",
    )
    body_lr_scale: float = Field(
        default=0.1,
        ge=0,
        description="the pretrained encoder's share of lr; the new MLM head gets all of it "
        "(a sentence-embedding model ships with no MLM head)",
    )
    head_only_steps: int = Field(
        default=10, ge=0, description="steps in which only the new MLM head learns, before the encoder moves"
    )

    @model_validator(mode="after")
    def _encoder_gets_to_learn(self) -> TextStageConfig:
        if self.enabled and self.body_lr_scale > 0 and self.head_only_steps >= self.steps:
            raise ValueError(
                f"head_only_steps ({self.head_only_steps}) must be fewer than steps ({self.steps}): "
                "otherwise the encoder never learns and the stage adapts nothing"
            )
        return self


class ImageStageConfig(OptimConfig):
    """Stage 1, images: self-supervised pretraining of the image tower."""

    enabled: bool = True
    method: Literal["simmim", "simclr"] = "simmim"
    mask_ratio: float = Field(default=0.5, gt=0, lt=1)
    mask_patch: int = Field(default=8, ge=1, description="voxels per side of a masked block (simmim)")
    temperature: float = Field(default=0.2, gt=0, description="simclr")


class AlignStageConfig(OptimConfig):
    """Stage 2: contrastive image-report alignment."""

    enabled: bool = True
    false_negatives: Literal["none", "report", "labels"] = "report"
    noise_weighting: bool = False
    uniformity_weight: float = Field(default=0.0, ge=0)
    alignment_weight: float = Field(default=0.0, ge=0)
    local_weight: float = Field(default=0.0, ge=0)
    sentence_weight: float = Field(
        default=0.0,
        ge=0,
        description="weight of the sentence term: each image also aligned with one sentence of its report, every "
        "image whose report has that sentence a positive; 0: report-level only",
    )
    hard_negatives: list[Literal["negation", "laterality", "affirmation", "severity"]] = Field(
        default_factory=list,
        description="rule-made twins (negated; left and right swapped; a negated sentence made affirmative; size and "
        "severity turned around): of the "
        "sampled sentence as extra negatives for its image in the sentence term, and of one sentence of each report "
        "in the twin term",
    )
    twin_weight: float = Field(
        default=0.0,
        ge=0,
        description="weight of the twin term: each image must prefer its report over the same report with one "
        "sentence flipped by a hard_negatives rule; 0: off",
    )
    twin_sides: Literal["sentence", "report"] = Field(
        default="sentence",
        description="how the twin term's laterality twin is made: 'sentence' swaps left and right in the drawn "
        "sentence alone, so a report that names the side again elsewhere contradicts itself, a cue the text tower can "
        "learn without the image; 'report' swaps every side the report names (medvlp.data.perturb.mirror_sides), a "
        "twin as consistent as a real report, which only the image's side can tell apart",
    )
    twin_sentence_weight: float = Field(
        default=0.0,
        ge=0,
        description="weight of the sentence twin term: each image must prefer the sentence drawn for its report's twin "
        "over that sentence's twin, the two sentences alone (the robustness suite's form); 0: off",
    )
    twin_sentence_kinds: list[Literal["negation", "laterality", "affirmation", "severity", "absence"]] | None = Field(
        default=None,
        description="the hard_negatives rules whose twins the sentence twin term scores (the drawn pair of a report "
        "made by another rule leaves that term, not the report twin term), and 'absence' for twin_absence's pairs; "
        "None: all of them",
    )
    twin_sentence_text_only: bool = Field(
        default=False,
        description="the sentence twin term moves the text side only (the image embedding enters it detached): the "
        "image keeps what the report-level terms taught it, the two sentences must part along the image's own axis",
    )
    twin_absence: bool = Field(
        default=False,
        description="the twins' draw also holds, for each finding a training study is labelled without, a training "
        "phrase of that finding (grounding.csv) and its negated twin: the negated phrase must win on that image (the "
        "robustness suite's absence form, with the sentence twin term) and the report with the phrase added must lose "
        "(the report twin term; with twin_sentence_kinds set, the absence pairs enter the sentence twin term only "
        "when it names 'absence'); uses the training labels and phrases; needs 'negation' in hard_negatives",
    )
    twin_sentence_balance: bool = Field(
        default=False,
        description="the sentence twin term weighs the batch's pairs whose statement must win (a negated twin) and "
        "those whose denial must win (an affirmed twin, twin_absence's pairs) to equal shares (side and severity pairs "
        "keep weight 1): the draw holds several times more denials, which teaches the term that 'no' wins; needs "
        "twin_sentence_weight > 0",
    )
    box_weight: float = Field(
        default=0.0,
        ge=0,
        description="weight of the phrase-box term: each training study with annotated phrase boxes (the cohort's "
        "grounding, train split) has one phrase drawn, whose similarity over the image tokens must fall inside its "
        "boxes (medvlp.losses.box_grounding_loss); it trains on the boxes, so grounding scored on test is then "
        "supervised, not emergent; 0: off",
    )
    box_text_grad: bool = Field(
        default=True,
        description="whether the phrase-box term also moves the text tower; False: the phrase embeddings are held "
        "fixed in that term, so only the image side learns where a phrase is",
    )
    branch_weight: float = Field(
        default=0.0,
        ge=0,
        description="weight of the branch term: the image tower's fixed-statistics branch (the spot statistics' map, "
        "model.image_encoder_args.blobs) alone, through the image projection, must match its own report against the "
        "batch's others, as the whole embedding does (the reports enter the term fixed), so that a tower memorising "
        "its training series does not drown what the statistics can say; needs a tower with such a branch; 0: off",
    )
    chunk_size: int | None = Field(default=None, ge=1)
    lock_text_layers: int | None = Field(default=None, ge=0, description="freeze all but the last N text layers")
    text_lr_scale: float = Field(
        default=0.1, ge=0, description="the pretrained text tower's share of lr (projections and image tower: all)"
    )
    image_lr_scale: float = Field(default=1.0, ge=0, description="the image tower's share of lr")
    head_lr_scale: float | None = Field(
        default=None,
        ge=0,
        description="the share of lr of the image tower's new heads (its head_prefixes: the spot statistics' map, "
        "the spot maps' stem, the token pyramid's laterals, the laterality head), which start at zero or anew; "
        "None: image_lr_scale",
    )
    val_every: int | None = Field(
        default=None,
        ge=1,
        description="evaluate on the val split every N steps and at the last step: zero-shot mean AUROC, "
        "image->report R@10 and the loss, into log.jsonl; None: never",
    )
    select_metric: Literal["val/zero_shot_auroc", "val/r10", "val/loss"] | None = Field(
        default=None,
        description="keep the step best on this val metric (strictly better replaces; ties keep the earlier) as "
        "the model folder, and name it in best.json; None: the last step's model",
    )
    patience: int | None = Field(
        default=None, ge=1, description="stop after this many evaluations without a better select_metric"
    )
    calibration_isotonic: bool = Field(
        default=False,
        description="after Platt scaling, an isotonic map per finding fitted on val (at least 10 studies of each "
        "class), blended 0.98 / 0.02 with the Platt answer so that the ranking is kept (medvlp.tasks.calibration)",
    )
    side_edit: bool = Field(
        default=False,
        description="after training, before the calibration: a rank-one side edit of the text embedding "
        "(medvlp.models.side_edit), its directions fitted on the training reports' one-sided sentences and their "
        "images (no labels), its strength chosen on val by how often each image prefers its reports' one-sided "
        "sentences over their side-swapped twins (medvlp.tasks.side_edit)",
    )
    image_refit: list[Literal["margins", "levels", "contrast"]] | None = Field(
        default=None,
        description="after training (before the side edit): the global image embedding refitted in closed form onto "
        "the report embeddings, from the trained embedding and these kinds of spot statistics of the image "
        "(medvlp.models.image_refit): a ridge map fitted on the training pairs (no labels), its strength chosen on "
        "val by image -> report R@10, no refit when none beats the trained embedding (medvlp.tasks.image_refit)",
    )
    image_refit_cell: int | None = Field(
        default=None,
        ge=1,
        description="with image_refit: the tokens refitted too, on cells of about this many voxels across, each the "
        "refit's map of the image's embedding and the cell's spot statistics, standardised by that cell's training "
        "mean and scale and kept where above it (medvlp.models.image_refit); None: grounding reads the tower's tokens",
    )
    side_check: bool = Field(
        default=False,
        description="after training (after the side edit): a check of one-sided sentences against the image tokens "
        "(medvlp.models.side_check), a term of the pair score that reads on which half of the image the sentence's "
        "finding lights up; its orientation fitted on the training reports' one-sided sentences (no labels), its "
        "strength chosen on val by how often each image prefers those sentences over their side-swapped and negated "
        "twins (medvlp.tasks.side_check)",
    )
    side_edit_texts: Literal["sentences", "all"] = Field(
        default="sentences",
        description="the texts the side edit acts on: 'sentences', a text of one sentence (the zero-shot report "
        "prototypes, retrieval's reports and every other longer text keep their embeddings); 'all', every text that "
        "names a side",
    )
    prompt_forms: list[
        Literal["sentence", "report", "report_section", "mined", "mined_report_section", "mined_reports"]
    ] = Field(
        default_factory=lambda: ["sentence"],
        min_length=1,
        description="candidate zero-shot prompt forms (medvlp.tasks.prompt_forms); after training the one with the "
        "best mean zero-shot AUROC on val is kept with the calibration (earlier wins ties); [sentence]: prompts alone; "
        "mined, mined_report_section: sentences of the training reports, mined without labels "
        "(medvlp.tasks.mined_prompts), alone or framed as report_section frames the templates; mined_reports: "
        "the mean embeddings of the training reports that state each finding and of the others (no labels)",
    )

    mirror: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description="probability that a training pair is mirrored across the patient's left-right axis, its image "
        "flipped and every left and right of its report swapped (medvlp.train.data.CachedImages; with data.augment)",
    )
    mining_topic_readers: list[Literal["model", "general"]] = Field(
        default_factory=lambda: ["model"],
        min_length=1,
        description="who reads which finding a training sentence is about, for the mined prompt forms "
        "(medvlp.tasks.mined_prompts): the model's text tower, the bundled general sentence encoder, or both, who "
        "must then agree (a sentence they give to different findings is about none); [model, general] reads "
        "boilerplate better but did not raise zero-shot AUROC on all three 2D styles, so it is not the default",
    )

    @model_validator(mode="after")
    def _selection_needs_validation(self) -> AlignStageConfig:
        if self.hard_negatives and not (self.sentence_weight or self.twin_weight or self.twin_sentence_weight):
            raise ValueError(
                f"hard_negatives {self.hard_negatives} enter the sentence or a twin term: set sentence_weight, "
                "twin_weight or twin_sentence_weight > 0"
            )
        drawn = set(self.hard_negatives) | ({"absence"} if self.twin_absence else set())
        if self.twin_sentence_kinds is not None and not (
            self.twin_sentence_weight and set(self.twin_sentence_kinds) <= drawn
        ):
            raise ValueError(
                f"twin_sentence_kinds {self.twin_sentence_kinds} choose among hard_negatives {self.hard_negatives} "
                "for the sentence twin term: set twin_sentence_weight > 0 and name rules of hard_negatives ('absence' "
                "with twin_absence)"
            )
        if self.twin_absence and "negation" not in self.hard_negatives:
            raise ValueError("twin_absence draws negated phrases: it needs 'negation' in hard_negatives")
        if self.image_refit_cell is not None and not self.image_refit:
            raise ValueError("image_refit_cell refits the tokens with the image refit's map: set image_refit too")
        if self.twin_sentence_balance and not self.twin_sentence_weight:
            raise ValueError("twin_sentence_balance weighs the sentence twin term: set twin_sentence_weight > 0")
        if self.twin_sentence_text_only and not self.twin_sentence_weight:
            raise ValueError("twin_sentence_text_only acts on the sentence twin term: set twin_sentence_weight > 0")
        for name in ("twin_weight", "twin_sentence_weight"):
            if getattr(self, name) and not self.hard_negatives:
                raise ValueError(f"{name} > 0 needs hard_negatives (the rules that make each report's twin)")
        if self.twin_sides == "report" and not (self.twin_weight and "laterality" in self.hard_negatives):
            raise ValueError(
                "twin_sides 'report' makes the twin term's laterality twin: it needs twin_weight > 0 and "
                "'laterality' in hard_negatives"
            )
        if self.select_metric is not None and self.val_every is None:
            raise ValueError(f"select_metric {self.select_metric!r} needs val_every (how often to evaluate on val)")
        if self.patience is not None and self.select_metric is None:
            raise ValueError(f"patience {self.patience} needs select_metric (the val metric that must improve)")
        return self


class StagesConfig(_Strict):
    stage1_text: TextStageConfig = Field(default_factory=TextStageConfig, alias="stage1-text")
    stage1_image: ImageStageConfig = Field(default_factory=ImageStageConfig, alias="stage1-image")
    stage2_align: AlignStageConfig = Field(default_factory=AlignStageConfig, alias="stage2-align")

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    def get(self, name: str) -> OptimConfig:
        return {"stage1-text": self.stage1_text, "stage1-image": self.stage1_image, "stage2-align": self.stage2_align}[
            name
        ]


#: The training augmentation's affine resampling (medvlp.train.data.augmentation).
Interpolation = Literal["bilinear", "nearest"]


class DataConfig(_Strict):
    augment: bool = True
    augment_interpolation: Interpolation = Field(
        default="bilinear",
        description="the training augmentation's affine resampling: bilinear (trilinear in 3D) blurs a one-voxel "
        "lesion, nearest moves voxels without mixing them (medvlp.train.data.augmentation)",
    )
    num_workers: int = Field(default=0, ge=0)
    report_sections: list[str] = Field(
        default_factory=lambda: ["findings", "impression"],
        description="report sections fed to the text tower, in order; a report without them is used whole",
    )


class TrainConfig(_Strict):
    """Everything a run needs besides the cohort."""

    seed: int = 0
    device: str = Field(default="auto", description="auto (cuda when present), cpu, cuda, cuda:N")
    model: dict[str, Any] = Field(
        default_factory=dict,
        description="medvlp.models.ModelConfig fields (spatial_dims and image_size default to the cohort's) and "
        "text_dropout; checked key by key and value by value when the config is loaded",
    )
    data: DataConfig = Field(default_factory=DataConfig)
    stages: StagesConfig = Field(default_factory=StagesConfig)

    @field_validator("model")
    @classmethod
    def _model_section(cls, value: dict[str, Any]) -> dict[str, Any]:
        from medvlp.models.config import check_model_section

        return check_model_section(value)

    @model_validator(mode="after")
    def _device(self) -> TrainConfig:
        d = self.device
        if d not in ("auto", "cpu", "cuda", "mps") and not d.startswith("cuda:"):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {d!r}")
        return self


def _parse_value(text: str) -> Any:
    """``--set`` values are YAML scalars or flow collections: 1e-4, true, [64, 64], {mode: window}."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides to a nested dict (a copy). Stage names may be written with - or _."""
    out = yaml.safe_load(yaml.safe_dump(raw)) or {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise ConfigError(f"--set has an empty key: {item!r}")
        if parts[0] == "stages" and len(parts) > 1:
            parts[1] = parts[1].replace("_", "-")
        node = out
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {key}: {p!r} is a value, not a section")
            node = nxt
        node[parts[-1]] = _parse_value(value)
    return out


def _format(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"])
        lines.append(f"  - {where}: {e['msg'].removeprefix('Value error, ')}")
    return "\n".join(lines)


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a training config YAML (or the defaults when ``path`` is None) and apply ``overrides``.

    Raises:
        ConfigError: naming every bad key and value.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: must be a YAML mapping")
    if isinstance(raw.get("stages"), dict):  # stage1_text and stage1-text name the same stage
        raw["stages"] = {str(k).replace("_", "-"): v for k, v in raw["stages"].items()}
    raw = apply_overrides(raw, overrides or [])
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{path or 'config'}: invalid:\n{_format(exc)}") from exc


def dump_config(cfg: TrainConfig) -> str:
    """The YAML a run folder keeps: loading it back gives the same config."""
    return yaml.safe_dump(cfg.model_dump(mode="json", by_alias=True), sort_keys=False)
