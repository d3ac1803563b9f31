"""Every folder layout medvlp writes is the one the README writes down, and opens through `medvlp.artifacts`."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from medvlp.artifacts import RunDir, default_cache_dir, find_model_dir
from medvlp.models import load_model

if TYPE_CHECKING:
    from conftest import TinyDemo

README = Path(__file__).resolve().parents[1] / "README.md"
LAYOUTS = {
    "### 3. The cache": "cache",
    "Run folder (": "run",
    "Model folder (": "run/stage2-align/model",
    "Card folder (": "card",
}


def readme_layout(marker: str) -> list[tuple[str, bool]]:
    """``(path, optional)`` rows of the first ``| file | what |`` table after the line starting with ``marker``."""
    lines = README.read_text().splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith(marker))
    head = next(i for i in range(start, len(lines)) if lines[i].startswith("| file | what |"))
    rows = []
    for ln in lines[head + 2 :]:
        if not ln.startswith("|"):
            break
        name, what = (c.strip() for c in ln.strip("|").split("|", 1))
        rows.append((name.strip("`"), what.startswith("optional")))
    return rows


@pytest.mark.parametrize("marker", list(LAYOUTS))
def test_the_readme_layouts_are_what_the_demo_writes(marker: str, tiny_demo: TinyDemo) -> None:
    folder = tiny_demo.check().out / LAYOUTS[marker]
    rows = readme_layout(marker)
    assert len(rows) >= 4
    for name, optional in rows:
        pattern = re.sub(r"<[^>]+>", "*", name.rstrip("/"))
        found = list(folder.glob(pattern))
        assert found or optional, f"{folder.name}: the README names {name}, which is not there"


def test_every_layout_opens_through_one_owner(tiny_demo: TinyDemo, tmp_path: Path) -> None:
    out = tiny_demo.check().out
    run = RunDir.open(out / "run")
    assert run.model_dir == out / "run" / "stage2-align" / "model" == find_model_dir(out / "run")
    assert run.run_root == out / "run" and run.config is not None and run.report_sections
    assert run.find_cache() == out / "cache" and run.find_cache(out / "cohort" / "cohort.yaml") == out / "cache"
    assert run.open_cache().findings and run.card() == out / "card" / "metrics.json"
    assert run.cohort_record()["findings"] == run.open_cache().findings
    assert load_model(out / "run").config == run.load_model().config
    inner = RunDir.open(run.model_dir)  # the model folder inside a run knows its run
    assert inner.run_root == out / "run" and inner.config == run.config
    baseline = RunDir.open(out / "card" / "baselines" / "align-only")  # the card's baseline run
    assert baseline.model_dir.is_dir() and baseline.config is not None
    copied = RunDir.open(shutil.copytree(run.model_dir, tmp_path / "model"))  # a model folder alone
    assert copied.run_root is None and copied.config is None and copied.cohort_record() is not None
    with pytest.raises(ValueError, match="pass the cohort YAML"):
        copied.find_cache()
    other = shutil.copytree(out / "cohort", tmp_path / "other", ignore=shutil.ignore_patterns(".medvlp-*"))
    with pytest.raises(FileNotFoundError, match=r"medvlp cohort build .* --out .*\.medvlp-cache"):
        run.find_cache(Path(other) / "cohort.yaml")  # found, never built: the message names the command
    assert not default_cache_dir(Path(other) / "cohort.yaml").exists()
    with pytest.raises(FileNotFoundError, match="no medvlp model"):
        RunDir.open(tmp_path / "nothing-here")
