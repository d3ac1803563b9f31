"""`medvlp cohort build`: round trip, quarantine of every kind of bad record, resume, privacy."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest

from medvlp.data.build import build_cohort
from medvlp.data.cache import CachedCohort
from medvlp.data.cohort import load_cohort
from medvlp.data.privacy import PHI_KEYWORDS, load_or_create_key, pseudonym


def _manifest(yaml_path: Path) -> pd.DataFrame:
    return pd.read_csv(yaml_path.parent / "manifest.csv", dtype=str, keep_default_na=False)


def _set_manifest(yaml_path: Path, df: pd.DataFrame) -> None:
    df.to_csv(yaml_path.parent / "manifest.csv", index=False)


def _dicom_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix not in {".csv", ".yaml", ".json"})


def test_round_trip_2d(cxr_cohort: Path, tmp_path: Path) -> None:
    out = tmp_path / "cache"
    s = build_cohort(cxr_cohort, out, workers=2)
    cohort = load_cohort(cxr_cohort)
    assert (s.ingested, s.quarantined, s.reused) == (24, 0, 0)
    cache = CachedCohort.open(out)
    key = load_or_create_key(out)
    assert cache.summary["ingested"] == 24 and cache.summary["quarantined"] == 0
    assert pd.read_csv(out / "quarantine.csv").empty
    # labels, splits and survival survive the trip, keyed by pseudonym
    m = cohort.manifest.assign(study=cohort.manifest["study_id"].map(lambda x: pseudonym(key, "st", x)))
    merged = m.merge(cache.records, on="study", suffixes=("_src", ""))
    assert len(merged) == 24
    for f in cohort.findings:
        assert merged[f + "_src"].astype("Float64").equals(merged[f].astype("Float64")), f
    assert (merged["split_src"] == merged["split"]).all()
    np.testing.assert_allclose(merged["time_src"], merged["time"])
    assert all(r.startswith("FINDINGS") or "IMPRESSION" in r for r in cache.records["report"])
    arr = cache.load_image(cache.records["study"][0])
    assert arr.shape == (1, 128, 128) and arr.dtype == np.float16
    assert float(arr.min()) >= 0.0 and float(arr.max()) <= 1.0 and float(arr.std()) > 0.05
    assert len(cache.grounding) == len(cohort.grounding)


def test_boxes_land_on_the_finding(cxr_cohort: Path, tmp_path: Path) -> None:
    """A nodule is a bright blob: inside its mapped box the cached image is brighter than just around it."""
    out = tmp_path / "cache"
    build_cohort(cxr_cohort, out, workers=0)
    cache = CachedCohort.open(out)
    nodules = cache.grounding[cache.grounding["category_name"] == "lung_nodule"]
    assert len(nodules) > 0
    for b in nodules.itertuples():
        img = cache.load_image(b.study)[0].astype(np.float32)
        x0, y0 = int(np.floor(b.x)), int(np.floor(b.y))
        x1, y1 = int(np.ceil(b.x + b.w)), int(np.ceil(b.y + b.h))
        inside = img[x0:x1, y0:y1].mean()
        ring = img[max(0, x0 - 4) : x1 + 4, max(0, y0 - 4) : y1 + 4]
        around = (ring.sum() - img[x0:x1, y0:y1].sum()) / (ring.size - (x1 - x0) * (y1 - y0))
        assert inside > around, (b.study, inside, around)


def test_round_trip_3d(ct_cohort: Path, tmp_path: Path) -> None:
    out = tmp_path / "cache"
    s = build_cohort(ct_cohort, out, workers=2)
    assert (s.ingested, s.quarantined) == (10, 0)
    cache = CachedCohort.open(out)
    assert cache.spatial_dims == 3
    arr = cache.load_image(cache.records["study"][0])
    assert arr.shape == (1, 64, 64, 32)
    g = cache.grounding
    assert {"x", "y", "z", "w", "h", "d"} <= set(g.columns)
    assert (g[["w", "h", "d"]] > 0).all().all()
    assert (g["x"] + g["w"] <= 64).all() and (g["z"] + g["d"] <= 32).all()


def test_every_kind_of_bad_record_is_quarantined_and_the_rest_builds(
    cxr_cohort: Path, ct_cohort: Path, tmp_path: Path
) -> None:
    root = cxr_cohort.parent
    m = _manifest(cxr_cohort)
    img = {i: root / m.at[i, "image"] for i in range(6)}
    originals = {i: img[i].read_bytes() for i in range(3)}
    img[0].write_bytes(originals[0][: len(originals[0]) // 2])  # truncated DICOM
    img[1].write_text("this is not an image\n")  # non-DICOM
    img[2].unlink()  # missing file
    m.at[3, "report"], m.at[3, "image"] = "   ", ""  # neither a report nor an image
    # a broken CT series (one slice removed) and a 3D series in a 2D cohort
    ct_m = _manifest(ct_cohort)
    broken = ct_cohort.parent / ct_m.at[0, "image"]
    slices = sorted(broken.iterdir())
    slices[len(slices) // 2].unlink()
    shutil.copytree(broken, root / "broken_series")
    shutil.copytree(ct_cohort.parent / ct_m.at[1, "image"], root / "volume")
    m.at[4, "image"] = "broken_series"
    m.at[5, "image"] = "volume"
    _set_manifest(cxr_cohort, m)

    out = tmp_path / "cache"
    s = build_cohort(cxr_cohort, out, workers=2)
    assert (s.ingested, s.quarantined) == (18, 6)
    q = pd.read_csv(out / "quarantine.csv")
    assert list(q.columns) == ["row", "study", "reason"]
    assert list(q["row"]) == [2, 3, 4, 5, 6, 7]  # manifest lines (the header is line 1)
    key = load_or_create_key(out)
    assert list(q["study"]) == [pseudonym(key, "st", m.at[i, "study_id"]) for i in range(6)]
    q = q.assign(study_id=m["study_id"][:6].to_numpy()).set_index("study_id")["reason"]
    sid = m["study_id"]
    assert "truncat" in q[sid[0]].lower() or "incomplete" in q[sid[0]].lower(), q[sid[0]]
    assert "not a dicom" in q[sid[1]].lower(), q[sid[1]]
    assert "not found" in q[sid[2]].lower(), q[sid[2]]
    assert q[sid[3]] == "empty report and no image"
    assert "missing" in q[sid[4]].lower() or "gap" in q[sid[4]].lower(), q[sid[4]]
    assert "3D" in q[sid[5]] and "2D" in q[sid[5]], q[sid[5]]
    assert len(CachedCohort.open(out).records) == 18

    # fixing the files brings those records in; the 18 good ones are reused, not redone
    for i in range(3):
        img[i].write_bytes(originals[i])
    s2 = build_cohort(cxr_cohort, out, workers=2)
    assert (s2.ingested, s2.quarantined, s2.reused) == (21, 3, 18)


def _session_members(sid: int) -> list[int]:
    """Live processes of session ``sid`` (Linux /proc), zombies excluded."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()
        if int(fields[3]) == sid and fields[0] not in "ZX":
            out.append(int(stat.parent.name))
    return out


def test_a_lock_left_by_a_dead_build_is_stale(tmp_path: Path) -> None:
    from medvlp.data.cache import exclusive_build

    out = tmp_path / "cache"
    out.mkdir()
    # an orphan holding the lock file open and locked, as a worker of a killed build would, its owner long gone
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (out / ".build.lock").write_text(f"{int(dead.stdout)} 1")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl,sys,time; f=open(sys.argv[1]); fcntl.flock(f, fcntl.LOCK_EX); "
            "print('held', flush=True); time.sleep(60)",
            str(out / ".build.lock"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with exclusive_build(out):
            assert (out / ".build.lock").read_text().split()[0] == str(os.getpid())
            # while this build runs, a second one is refused: its owner is alive
            with pytest.raises(RuntimeError, match="another `medvlp cohort build` is writing"), exclusive_build(out):
                pass
    finally:
        holder.kill()
        holder.wait()


def test_killed_build_resumes(cxr_cohort: Path, tmp_path: Path) -> None:
    m = _manifest(cxr_cohort)
    big = pd.concat(
        [m.assign(study_id=m["study_id"] + f"r{k}", subject_id=m["subject_id"] + f"r{k}") for k in range(4)]
    )  # 96 records, the same images
    _set_manifest(cxr_cohort, big)
    g = pd.read_csv(cxr_cohort.parent / "grounding.csv", dtype=str, keep_default_na=False)
    pd.concat([g.assign(study_id=g["study_id"] + f"r{k}") for k in range(4)]).to_csv(
        cxr_cohort.parent / "grounding.csv", index=False
    )
    out = tmp_path / "cache"
    cmd = [sys.executable, "-m", "medvlp", "cohort", "build", str(cxr_cohort), "--out", str(out), "--workers", "2"]
    # its own process group, as a shell job: kill -9 of the group's leader only, as an operator's `kill -9 PID`
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((out / "items").glob("*.json"))) < 5:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    _, err = proc.communicate()
    done = len(list((out / "items").glob("*.json")))
    assert 5 <= done < 96, (done, err)
    assert not (out / "summary.json").exists()
    # its decoding workers die with it: nothing of the killed build's session is left after a few seconds
    deadline = time.time() + 10
    while time.time() < deadline and _session_members(proc.pid):
        time.sleep(0.1)
    assert not _session_members(proc.pid), "worker processes outlived the killed build"
    s = build_cohort(cxr_cohort, out, workers=2)
    assert s.ingested == 96 and s.reused >= done
    fresh = tmp_path / "fresh"
    build_cohort(cxr_cohort, fresh, workers=2)
    key_a, key_b = load_or_create_key(out), load_or_create_key(fresh)
    for sid in big["study_id"][:10]:
        a = np.load(out / "images" / f"{pseudonym(key_a, 'st', sid)}.npy")
        b = np.load(fresh / "images" / f"{pseudonym(key_b, 'st', sid)}.npy")
        np.testing.assert_array_equal(a, b)
    assert not list(out.rglob("*.tmp")) and not list((out / "images").glob(".*"))


def _phi_values(root: Path) -> set[str]:
    values: set[str] = set()
    for f in _dicom_files(root):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        for kw in PHI_KEYWORDS:
            v = str(ds.get(kw, "") or "").strip()
            # short all-digit values (times such as 071748) occur inside any float; dates and IDs are longer
            if kw != "StudyTime" and len(v) >= (8 if v.isdigit() else 5):
                values.add(v)
                values.update(p for p in v.split("^") if len(p) >= 5)
    return values


def _all_text(cache: Path) -> str:
    chunks = []
    for f in cache.rglob("*"):
        if f.is_file() and "secret" not in f.parts:
            chunks.append(f.read_bytes().decode("latin-1"))
            if f.suffix == ".parquet":  # compressed on disk: look at the decoded values as well
                chunks.append(pd.read_parquet(f).to_csv())
    return "\n".join(chunks)


def _distinctive_ids(yaml_path: Path) -> set[str]:
    """Give the manifest accession-number study ids and the images file names that carry a patient's name or a
    UID, as real exports do; returns every such string (none may reach the cache outside ``secret/``)."""
    root = yaml_path.parent
    m = _manifest(yaml_path)
    g = pd.read_csv(root / "grounding.csv", dtype=str, keep_default_na=False)
    new_ids = {sid: f"ACC{20240117000 + k}" for k, sid in enumerate(m["study_id"])}
    idents = set(new_ids.values())
    for i in m.index:
        src = root / m.at[i, "image"]
        name = f"DOE_JANE_{1000 + i}" + src.suffix
        src.rename(src.with_name(name))
        m.at[i, "image"] = str(Path(m.at[i, "image"]).with_name(name))
        idents.add(Path(name).stem)
        if (src.with_name(name)).is_dir():  # a series: its slices named by SOP Instance UID-like names
            for k, f in enumerate(sorted((src.with_name(name)).iterdir())):
                uid = f"1.2.826.0.1.3680043.99.{i}.{k + 1}"
                f.rename(f.with_name(uid + ".dcm"))
                idents.add(uid)
    m["study_id"] = m["study_id"].map(new_ids)
    g["study_id"] = g["study_id"].map(new_ids)
    _set_manifest(yaml_path, m)
    g.to_csv(root / "grounding.csv", index=False)
    return idents


def test_no_phi_leaves_the_headers(cxr_cohort: Path, ct_cohort: Path, tmp_path: Path) -> None:
    for yaml_path in (cxr_cohort, ct_cohort):
        phi = _phi_values(yaml_path.parent)
        names = {v for v in phi if "^" in v}
        assert len(names) >= 5, "the synthetic headers must carry fake PHI for this test to mean anything"
        idents = _distinctive_ids(yaml_path)
        out = tmp_path / f"cache-{yaml_path.parent.name}"
        m = _manifest(yaml_path)
        m.at[0, "image"] = m.at[0, "image"] + "-missing"  # a quarantined record must not leak either
        _set_manifest(yaml_path, m)
        bad = yaml_path.parent / m.at[1, "image"]  # nor one whose decoding fails (readers name the file)
        if bad.is_dir():
            victim = sorted(bad.iterdir())[3]
            victim.write_bytes(victim.read_bytes()[:400])
        else:
            bad.write_bytes(bad.read_bytes()[:400])
        s = build_cohort(yaml_path, out, workers=2)
        assert s.quarantined == 2
        text = _all_text(out)
        assert (out / "build.log").stat().st_size > 0
        leaked = sorted(v for v in phi | idents if v in text)
        assert not leaked, f"PHI or identifiers found in the cache: {leaked[:5]}"
        # and the manifest's own identifiers are replaced by pseudonyms in the cache's tables
        rec = pd.read_parquet(out / "records.parquet")
        assert not set(m["study_id"]) & set(rec["study"]) and not set(m["subject_id"]) & set(rec["subject"])
        assert rec["study"].str.fullmatch(r"st-[0-9a-f]{16}").all()
        q = pd.read_csv(out / "quarantine.csv")
        assert list(q.columns) == ["row", "study", "reason"] and list(q["row"]) == [2, 3]
        assert "quarantined row 3 (" in (out / "build.log").read_text()
        # the hospital finds the records again through secret/ids.csv, which only its owner can read
        ids = pd.read_csv(out / "secret" / "ids.csv", dtype=str)
        assert list(ids.columns) == ["row", "study", "study_id"] and len(ids) == len(m)
        assert dict(zip(ids["study"], ids["study_id"], strict=True))[q.at[0, "study"]] == m.at[0, "study_id"]
        assert (out / "secret" / "ids.csv").stat().st_mode & 0o077 == 0


def test_cli_validate_and_build(cxr_cohort: Path, tmp_path: Path) -> None:
    env = os.environ | {"PYTHONWARNINGS": "ignore"}
    m = _manifest(cxr_cohort)
    m.at[0, "report"], m.at[0, "image"] = "", ""
    _set_manifest(cxr_cohort, m)
    r = subprocess.run(
        [sys.executable, "-m", "medvlp", "cohort", "validate", str(cxr_cohort)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    assert f"would quarantine {m.at[0, 'study_id']}: empty report and no image" in r.stderr
    assert "23 usable, 1 would be quarantined" in r.stderr
    # the build's console (inside the hospital) names the record by row and study_id; its files do not
    out = tmp_path / "cache"
    cmd = [sys.executable, "-m", "medvlp", "cohort", "build", str(cxr_cohort), "--out", str(out), "--workers", "0"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    assert r.returncode == 0, r.stderr
    assert f"row 2 ({m.at[0, 'study_id']}): empty report and no image" in r.stderr
    assert m.at[0, "study_id"] not in (out / "quarantine.csv").read_text()
    m.at[1, "split"] = "nope"
    _set_manifest(cxr_cohort, m)
    r = subprocess.run(
        [sys.executable, "-m", "medvlp", "cohort", "validate", str(cxr_cohort)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert r.returncode == 2 and "column 'split' must be one of" in r.stderr
    r = subprocess.run([sys.executable, "-m", "medvlp", "--help"], capture_output=True, text=True, check=True)
    for cmd in ("cohort", "train", "evaluate", "serve", "demo"):
        assert cmd in r.stdout


@pytest.mark.parametrize("kind", ["cxr", "ct"])
def test_cli_synth(kind: str, tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "medvlp", "cohort", "synth", "--kind", kind, "--n", "3", "--out", str(tmp_path / kind)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    assert len(load_cohort(tmp_path / kind / "cohort.yaml").manifest) == 3
    r = subprocess.run(
        [sys.executable, "-m", "medvlp", "cohort", "synth", "--kind", "mri", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 2 and "--kind must be one of cxr, ct" in r.stderr


def test_a_second_build_on_the_same_cache_is_refused_and_stale_temporaries_are_swept(
    cxr_cohort: Path, tmp_path: Path
) -> None:
    from medvlp.data.cache import exclusive_build

    out = tmp_path / "cache"
    (out / "images").mkdir(parents=True)
    stale = out / "images" / ".st-0123456789abcdef.x1y2z3.tmp"
    stale.write_bytes(b"half a file")
    with exclusive_build(out), pytest.raises(RuntimeError, match="another `medvlp cohort build` is writing"):
        build_cohort(cxr_cohort, out, workers=0)
    assert stale.exists()  # the refused build touched nothing
    s = build_cohort(cxr_cohort, out, workers=0)
    assert s.ingested == 24 and not stale.exists()
