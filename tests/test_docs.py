"""Every ```python example in ``docs/*.md`` runs.

The blocks of one page run in order as one script (later blocks use what earlier ones made), in a fresh Python
process whose working folder holds ``demo-out/`` from the tiny demo run (the ``tiny_demo`` fixture of
``conftest.py``): the examples use the paths a user has after ``make demo``. Pages run side by side.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from conftest import TinyDemo

DOCS = Path(__file__).resolve().parents[1] / "docs"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
PAGES = sorted(p.name for p in DOCS.glob("*.md") if BLOCK.search(p.read_text()))
PUBLIC_API = [  # what the docs must show with a runnable example
    "medvlp.read_image(",
    "medvlp.load_model(",
    "zeroshot.zero_shot_probabilities(",
    "grounding.grounding_metrics(",
    "grounding.similarity_map(",
    "retrieval_metrics(",
    "EmbeddingIndex(",
    "survival.CoxPH(",
    "survival.bootstrap_ci(",
    "survival.logrank_test(",
    "probe.linear_probe(",
]


def script(page: str) -> str:
    return "\n".join(BLOCK.findall((DOCS / page).read_text()))


@pytest.fixture(scope="module")
def ran(tiny_demo: TinyDemo) -> dict[str, subprocess.CompletedProcess[str]]:
    """Every page's examples, run side by side in the tiny demo's working folder."""
    tiny_demo.check()
    env = os.environ | {"MPLBACKEND": "Agg", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    procs = {
        page: subprocess.Popen(
            [sys.executable, "-c", script(page)],
            cwd=tiny_demo.root,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for page in PAGES
    }
    out = {}
    for page, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        out[page] = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    return out


def test_the_docs_have_examples() -> None:
    assert {"api.md", "tasks.md", "cohorts.md"} <= set(PAGES)
    code = "\n".join(script(p) for p in PAGES)
    missing = [name for name in PUBLIC_API if name not in code]
    assert not missing, f"no runnable example of {missing}"


@pytest.mark.parametrize("page", PAGES)
def test_examples_run(page: str, ran: dict[str, subprocess.CompletedProcess[str]]) -> None:
    r = ran[page]
    assert r.returncode == 0, f"docs/{page} examples failed:\n{r.stderr[-4000:]}"
    assert r.stdout.strip(), "the examples print what they show"
