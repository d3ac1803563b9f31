"""Shared fixtures: one seeding fixture, small synthetic cohorts made once per session."""

from __future__ import annotations

import os
import pty
import random
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def seed_everything() -> None:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def cxr_cohort_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A pristine 24-study synthetic radiograph cohort; copy it before changing anything."""
    from medvlp.data.synthetic import synthesize

    return synthesize("cxr", 24, tmp_path_factory.mktemp("cxr-src"), seed=1)


@pytest.fixture(scope="session")
def ct_cohort_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A pristine 10-study synthetic CT cohort; copy it before changing anything."""
    from medvlp.data.synthetic import synthesize

    return synthesize("ct", 10, tmp_path_factory.mktemp("ct-src"), seed=2)


def copy_cohort(src_yaml: Path, dst: Path) -> Path:
    shutil.copytree(src_yaml.parent, dst)
    return dst / src_yaml.name


@pytest.fixture()
def cxr_cohort(cxr_cohort_src: Path, tmp_path: Path) -> Path:
    return copy_cohort(cxr_cohort_src, tmp_path / "cxr")


@pytest.fixture()
def ct_cohort(ct_cohort_src: Path, tmp_path: Path) -> Path:
    return copy_cohort(ct_cohort_src, tmp_path / "ct")


# ---- One tiny `medvlp demo` run, shared by tests/test_demo.py, tests/test_notebooks.py and tests/test_docs.py ----
@dataclass(frozen=True)
class TinyDemo:
    """``medvlp demo --out demo-out`` (tiny config, 60 radiographs) run once in a pseudo-terminal under ``root``.

    ``root`` plays the user's working folder after ``make demo``: the run is ``demo-out/run``, the cohort
    ``demo-out/cohort/cohort.yaml``. ``output`` is what the terminal showed, escape sequences removed.
    """

    root: Path
    returncode: int
    output: str

    @property
    def out(self) -> Path:
        return self.root / "demo-out"

    @property
    def run(self) -> Path:
        return self.out / "run"

    @property
    def cohort(self) -> Path:
        return self.out / "cohort" / "cohort.yaml"

    def check(self) -> TinyDemo:
        assert self.returncode == 0, f"the tiny demo failed:\n{self.output[-4000:]}"
        return self


COLOURS = re.compile(r"\x1b\[[0-9;]*m")
CURSOR_MOVES = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[()][A-Z0-9]|\r")


def terminal_text(raw: str) -> str:
    """Terminal output as plain lines: colours dropped, each cursor move or carriage return a line break."""
    return CURSOR_MOVES.sub("\n", COLOURS.sub("", raw))


def run_in_terminal(args: list[str], cwd: Path, timeout: float = 600) -> tuple[int, str]:
    """Run a command with a pseudo-terminal as stdout and stderr; its exit code and all it wrote (raw)."""
    master, slave = pty.openpty()
    env = os.environ | {"COLUMNS": "120", "LINES": "40", "TERM": "xterm"}
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, cwd=cwd, env=env)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    return proc.wait(timeout=timeout), b"".join(chunks).decode("utf-8", "replace")


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory: pytest.TempPathFactory) -> TinyDemo:
    root = tmp_path_factory.mktemp("tiny-demo")
    config = Path(__file__).resolve().parents[1] / "configs" / "tiny-2d.yaml"
    args = [sys.executable, "-m", "medvlp", "demo", "--out", "demo-out", "--n", "60", "--config", str(config)]
    args.append("--ablation")  # the align-only baseline too: every phase of the display is exercised
    args += ["--set", "stages.stage1-image.checkpoint_every=6"]  # an override reaches the run (test_demo.py)
    code, raw = run_in_terminal(args, cwd=root)
    return TinyDemo(root, code, terminal_text(raw))
