"""The cohort format a user writes: a YAML file, a manifest CSV and an optional grounding CSV.

Every mistake is reported in the user's own terms (file, row, column) and all of them at once, so a
cohort can be fixed in one pass.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import pandas as pd
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

REQUIRED_COLUMNS = ("subject_id", "study_id", "image", "report", "split")
SPLITS = ("train", "val", "test")
LABEL_VALUES = (1, 0, -1)


class CohortError(ValueError):
    """A cohort definition is wrong. ``problems`` lists every mistake found, each in the user's terms."""

    def __init__(self, source: str | Path, problems: list[str]) -> None:
        self.source = str(source)
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} problem(s):\n{lines}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class WindowIntensity(_Strict):
    """Clip to a window (e.g. abdomen: center 40, width 400 HU) and scale to [0, 1]."""

    mode: Literal["window"]
    center: float
    width: float = Field(gt=0)


class PercentileIntensity(_Strict):
    """Clip to the image's own percentiles and scale to [0, 1] (radiographs, MR)."""

    mode: Literal["percentile"]
    lower: float = Field(default=0.5, ge=0, lt=100)
    upper: float = Field(default=99.5, gt=0, le=100)

    @model_validator(mode="after")
    def _ordered(self) -> PercentileIntensity:
        if self.lower >= self.upper:
            raise ValueError(f"lower percentile {self.lower} must be below upper {self.upper}")
        return self


Intensity = Annotated[WindowIntensity | PercentileIntensity, Field(discriminator="mode")]


class PreprocessSpec(_Strict):
    """How `medvlp cohort build` turns a decoded image into a fixed-size training array.

    Order: orientation (3D), the crop to the body (``crop_foreground``, off by default), resampling to ``spacing``,
    intensity scaling to [0, 1], then ``fit``:
    ``resize`` scales the image (keeping its aspect ratio) to fit inside ``size`` and pads;
    ``crop_or_pad`` keeps the physical scale and center-crops or pads to ``size``.

    ``size: auto`` (opt-in) lets `medvlp cohort build` choose spacing and size from the cohort itself
    (:mod:`medvlp.data.resolution`): the smallest annotated box keeps ``min_lesion_voxels`` voxels on every axis
    within ``voxel_budget`` voxels per image when it can. The build records the resolved spec in summary.json.
    """

    size: tuple[int, ...] | Literal["auto"]
    spacing: tuple[float, ...] | None = None
    orientation: str | None = None
    intensity: Intensity = PercentileIntensity(mode="percentile")
    fit: Literal["resize", "crop_or_pad"] | None = None
    crop_foreground: bool = Field(
        default=False,
        description="crop to the body before resampling (the bounding box of voxels above a tenth of the way from "
        "the image's minimum to its 99.5th percentile, plus a margin), so that the air around it costs no voxels",
    )
    voxel_budget: int | None = Field(default=None, gt=0, exclude=True)  # size: auto only; default 64*64*32 in 3D
    min_lesion_voxels: float = Field(default=3.0, gt=0, exclude=True)  # size: auto only

    @field_validator("size")
    @classmethod
    def _positive_size(cls, v: tuple[int, ...] | str) -> tuple[int, ...] | str:
        if v != "auto" and any(s < 4 for s in v):
            raise ValueError(f"every size must be at least 4 voxels, got {list(v)}")
        return v

    @model_validator(mode="after")
    def _auto_alone(self) -> PreprocessSpec:
        if self.size == "auto" and self.spacing is not None:
            raise ValueError("size: auto chooses the spacing too; remove preprocess.spacing or give a size")
        if self.size != "auto" and (self.voxel_budget is not None or "min_lesion_voxels" in self.model_fields_set):
            raise ValueError("voxel_budget and min_lesion_voxels only apply with size: auto")
        return self

    @property
    def auto(self) -> bool:
        """Whether `cohort build` chooses spacing and size from the cohort (``size: auto``)."""
        return self.size == "auto"

    @field_validator("orientation")
    @classmethod
    def _axcodes(cls, v: str | None) -> str | None:
        if v is None:
            return v
        v = v.upper()
        if len(v) != 3 or {c for c in v} - set("RLAPSI") or len({c for c in v}) != 3:
            raise ValueError(f"orientation must be 3 axis codes such as 'RAS' or 'LPS', got {v!r}")
        return v

    def resolved_fit(self) -> str:
        if self.fit is not None:
            return self.fit
        return "crop_or_pad" if self.spacing is not None else "resize"


def default_preprocess(spatial_dims: int) -> PreprocessSpec:
    """CPU-friendly defaults: 128 px radiographs, 64x64x32 CT at 6x6x8 mm in an abdominal window."""
    if spatial_dims == 2:
        return PreprocessSpec(size=(128, 128))
    return PreprocessSpec(
        size=(64, 64, 32),
        spacing=(6.0, 6.0, 8.0),
        orientation="RAS",
        intensity=WindowIntensity(mode="window", center=40, width=400),
    )


class SurvivalSpec(_Strict):
    time: str
    event: str


class PromptTemplates(_Strict):
    """Zero-shot prompt templates: ``{finding}`` (the name as written) and ``{Finding}`` (first letter upper-cased)."""

    positive: list[str] = Field(min_length=1)
    negative: list[str] = Field(min_length=1)

    @field_validator("positive", "negative")
    @classmethod
    def _renderable(cls, v: list[str]) -> list[str]:
        for t in v:
            try:
                t.format(finding="x", Finding="X")
            except (KeyError, IndexError, ValueError) as exc:
                raise ValueError(f"template {t!r} may only use {{finding}} and {{Finding}} ({exc})") from exc
            if "{finding}" not in t and "{Finding}" not in t:
                raise ValueError(f"template {t!r} names no {{finding}} or {{Finding}}")
        return v


class PromptSpec(_Strict):
    """The cohort's own words for its findings, used for every zero-shot prompt of a model trained on it.

    ``synonyms`` maps a finding (one of the cohort's ``findings``) to other names for it (``"enlarged cardiac
    silhouette"``); every template is rendered with the finding's name and each synonym. ``templates`` replaces
    the default templates (:data:`medvlp.tasks.zeroshot.DEFAULT_TEMPLATES`) when given.
    """

    synonyms: dict[str, list[str]] = Field(default_factory=dict)
    templates: PromptTemplates | None = None

    @field_validator("synonyms")
    @classmethod
    def _nonempty(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        for finding, names in v.items():
            if any(not str(n).strip() for n in names):
                raise ValueError(f"synonyms of {finding!r} include an empty name")
        return {k: [" ".join(str(n).split()) for n in names] for k, names in v.items()}


class CohortSpec(_Strict):
    """The cohort YAML. Paths are relative to the YAML's folder (``root``)."""

    name: str = Field(min_length=1)
    modality: str = Field(min_length=1)
    spatial_dims: Literal[2, 3]
    manifest: Path
    grounding: Path | None = None
    findings: list[str] = Field(default_factory=list)
    covariates: list[str] = Field(default_factory=list)
    survival: SurvivalSpec | None = None
    preprocess: PreprocessSpec | None = None
    prompts: PromptSpec | None = None
    roots: list[Path] = Field(
        default_factory=list,
        description="folders outside the cohort folder that manifest paths may point into (e.g. /mnt/export)",
    )
    root: Path = Field(default=Path("."), exclude=True)

    @field_validator("findings", "covariates")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        dupes = sorted({x for x in v if v.count(x) > 1})
        if dupes:
            raise ValueError(f"listed more than once: {', '.join(dupes)}")
        reserved = set(v) & set(REQUIRED_COLUMNS)
        if reserved:
            raise ValueError(f"{', '.join(sorted(reserved))} is a reserved manifest column")
        return v

    @model_validator(mode="after")
    def _synonyms_known(self) -> CohortSpec:
        unknown = [f for f in (self.prompts.synonyms if self.prompts else {}) if f not in self.findings]
        if unknown:
            raise ValueError(
                f"prompts.synonyms names finding(s) not in findings: {', '.join(repr(f) for f in unknown)}"
            )
        return self

    @model_validator(mode="after")
    def _dims_agree(self) -> CohortSpec:
        pp = self.preprocess
        if pp is None:
            return self
        if not pp.auto and len(pp.size) != self.spatial_dims:
            raise ValueError(f"preprocess.size {list(pp.size)} needs {self.spatial_dims} values (spatial_dims)")
        if pp.spacing is not None and len(pp.spacing) != self.spatial_dims:
            raise ValueError(f"preprocess.spacing {list(pp.spacing)} needs {self.spatial_dims} values (spatial_dims)")
        if pp.orientation is not None and self.spatial_dims != 3:
            raise ValueError("preprocess.orientation only applies to 3D cohorts (spatial_dims: 3)")
        return self

    @property
    def preprocessing(self) -> PreprocessSpec:
        return self.preprocess or default_preprocess(self.spatial_dims)

    def resolve(self, relative: Path | str) -> Path:
        p = Path(relative)
        return p if p.is_absolute() else self.root / p

    def outside_roots(self, relative: Path | str) -> bool:
        """Whether a manifest path leads outside the cohort folder and every declared root (``..``, absolute).

        Paths are compared after lexical normalisation (``a/../..`` resolved, symbolic links kept as the user
        laid them out).
        """
        target = Path(os.path.normpath(os.path.abspath(self.resolve(relative))))
        for base in (self.root, *self.roots):
            b = Path(os.path.normpath(os.path.abspath(self.resolve(base))))
            if target == b or b in target.parents:
                return False
        return True

    @property
    def manifest_path(self) -> Path:
        return self.resolve(self.manifest)

    @property
    def grounding_path(self) -> Path | None:
        return None if self.grounding is None else self.resolve(self.grounding)

    @property
    def box_columns(self) -> tuple[str, ...]:
        return ("x", "y", "w", "h") if self.spatial_dims == 2 else ("x", "y", "z", "w", "h", "d")


@dataclass(frozen=True)
class Cohort:
    """A validated cohort: its spec, the manifest (one row per study) and the grounding boxes."""

    spec: CohortSpec
    manifest: pd.DataFrame
    grounding: pd.DataFrame

    @property
    def findings(self) -> list[str]:
        return list(self.spec.findings)


def _format_pydantic(err: ValidationError) -> list[str]:
    out = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        got = e.get("input")
        shown = "" if isinstance(got, dict) or e["type"] == "missing" else f" (got {got!r})"
        out.append(f"field '{where}': {msg}{shown}")
    return out


def load_spec(path: str | Path) -> CohortSpec:
    """Read and validate a cohort YAML (not its CSV files)."""
    path = Path(path)
    if not path.is_file():
        raise CohortError(path, ["file not found"])
    try:
        raw: Any = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise CohortError(path, [f"not valid YAML: {exc}"]) from exc
    if not isinstance(raw, dict):
        raise CohortError(path, ["must be a YAML mapping with keys name, modality, spatial_dims, manifest, ..."])
    try:
        return CohortSpec.model_validate({**raw, "root": path.resolve().parent})
    except ValidationError as exc:
        raise CohortError(path, _format_pydantic(exc)) from exc


def _read_csv(path: Path, what: str, problems: list[str]) -> pd.DataFrame | None:
    if not path.is_file():
        problems.append(f"{what} file not found: {path}")
        return None
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        problems.append(f"{path.name}: cannot be read as CSV ({exc})")
        return None


def _check_manifest(spec: CohortSpec, df: pd.DataFrame, name: str, problems: list[str]) -> pd.DataFrame:
    survival_cols = [spec.survival.time, spec.survival.event] if spec.survival else []
    needed = [*REQUIRED_COLUMNS, *spec.findings, *spec.covariates, *survival_cols]
    missing = [c for c in needed if c not in df.columns]
    if missing:
        problems.append(f"{name}: missing column(s) {', '.join(repr(c) for c in missing)}")
        return df
    df = df.copy()
    for c in REQUIRED_COLUMNS:
        df[c] = df[c].str.strip()

    def row_problem(i: int, msg: str) -> None:
        sid = df.at[i, "study_id"] or "?"
        problems.append(f"{name} row {i + 2} (study_id {sid}): {msg}")  # +2: header line, 1-based

    for col in ("subject_id", "study_id"):
        for i in df.index[df[col] == ""]:
            row_problem(i, f"column '{col}' is empty")
    # an unpaired row (no image or no report) serves training only: a blank split means train
    unpaired = (df["image"] == "") | (df["report"] == "")
    df.loc[unpaired & (df["split"] == ""), "split"] = "train"
    roots = ", ".join(str(r) for r in spec.roots) or "none declared"
    for i in df.index[df["image"] != ""]:
        if spec.outside_roots(df.at[i, "image"]):
            row_problem(i, f"image path leads outside the cohort folder and its roots ({roots}); declare `roots:`")
    for i in df.index:
        rep = str(df.at[i, "report"]).strip()
        if rep.lower().endswith(".txt") and "\n" not in rep and spec.outside_roots(rep):
            row_problem(i, f"report path leads outside the cohort folder and its roots ({roots}); declare `roots:`")
    dup = df["study_id"][(df["study_id"] != "") & df["study_id"].duplicated(keep="first")]
    for i in dup.index:
        row_problem(i, "study_id appears more than once in the manifest")
    bad_split = ~df["split"].isin(SPLITS)
    for i in df.index[bad_split]:
        row_problem(i, f"column 'split' must be one of {', '.join(SPLITS)}, got {df.at[i, 'split']!r}")
    subj_splits = df[~bad_split].groupby("subject_id")["split"].nunique()
    for subj in subj_splits.index[subj_splits > 1]:
        problems.append(f"{name}: subject {subj} has studies in more than one split (leaks between train and test)")

    for col in spec.findings:
        raw = df[col].str.strip()
        num = pd.to_numeric(raw, errors="coerce")
        bad = (raw != "") & ~num.isin(LABEL_VALUES)
        for i in df.index[bad]:
            row_problem(i, f"finding column '{col}' must be 1, 0, -1 or blank, got {df.at[i, col]!r}")
        df[col] = num.where(~bad).astype("Int8")
    for col in [*spec.covariates, *survival_cols]:
        raw = df[col].str.strip()
        num = pd.to_numeric(raw, errors="coerce")
        for i in df.index[(raw != "") & num.isna()]:
            row_problem(i, f"column '{col}' must be a number or blank, got {df.at[i, col]!r}")
        df[col] = num.astype("float64")
    if spec.survival:
        t, e = spec.survival.time, spec.survival.event
        for i in df.index[df[t] < 0]:
            row_problem(i, f"survival time '{t}' must not be negative, got {df.at[i, t]}")
        for i in df.index[df[e].notna() & ~df[e].isin([0, 1])]:
            row_problem(i, f"survival event '{e}' must be 0 (censored) or 1 (event), got {df.at[i, e]}")
    return df


def _check_grounding(
    spec: CohortSpec, df: pd.DataFrame, studies: set[str], name: str, problems: list[str]
) -> pd.DataFrame:
    cols = ["study_id", "category_name", "label_text", *spec.box_columns]
    missing = [c for c in cols if c not in df.columns]
    if missing:
        problems.append(
            f"{name}: missing column(s) {', '.join(repr(c) for c in missing)} (a {spec.spatial_dims}D cohort)"
        )
        return pd.DataFrame(columns=cols)
    df = df[cols].copy()
    for i in df.index:
        where = f"{name} row {i + 2} (study_id {df.at[i, 'study_id'] or '?'})"
        if df.at[i, "study_id"] not in studies:
            problems.append(f"{where}: study_id is not in the manifest")
        if not str(df.at[i, "label_text"]).strip():
            problems.append(f"{where}: label_text is empty")
    for c in spec.box_columns:
        num = pd.to_numeric(df[c], errors="coerce")
        for i in df.index[num.isna()]:
            problems.append(f"{name} row {i + 2}: column '{c}' must be a number, got {df.at[i, c]!r}")
        df[c] = num
    for c in ("w", "h", "d"):
        if c in df.columns:
            for i in df.index[df[c] <= 0]:
                problems.append(f"{name} row {i + 2}: box size '{c}' must be positive, got {df.at[i, c]}")
    for c in ("x", "y", "z"):
        if c in df.columns:
            for i in df.index[df[c] < 0]:
                problems.append(f"{name} row {i + 2}: box corner '{c}' must not be negative, got {df.at[i, c]}")
    return df


def load_cohort(path: str | Path) -> Cohort:
    """Read and validate a cohort YAML with its manifest and grounding CSVs.

    Raises:
        CohortError: listing every problem found, each with its file, row and column.
    """
    spec = load_spec(path)
    problems: list[str] = []
    manifest = _read_csv(spec.manifest_path, "manifest", problems)
    if manifest is not None:
        manifest = _check_manifest(spec, manifest, spec.manifest_path.name, problems)
    grounding = pd.DataFrame(columns=["study_id", "category_name", "label_text", *spec.box_columns])
    gpath = spec.grounding_path
    if gpath is not None and manifest is not None and "study_id" in manifest.columns:
        g = _read_csv(gpath, "grounding", problems)
        if g is not None:
            grounding = _check_grounding(spec, g, set(manifest["study_id"]), gpath.name, problems)
    if problems or manifest is None:
        raise CohortError(path, problems)
    return Cohort(spec=spec, manifest=manifest.reset_index(drop=True), grounding=grounding.reset_index(drop=True))
