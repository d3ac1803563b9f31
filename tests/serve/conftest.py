"""Shared by the server tests: one tiny trained run (with its evaluation card), and real servers on loopback.

Servers are real ``medvlp serve`` processes (uvicorn) on a free loopback port; each writes its log to a file the
tests read (no key and no patient identifier may appear there).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .helpers import API_KEY, MAX_UPLOAD_MB, OTHER_KEY, Server, start_server

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class TinyRun:
    cohort: Path  # the cohort YAML
    run: Path  # the run folder (with card/ inside)
    cache: Path  # the cohort cache training used


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> TinyRun:
    """tiny-2d trained on 40 synthetic radiographs (~35 s on 2 cores), evaluated into ``run/card``; its prompts are
    in the ``report_section`` form (the only candidate, so the calibration keeps it), which the server must follow."""
    from medvlp.artifacts import default_cache_dir
    from medvlp.config import load_config
    from medvlp.data.synthetic import synthesize
    from medvlp.evaluate import evaluate
    from medvlp.train.run import train

    root = tmp_path_factory.mktemp("serve-run")
    cohort = synthesize("cxr", 40, root / "cxr", seed=11)
    config = load_config(ROOT / "configs" / "tiny-2d.yaml", ["stages.stage2-align.prompt_forms=[report_section]"])
    train(config, cohort, root / "run")
    evaluate(root / "run", cohort, root / "run" / "card")
    return TinyRun(cohort, root / "run", default_cache_dir(cohort))


@pytest.fixture(scope="session")
def server(tiny_run: TinyRun, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The 2D model with two keys, a 4 MiB upload limit, and DICOMweb pulls allowed from loopback only."""
    log = tmp_path_factory.mktemp("serve-log") / "server.log"
    srv = start_server(
        tiny_run.run,
        log,
        "--max-upload-mb",
        str(MAX_UPLOAD_MB),
        "--dicomweb-allow",
        "http://127.0.0.1",
        "--dicomweb-timeout",
        "10",
        keys=f"{API_KEY},{OTHER_KEY}",
    )
    yield srv
    srv.stop()
