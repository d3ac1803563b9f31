"""The cohort format: every mistake reported with its file, row and column."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import yaml

from medvlp.data.cohort import CohortError, load_cohort, load_spec


def _write(tmp_path: Path, spec: dict, manifest: pd.DataFrame, grounding: pd.DataFrame | None = None) -> Path:
    manifest.to_csv(tmp_path / "manifest.csv", index=False)
    if grounding is not None:
        grounding.to_csv(tmp_path / "grounding.csv", index=False)
    path = tmp_path / "cohort.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


BASE = {"name": "t", "modality": "CR", "spatial_dims": 2, "manifest": "manifest.csv", "findings": ["effusion"]}


def _manifest(**over: list) -> pd.DataFrame:
    cols = {
        "subject_id": ["P1", "P2", "P3"],
        "study_id": ["S1", "S2", "S3"],
        "image": ["a.dcm", "b.dcm", "c.dcm"],
        "report": ["No effusion.", "Small effusion.", "Possible effusion."],
        "split": ["train", "val", "test"],
        "effusion": ["0", "1", "-1"],
    }
    cols.update(over)
    return pd.DataFrame(cols)


def test_synthetic_cohort_is_valid(cxr_cohort_src: Path) -> None:
    c = load_cohort(cxr_cohort_src)
    assert len(c.manifest) == 24
    assert c.spec.spatial_dims == 2
    assert set(c.manifest["split"]) <= {"train", "val", "test"}
    assert c.manifest[c.findings].isin([1, 0, -1]).to_numpy()[c.manifest[c.findings].notna().to_numpy()].all()
    assert len(c.grounding) > 0


def test_labels_parsed_with_blank_unknown(tmp_path: Path) -> None:
    c = load_cohort(_write(tmp_path, BASE, _manifest(effusion=["0", "", "-1"])))
    assert c.manifest["effusion"].tolist()[0] == 0
    assert pd.isna(c.manifest["effusion"].tolist()[1])
    assert c.manifest["effusion"].tolist()[2] == -1


def test_every_manifest_mistake_is_reported_with_row_and_column(tmp_path: Path) -> None:
    m = _manifest(
        study_id=["S1", "S1", "S3"],
        split=["train", "training", "test"],
        effusion=["yes", "1", "0"],
        subject_id=["P1", "P1", "P3"],
    )
    with pytest.raises(CohortError) as ei:
        load_cohort(_write(tmp_path, BASE, m))
    text = str(ei.value)
    assert "manifest.csv row 2 (study_id S1): finding column 'effusion' must be 1, 0, -1 or blank, got 'yes'" in text
    assert "manifest.csv row 3 (study_id S1): study_id appears more than once" in text
    assert "row 3 (study_id S1): column 'split' must be one of train, val, test, got 'training'" in text
    assert len(ei.value.problems) == 3


def test_subject_in_two_splits_is_a_leak(tmp_path: Path) -> None:
    m = _manifest(subject_id=["P1", "P1", "P3"])
    with pytest.raises(CohortError, match="subject P1 has studies in more than one split"):
        load_cohort(_write(tmp_path, BASE, m))


def test_missing_columns_named(tmp_path: Path) -> None:
    m = _manifest().drop(columns=["split", "effusion"])
    with pytest.raises(CohortError, match="missing column\\(s\\) 'split', 'effusion'"):
        load_cohort(_write(tmp_path, BASE, m))


def test_covariates_and_survival_checked(tmp_path: Path) -> None:
    spec = BASE | {"covariates": ["age"], "survival": {"time": "time", "event": "event"}}
    m = _manifest(age=["60", "old", ""], time=["1.5", "-2", "3"], event=["1", "0", "2"])
    with pytest.raises(CohortError) as ei:
        load_cohort(_write(tmp_path, spec, m))
    text = str(ei.value)
    assert "row 3 (study_id S2): column 'age' must be a number or blank, got 'old'" in text
    assert "row 3 (study_id S2): survival time 'time' must not be negative" in text
    assert "row 4 (study_id S3): survival event 'event' must be 0 (censored) or 1 (event)" in text


def test_grounding_checked_against_manifest(tmp_path: Path) -> None:
    g = pd.DataFrame(
        {
            "study_id": ["S2", "S9"],
            "category_name": ["effusion", "effusion"],
            "label_text": ["Small effusion.", "x"],
            "x": [1, 2],
            "y": [1, 2],
            "w": [5, -1],
            "h": [5, 5],
        }
    )
    with pytest.raises(CohortError) as ei:
        load_cohort(_write(tmp_path, BASE | {"grounding": "grounding.csv"}, _manifest(), g))
    text = str(ei.value)
    assert "grounding.csv row 3 (study_id S9): study_id is not in the manifest" in text
    assert "grounding.csv row 3: box size 'w' must be positive, got -1" in text


def test_3d_grounding_needs_z_and_d(tmp_path: Path) -> None:
    g = pd.DataFrame(
        {"study_id": ["S2"], "category_name": ["m"], "label_text": ["m"], "x": [1], "y": [1], "w": [2], "h": [2]}
    )
    spec = BASE | {"spatial_dims": 3, "grounding": "grounding.csv"}
    with pytest.raises(CohortError, match="missing column\\(s\\) 'z', 'd' \\(a 3D cohort\\)"):
        load_cohort(_write(tmp_path, spec, _manifest(), g))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"spatial_dims": 4}, "field 'spatial_dims'"),
        ({"preprocess": {"size": [64, 64, 64]}}, "preprocess.size [64, 64, 64] needs 2 values"),
        ({"preprocess": {"size": [64, 64], "intensity": {"mode": "gamma"}}}, "field 'preprocess.intensity'"),
        ({"findings": ["a", "a"]}, "listed more than once: a"),
        ({"colour": "red"}, "field 'colour': Extra inputs are not permitted"),
        ({"preprocess": {"size": [64, 64], "orientation": "RAS"}}, "only applies to 3D cohorts"),
    ],
)
def test_yaml_mistakes(tmp_path: Path, change: dict, message: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(BASE | change))
    with pytest.raises(CohortError) as ei:
        load_spec(path)
    assert message in str(ei.value)


def test_yaml_missing_fields_and_bad_yaml(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"name": "x"}))
    with pytest.raises(CohortError) as ei:
        load_spec(path)
    assert {"field 'modality': Field required", "field 'spatial_dims': Field required"} <= set(ei.value.problems)
    path.write_text("name: [unclosed")
    with pytest.raises(CohortError, match="not valid YAML"):
        load_spec(path)
    with pytest.raises(CohortError, match="file not found"):
        load_spec(tmp_path / "nope.yaml")


def test_paths_relative_to_the_yaml(tmp_path: Path) -> None:
    sub = tmp_path / "deep"
    sub.mkdir()
    path = _write(sub, BASE, _manifest())
    spec = load_spec(path)
    assert spec.resolve("a.dcm") == sub.resolve() / "a.dcm"


def test_manifest_paths_outside_the_cohort_folder_are_refused_unless_under_a_declared_root(tmp_path: Path) -> None:
    cohort = tmp_path / "cohort"
    export = tmp_path / "export"
    cohort.mkdir()
    export.mkdir()
    (export / "c.dcm").write_bytes(b"x")
    m = _manifest(image=["../../etc/passwd", "/etc/passwd", str(export / "c.dcm")])
    m.loc[0, "report"] = "../../../secret-notes.txt"
    path = _write(cohort, BASE, m)
    with pytest.raises(CohortError) as err:
        load_cohort(path)
    problems = "\n".join(err.value.problems)
    for row in (2, 3, 4):
        assert f"row {row} (study_id S{row - 1}): image path leads outside the cohort folder" in problems, problems
    assert "row 2 (study_id S1): report path leads outside" in problems
    # `a/../b.dcm` that stays inside is fine; an export mount declared under `roots:` is allowed
    m = _manifest(image=["sub/../a.dcm", "b.dcm", str(export / "c.dcm")])
    path = _write(cohort, {**BASE, "roots": [str(export)]}, m)
    assert list(load_cohort(path).manifest["image"]) == ["sub/../a.dcm", "b.dcm", str(export / "c.dcm")]
    # a root does not open its neighbours: `/export/../etc/passwd` is still outside
    m = _manifest(image=["a.dcm", f"{export}/../../etc/passwd", "b.dcm"])
    with pytest.raises(CohortError, match=r"row 3 .*image path leads outside"):
        load_cohort(_write(cohort, {**BASE, "roots": [str(export)]}, m))


def test_prompts_synonyms_and_templates_are_validated(tmp_path: Path) -> None:
    good = BASE | {
        "prompts": {
            "synonyms": {"effusion": ["fluid in the  pleural space"]},
            "templates": {"positive": ["{Finding} is seen."], "negative": ["No {finding}."]},
        }
    }
    spec = load_spec(_write(tmp_path, good, _manifest()))
    assert spec.prompts is not None and spec.prompts.synonyms == {"effusion": ["fluid in the pleural space"]}
    assert spec.prompts.templates is not None and spec.prompts.templates.negative == ["No {finding}."]
    assert load_spec(_write(tmp_path, BASE, _manifest())).prompts is None  # optional
    bad_key = BASE | {"prompts": {"synonyms": {"cardiomegaly": ["enlarged heart"]}}}
    with pytest.raises(ValueError, match="'cardiomegaly'") as info:
        load_spec(_write(tmp_path, bad_key, _manifest()))
    assert "not in findings" in str(info.value)
    for templates, words in [
        ({"positive": ["There is {disease}."], "negative": ["No {finding}."]}, "may only use"),
        ({"positive": ["Abnormal."], "negative": ["No {finding}."]}, "names no"),
        ({"positive": [], "negative": ["No {finding}."]}, "positive"),
    ]:
        with pytest.raises(CohortError, match=words):
            load_spec(_write(tmp_path, BASE | {"prompts": {"templates": templates}}, _manifest()))
    with pytest.raises(CohortError, match="empty name"):
        load_spec(_write(tmp_path, BASE | {"prompts": {"synonyms": {"effusion": [" "]}}}, _manifest()))
