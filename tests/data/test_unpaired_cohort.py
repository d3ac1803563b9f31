"""Unpaired studies: image-only and report-only rows are flagged (not quarantined), kept in train, and leave the
paired studies' splits alone; a row with neither is quarantined with its reason."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from medvlp.data.build import build_cohort
from medvlp.data.cache import CachedCohort
from medvlp.data.cohort import load_cohort
from medvlp.data.synthetic import synthesize


def _manifest(yaml_path: Path) -> pd.DataFrame:
    return pd.read_csv(yaml_path.parent / "manifest.csv", dtype=str, keep_default_na=False)


def _by_study_id(out: Path) -> dict[str, str]:
    """Original study_id -> pseudonym, from the cache's secret/ids.csv."""
    ids = pd.read_csv(out / "secret" / "ids.csv", dtype=str)
    return dict(zip(ids["study_id"], ids["study"], strict=True))


def _split_ids(cache: CachedCohort, out: Path, name: str, need: tuple[str, ...] = ("image", "report")) -> list[str]:
    """The original study_ids of one split of a cache, in the cache's order."""
    original = {v: k for k, v in _by_study_id(out).items()}
    return [original[s] for s in cache.split(name, need)["study"]]


def test_unpaired_rows_are_flagged_kept_in_train_and_leave_val_and_test_unchanged(tmp_path: Path) -> None:
    paired = synthesize("cxr", 24, tmp_path / "paired", seed=1)
    mixed = synthesize("cxr", 24, tmp_path / "mixed", seed=1, unpaired=3)
    m = _manifest(mixed)
    pm = _manifest(paired)
    pd.testing.assert_frame_equal(m.head(24), pm)  # the pairs, their subjects and splits are the same
    train_row = m.index[m["split"] == "train"][0]
    extra = pd.DataFrame(
        [
            {"subject_id": "X1", "study_id": "X-NEITHER", "image": "", "report": "  ", "split": "train"},
            {"subject_id": "X2", "study_id": "X-BLANK-SPLIT", "image": "", "report": m.at[0, "report"], "split": ""},
            {
                "subject_id": "X3",
                "study_id": "X-IN-TEST",
                "image": m.at[train_row, "image"],
                "report": "",
                "split": "test",
            },
        ]
    )
    m = pd.concat([m, extra], ignore_index=True).fillna("")
    m.to_csv(mixed.parent / "manifest.csv", index=False)

    s_paired = build_cohort(paired, tmp_path / "cache-paired", workers=0)
    s_mixed = build_cohort(mixed, tmp_path / "cache-mixed", workers=0)
    assert (s_paired.ingested, s_paired.quarantined) == (24, 0)
    assert (s_mixed.ingested, s_mixed.quarantined) == (31, 2)
    summary = json.loads((tmp_path / "cache-mixed" / "summary.json").read_text())
    assert (summary["paired"], summary["image_only"], summary["report_only"]) == (24, 3, 4)
    before = json.loads((tmp_path / "cache-paired" / "summary.json").read_text())
    assert (before["paired"], before["image_only"], before["report_only"]) == (24, 0, 0)

    # the row with neither, and an unpaired row outside train, are quarantined with their reasons
    q = pd.read_csv(tmp_path / "cache-mixed" / "quarantine.csv")
    pseudo = _by_study_id(tmp_path / "cache-mixed")
    reasons = dict(zip(q["study"], q["reason"], strict=True))
    assert reasons[pseudo["X-NEITHER"]] == "empty report and no image"
    assert "image-only study in split 'test'" in reasons[pseudo["X-IN-TEST"]]
    assert "train only" in reasons[pseudo["X-IN-TEST"]] or "training only" in reasons[pseudo["X-IN-TEST"]]
    assert list(q["row"]) == [len(m) - 1, len(m) + 1]  # manifest lines of the two rows (header = line 1)

    cache = CachedCohort.open(tmp_path / "cache-mixed")
    rec = cache.records.set_index("study")
    unpaired_ids = [*m["study_id"][24:30], "X-BLANK-SPLIT"]
    for sid in unpaired_ids:  # every unpaired study is in train, flagged by what it holds
        assert rec.at[pseudo[sid], "split"] == "train", sid
    image_only = [pseudo[s] for s in m["study_id"][24:27]]
    report_only = [pseudo[s] for s in [*m["study_id"][27:30], "X-BLANK-SPLIT"]]
    assert rec.loc[image_only, "has_image"].all() and not rec.loc[image_only, "has_report"].any()
    assert (rec.loc[image_only, "report"] == "").all()
    assert not rec.loc[report_only, "has_image"].any() and rec.loc[report_only, "has_report"].all()
    assert all(cache.image_path(s).is_file() for s in image_only)
    assert not any(cache.image_path(s).exists() for s in report_only)

    # selection: pairs by default, every image or every report on request; unpaired studies only in train
    train_pairs = set(_split_ids(cache, tmp_path / "cache-mixed", "train"))
    assert not train_pairs & set(unpaired_ids)
    assert set(_split_ids(cache, tmp_path / "cache-mixed", "train", ("image",))) == train_pairs | set(
        m["study_id"][24:27]
    )
    assert set(_split_ids(cache, tmp_path / "cache-mixed", "train", ("report",))) == train_pairs | set(
        [*m["study_id"][27:30], "X-BLANK-SPLIT"]
    )
    with pytest.raises(ValueError, match="need must list"):
        cache.split("train", ("labels",))

    # val and test (and the train pairs) are those of the same cohort without the unpaired rows, image for image
    old = CachedCohort.open(tmp_path / "cache-paired")
    for name in ("train", "val", "test"):
        ids_old = _split_ids(old, tmp_path / "cache-paired", name)
        assert ids_old == _split_ids(cache, tmp_path / "cache-mixed", name), name
        for need in (("image",), ("report",)):
            if name != "train":
                assert _split_ids(cache, tmp_path / "cache-mixed", name, need) == ids_old, (name, need)
    for sid in _split_ids(old, tmp_path / "cache-paired", "test"):
        a = old.load_image(_by_study_id(tmp_path / "cache-paired")[sid])
        b = cache.load_image(pseudo[sid])
        np.testing.assert_array_equal(a, b)


def test_a_cache_without_pairing_columns_reads_as_all_pairs(cxr_cohort: Path, tmp_path: Path) -> None:
    out = tmp_path / "cache"
    build_cohort(cxr_cohort, out, workers=0)
    records = pd.read_parquet(out / "records.parquet").drop(columns=["has_image", "has_report"])
    records.to_parquet(out / "records.parquet", index=False)  # as a cache built before unpaired studies
    cache = CachedCohort.open(out)
    assert len(cache.split("train")) == len(cache.split("train", ("image",))) == (records["split"] == "train").sum()


def test_validate_counts_unpaired_rows_and_a_blank_split_means_train(cxr_cohort: Path) -> None:
    m = _manifest(cxr_cohort)
    m.at[0, "report"], m.at[0, "split"] = "", ""
    m.at[1, "image"], m.at[1, "split"] = "", ""
    m.to_csv(cxr_cohort.parent / "manifest.csv", index=False)
    c = load_cohort(cxr_cohort)
    assert list(c.manifest["split"][:2]) == ["train", "train"]
    r = subprocess.run(
        [sys.executable, "-m", "medvlp", "cohort", "validate", str(cxr_cohort)],
        capture_output=True,
        text=True,
        env=os.environ | {"PYTHONWARNINGS": "ignore"},
        check=False,
    )
    assert r.returncode == 0, r.stderr
    out = " ".join((r.stdout + r.stderr).split())
    assert "1 image-only and 1 report-only studies" in out and "22 pairs" in out
    assert "24 usable, 0 would be quarantined" in out


@pytest.mark.parametrize(("kind", "n"), [("cxr", 4), ("ct", 3)])
def test_cli_synth_unpaired_writes_the_rows_and_they_build(kind: str, n: int, tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "medvlp", "cohort", "synth", "--kind", kind, "--n", str(n), "--unpaired", "2"]
    r = subprocess.run([*cmd, "--out", str(tmp_path / "c")], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    yaml_path = tmp_path / "c" / "cohort.yaml"
    m = _manifest(yaml_path)
    assert len(m) == n + 4
    plain = _manifest(synthesize(kind, n, tmp_path / "plain", seed=0))
    pd.testing.assert_frame_equal(m.head(n), plain)
    image_only, report_only = m.iloc[n : n + 2], m.iloc[n + 2 :]
    assert (image_only["report"] == "").all() and (image_only["image"] != "").all()
    assert (report_only["image"] == "").all() and (report_only["report"].str.len() > 20).all()
    assert (m["split"].iloc[n:] == "train").all()
    assert not set(m["subject_id"].iloc[n:]) & set(plain["subject_id"])  # subjects of their own: no leak
    findings = load_cohort(yaml_path).findings
    assert (image_only[findings] == "").all().all()  # no report, no labels read from it
    assert all((tmp_path / "c" / p).exists() for p in image_only["image"])
    info = json.loads((tmp_path / "c" / "synthetic.json").read_text())
    assert info["unpaired"] == {"image_only": 2, "report_only": 2, "split": "train"}
    assert info["realized"] == json.loads((tmp_path / "plain" / "synthetic.json").read_text())["realized"]

    s = build_cohort(yaml_path, tmp_path / "cache", workers=0)
    assert (s.ingested, s.quarantined) == (n + 4, 0)
    summary = json.loads((tmp_path / "cache" / "summary.json").read_text())
    assert (summary["paired"], summary["image_only"], summary["report_only"]) == (n, 2, 2)

    r = subprocess.run([*cmd[:-1], "-1", "--out", str(tmp_path / "bad")], capture_output=True, text=True, check=False)
    assert r.returncode == 2 and "--unpaired" in r.stderr
