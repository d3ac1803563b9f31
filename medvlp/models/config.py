"""Configuration of the joint vision-language model."""

from __future__ import annotations

import math
from collections.abc import Mapping
from functools import cache
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator
from pydantic.fields import FieldInfo

__all__ = ["TRAINING_ONLY_FIELDS", "ModelConfig", "check_model_section"]


class ModelConfig(BaseModel):
    """What :class:`medvlp.models.MedVLP` is built from.

    Attributes:
        image_encoder: a registered image encoder name (see ``list_image_encoders()``) or ``"timm/<model_name>"``.
        image_encoder_args: extra builder arguments (e.g. ``{"hidden_size": 384}``).
        spatial_dims: 2 (radiographs) or 3 (volumes).
        image_size: input size ``(X, Y[, Z])``; one int is repeated over the axes.
        text_encoder: local transformers folder; None for the bundled all-MiniLM-L6-v2.
        text_num_layers: keep only the first k text layers (None: all).
        text_max_length: tokenizer truncation length.
        embed_dim: width of the shared embedding space.
        projection: ``"linear"`` or ``"mlp"`` (Linear-GELU-Linear) heads into the shared space.
        token_projection: ``"shared"``: patch/voxel and word tokens go through their tower's global projection
            head (as BioViL projects patches with its global projector), so the global contrastive loss trains
            what phrase grounding reads; ``"separate"``: tokens get their own head, trained only by a local loss.
        loss: ``"clip"`` (softmax InfoNCE) or ``"siglip"`` (sigmoid); sets the logit scale/bias defaults.
        init_logit_scale: initial log logit scale; None: ``log(1/0.07)`` for clip, ``log(10)`` for siglip.
        init_logit_bias: initial logit bias; None: -10 for siglip, no bias for clip.
        image_checkpoint: optional local checkpoint for the image encoder, loaded at construction.
        side_edit: the texts the model's side edit acts on (:mod:`medvlp.models.side_edit`), ``"sentences"`` or
            ``"all"``; None: no edit. Set by the fit after training (``stages.stage2-align.side_edit``), not in a
            training config.
        side_check_axis: the spatial axis across the patient that the model's side check reads
            (:mod:`medvlp.models.side_check`); None: no check. Set by its fit after training
            (``stages.stage2-align.side_check``), not in a training config.
        image_refit: the spot statistics' kinds (:data:`medvlp.models.blobs.BLOB_KINDS`) that the model's image
            refit reads beside its embedding (:mod:`medvlp.models.image_refit`); None: no refit. Set by its fit
            after training (``stages.stage2-align.image_refit``), not in a training config.
        image_refit_cell: the size in voxels of the cells whose refitted tokens replace the tower's
            (:mod:`medvlp.models.image_refit`); None: the tokens stay the tower's. Set by the refit's fit
            (``stages.stage2-align.image_refit_cell``), not in a training config.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    image_encoder: str
    image_encoder_args: dict[str, Any] = Field(default_factory=dict)
    spatial_dims: Literal[2, 3]
    image_size: tuple[int, ...]
    text_encoder: str | None = None
    text_num_layers: int | None = Field(default=None, ge=1)
    text_max_length: int = Field(default=128, ge=4)
    embed_dim: int = Field(default=256, ge=1)
    projection: Literal["linear", "mlp"] = "mlp"
    token_projection: Literal["shared", "separate"] = "shared"
    loss: Literal["clip", "siglip"] = "clip"
    init_logit_scale: float | None = None
    init_logit_bias: float | None = None
    image_checkpoint: str | None = None
    side_edit: Literal["sentences", "all"] | None = None
    side_check_axis: int | None = Field(default=None, ge=0, le=2)
    image_refit: tuple[str, ...] | None = None
    image_refit_cell: int | None = Field(default=None, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _expand_image_size(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("image_size"), int) and data.get("spatial_dims") in (2, 3):
            data = {**data, "image_size": (data["image_size"],) * int(data["spatial_dims"])}
        return data

    @field_validator("image_encoder")
    @classmethod
    def _known_encoder(cls, value: str) -> str:
        from medvlp.models.registry import get_image_encoder_spec

        get_image_encoder_spec(value)  # ValueError naming the value and the known names
        return value

    @model_validator(mode="after")
    def _consistent(self) -> ModelConfig:
        from medvlp.models.registry import get_image_encoder_spec

        if len(self.image_size) != self.spatial_dims or min(self.image_size) <= 0:
            raise ValueError(f"image_size {self.image_size} does not describe a {self.spatial_dims}D image")
        spec = get_image_encoder_spec(self.image_encoder)
        if self.spatial_dims not in spec.spatial_dims:
            raise ValueError(
                f"image_encoder {self.image_encoder!r} does not support spatial_dims={self.spatial_dims} "
                f"(supports {list(spec.spatial_dims)})"
            )
        if self.side_check_axis is not None and self.side_check_axis >= self.spatial_dims:
            raise ValueError(f"side_check_axis {self.side_check_axis} is not an axis of a {self.spatial_dims}D image")
        if self.image_refit is not None:
            from medvlp.models.blobs import BLOB_KINDS

            unknown = [k for k in self.image_refit if k not in BLOB_KINDS]
            if unknown or not self.image_refit:
                raise ValueError(
                    f"image_refit kinds must be some of {', '.join(BLOB_KINDS)}, not {list(self.image_refit)}"
                )
        if self.image_refit_cell is not None and self.image_refit is None:
            raise ValueError("image_refit_cell refits the tokens of an image refit: it needs image_refit")
        return self

    @property
    def logit_scale_init(self) -> float:
        """Initial log logit scale after defaults."""
        if self.init_logit_scale is not None:
            return float(self.init_logit_scale)
        return math.log(10.0) if self.loss == "siglip" else math.log(1 / 0.07)

    @property
    def logit_bias_init(self) -> float | None:
        """Initial logit bias after defaults (None: no bias parameter)."""
        if self.init_logit_bias is not None:
            return float(self.init_logit_bias)
        return -10.0 if self.loss == "siglip" else None


#: ModelConfig fields written by a fit after training, never by a training config's ``model:`` section (and why).
FITTED_FIELDS: dict[str, str] = {
    "side_edit": "set by the side edit's fit after training; turn it on with stages.stage2-align.side_edit: true",
    "side_check_axis": "set by the side check's fit after training; turn it on with "
    "stages.stage2-align.side_check: true",
    "image_refit": "set by the image refit's fit after training; turn it on with "
    "stages.stage2-align.image_refit: [KINDS]",
    "image_refit_cell": "set by the image refit's fit after training; turn it on with "
    "stages.stage2-align.image_refit_cell: VOXELS",
}
#: Keys of a training config's ``model:`` section that shape training but are not part of the saved model.
TRAINING_ONLY_FIELDS: dict[str, Any] = {"text_dropout": (Optional[float], Field(default=None, ge=0, lt=1))}  # noqa: UP045


@cache
def _section_model() -> type[BaseModel]:
    """ModelConfig with every field optional (the cohort fills ``spatial_dims`` and ``image_size``), plus the
    training-only keys; built from ModelConfig's own fields, so the two cannot drift apart."""
    # one int is a valid image_size (ModelConfig repeats it over the axes once spatial_dims is known)
    types = {name: info.annotation for name, info in ModelConfig.model_fields.items()} | {
        "image_size": tuple[int, ...] | int
    }
    fields: dict[str, Any] = {
        name: (Optional[types[name]], FieldInfo.merge_field_infos(info, default=None, default_factory=None))  # noqa: UP045
        for name, info in ModelConfig.model_fields.items()
    }
    return create_model(
        "ModelSection", __config__=ConfigDict(extra="forbid", frozen=True), **fields, **TRAINING_ONLY_FIELDS
    )


def check_model_section(section: Mapping[str, Any]) -> dict[str, Any]:
    """Validate a training config's ``model:`` section before anything runs, and return it unchanged.

    Every key must be a :class:`ModelConfig` field or a training-only key (:data:`TRAINING_ONLY_FIELDS`); every
    value must have its field's type and range; a named image encoder must be registered, and must support
    ``spatial_dims`` when that is given. What needs the cohort (its image size) is checked when training starts.

    Raises:
        ValueError: naming each bad key (with a "did you mean" guess) or value.
    """
    from monai.utils import look_up_option

    known = [k for k in (*ModelConfig.model_fields, *TRAINING_ONLY_FIELDS) if k not in FITTED_FIELDS]
    problems = [f"{key}: {why}" for key, why in FITTED_FIELDS.items() if section.get(key) is not None]
    for key in section:
        if key in FITTED_FIELDS:
            continue
        try:
            look_up_option(key, known, print_all_options=False)
        except ValueError as exc:
            problems.append(f"unknown key {key!r}: {' '.join(str(exc).split())} Known keys: {', '.join(known)}")
    if not problems:
        try:
            _section_model().model_validate(dict(section))
        except ValidationError as exc:
            problems += [
                f"{'.'.join(str(p) for p in e['loc'])}: {e['msg'].removeprefix('Value error, ')}" for e in exc.errors()
            ]
    if not problems and section.get("image_encoder") is not None:
        from medvlp.models.registry import get_image_encoder_spec

        try:
            spec = get_image_encoder_spec(section["image_encoder"])
        except ValueError as exc:
            problems.append(f"image_encoder: {exc}")
        else:
            dims = section.get("spatial_dims")
            if dims is not None and dims not in spec.spatial_dims:
                problems.append(
                    f"image_encoder {section['image_encoder']!r} does not support spatial_dims={dims} "
                    f"(supports {list(spec.spatial_dims)})"
                )
    if problems:
        raise ValueError("; ".join(problems))
    return dict(section)
