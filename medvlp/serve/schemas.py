"""Request and answer models of the HTTP API (they also make its OpenAPI document)."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = [
    "MAX_FINDINGS",
    "MAX_FINDING_LENGTH",
    "MAX_TOP_K",
    "DiagnoseJSON",
    "DiagnoseOptions",
    "DiagnoseResponse",
    "DicomWebSource",
    "EmbedResponse",
    "EmbedText",
    "HealthResponse",
    "ModelResponse",
    "RetrieveRequest",
    "RetrieveResponse",
    "ScoreJSON",
    "ScoreOptions",
    "ScoreResponse",
    "StoredReport",
    "parse_findings",
]

MAX_FINDINGS = 32
MAX_FINDING_LENGTH = 120
MAX_TOP_K = 50
MAX_TEXTS = 64
MAX_TEXT_LENGTH = 2000
MAX_SCORE_TEXTS = 32  # sentences scored against one image per request
MAX_SCORE_TEXT_LENGTH = 500


def parse_findings(value: str | list[str] | None) -> list[str] | None:
    """``"a, b"`` or ``["a", "b"]`` -> ``["a", "b"]`` (trimmed, duplicates dropped); None or empty -> None.

    Raises:
        ValueError: too many findings, one too long, or one holding control characters.
    """
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else list(value)
    names = list(dict.fromkeys(" ".join(str(x).split()) for x in items if str(x).strip()))
    if not names:
        return None
    if len(names) > MAX_FINDINGS:
        raise ValueError(f"at most {MAX_FINDINGS} findings per request, got {len(names)}")
    for n in names:
        if len(n) > MAX_FINDING_LENGTH:
            raise ValueError(f"a finding is at most {MAX_FINDING_LENGTH} characters, got one of {len(n)}")
        if any(ord(c) < 32 or ord(c) == 127 for c in n):
            raise ValueError("findings must not hold control characters")
    return names


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DiagnoseOptions(_Strict):
    """What to compute for an image besides the probabilities."""

    findings: list[str] | None = Field(
        default=None,
        description="finding names, or free text such as 'small left pleural effusion'; omitted: the model's own "
        "findings. A multipart form sends them comma-separated.",
    )
    heatmaps: bool = Field(default=False, description="add a grounding heatmap per finding (base64 PNG)")
    top_k: int = Field(default=0, ge=0, le=MAX_TOP_K, description="add the k most similar training reports")

    @field_validator("findings", mode="before")
    @classmethod
    def _findings(cls, v: Any) -> list[str] | None:
        if v is not None and not isinstance(v, str | list):
            raise ValueError("findings must be a comma-separated string or a list of strings")
        if isinstance(v, list) and not all(isinstance(x, str) for x in v):
            raise ValueError("findings must be strings")
        return parse_findings(v)


class DicomWebSource(_Strict):
    """A series on a DICOMweb server (WADO-RS)."""

    url: str = Field(max_length=2000, description="DICOMweb base URL, e.g. http://pacs:8042/dicom-web")
    study: str = Field(max_length=64, description="StudyInstanceUID")
    series: str | None = Field(default=None, max_length=64, description="SeriesInstanceUID (omitted: the study)")


class DiagnoseJSON(DiagnoseOptions):
    """``/v1/diagnose`` with a JSON body: the image is pulled from a DICOMweb server."""

    dicomweb: DicomWebSource
    store: bool = Field(
        default=False, description="store the diagnosis as a DICOM SR on the same DICOMweb server (STOW-RS)"
    )


class EmbedText(_Strict):
    """``/v1/embed`` with a JSON body: texts to embed."""

    texts: list[str] = Field(min_length=1, max_length=MAX_TEXTS)

    @field_validator("texts")
    @classmethod
    def _texts(cls, v: list[str]) -> list[str]:
        for t in v:
            if not t.strip():
                raise ValueError("texts must not be empty")
            if len(t) > MAX_TEXT_LENGTH:
                raise ValueError(f"a text is at most {MAX_TEXT_LENGTH} characters")
        return v


class ScoreOptions(_Strict):
    """The sentences to score against an image."""

    texts: list[str] = Field(
        min_length=1,
        max_length=MAX_SCORE_TEXTS,
        description="sentences such as 'Small left pleural effusion.' and its alternatives ('Small right pleural "
        "effusion.', 'No pleural effusion.'); a multipart form sends them as one JSON array",
    )

    @field_validator("texts", mode="before")
    @classmethod
    def _from_form(cls, v: Any) -> Any:
        if isinstance(v, str):  # a multipart field: a JSON array of strings
            try:
                v = json.loads(v)
            except ValueError as exc:
                raise ValueError("texts must be a JSON array of strings") from exc
        if not isinstance(v, list) or not all(isinstance(t, str) for t in v):
            raise ValueError("texts must be a JSON array of strings")
        return v

    @field_validator("texts")
    @classmethod
    def _texts(cls, v: list[str]) -> list[str]:
        for t in v:
            if not t.strip():
                raise ValueError("texts must not be blank")
            if len(t) > MAX_SCORE_TEXT_LENGTH:
                raise ValueError(f"a text is at most {MAX_SCORE_TEXT_LENGTH} characters")
            if any(ord(c) < 32 or ord(c) == 127 for c in t):
                raise ValueError("texts must not hold control characters")
        return v


class ScoreJSON(ScoreOptions):
    """``/v1/score`` with a JSON body: the image is pulled from a DICOMweb server."""

    dicomweb: DicomWebSource


class RetrieveRequest(_Strict):
    """Find the training studies closest to a text."""

    text: str = Field(min_length=1, max_length=MAX_TEXT_LENGTH)
    k: int = Field(default=5, ge=1, le=MAX_TOP_K)
    against: Literal["images", "reports"] = Field(
        default="images", description="images: studies whose image matches the text; reports: similar report text"
    )

    @field_validator("text")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("text must not be blank")
        return v


class Prediction(BaseModel):
    finding: str
    probability: float = Field(ge=0, le=1)
    calibrated: bool = Field(
        default=False, description="the probability is calibrated (the model's own findings, fitted on val)"
    )
    heatmap_png: str | None = Field(default=None, description="base64 RGBA PNG overlay, the size of image_png")
    slice: int | None = Field(default=None, description="3D: the axial slice shown (where the map peaks)")
    slice_png: str | None = Field(default=None, description="3D: that slice of the image, base64 PNG")


class SimilarStudy(BaseModel):
    study: str = Field(description="pseudonymous study id (st-...)")
    report: str
    score: float


class ImageInfo(BaseModel):
    spatial_dims: int
    shape: list[int]
    spacing: list[float]
    modality: str | None = None
    photometric_interpretation: str | None = None
    n_files: int | None = None


class StoredReport(BaseModel):
    sop_instance_uid: str = Field(description="the stored SR's SOPInstanceUID")
    series_instance_uid: str = Field(description="the stored SR's SeriesInstanceUID")


class DiagnoseResponse(BaseModel):
    predictions: list[Prediction]
    image: ImageInfo
    image_png: str | None = Field(default=None, description="the model's input as base64 PNG (with heatmaps)")
    similar_reports: list[SimilarStudy] | None = None
    warnings: list[str] = Field(default_factory=list)
    batch_size: int = Field(description="how many requests shared this forward pass")
    stored: StoredReport | None = Field(default=None, description='with "store": true, the SR written to the PACS')


class EmbedResponse(BaseModel):
    kind: Literal["image", "text"]
    dim: int
    embeddings: list[list[float]]
    batch_size: int


class PairScore(BaseModel):
    text: str
    score: float = Field(description="cosine + side_check: what the robustness suite ranks by; higher matches better")
    cosine: float = Field(description="cosine of the image and text embeddings")
    side_check: float = Field(description="the side check's term (0 where it does not read the text)")
    checked: bool = Field(description="the side check read this text (one affirmative sentence naming one side)")


class ScoreResponse(BaseModel):
    scores: list[PairScore] = Field(description="one per text, in the order sent")
    side_check: bool = Field(description="the model has a fitted side check")
    image: ImageInfo
    warnings: list[str] = Field(default_factory=list)
    batch_size: int = Field(description="how many requests shared this forward pass")


class RetrieveResponse(BaseModel):
    against: Literal["images", "reports"]
    results: list[SimilarStudy]


class HealthResponse(BaseModel):
    status: Literal["ok"]
    version: str


class ModelResponse(BaseModel):
    model: dict[str, Any]
    cohort: dict[str, Any]
    findings: list[str]
    metrics: dict[str, Any] | None
    retrieval: dict[str, Any]
    serving: dict[str, Any]
    calibration: dict[str, Any] | None = Field(
        default=None, description="which findings' probabilities are calibrated, and on which split it was fitted"
    )
    side_check: bool = Field(
        default=False, description="/v1/score's pair scores carry a fitted side check (/v1/diagnose's do not)"
    )
