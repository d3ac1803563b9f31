"""`medvlp demo` end to end on the tiny config, in a pseudo-terminal: one progress display, then where things are.

The demo runs once per session (the ``tiny_demo`` fixture of ``conftest.py``, whose run the notebook and docs tests
reuse). "One progress display" is checked as: the terminal showed the overall ``pipeline`` bar, every phase's line
``[k/N] phase: ... (s)`` exactly once and in order, and no other progress bar (tqdm's ``NN%|`` or ``| n/m [``):
on a terminal the training loop and the cache build draw their own tqdm bars unless a caller's display replaces
them.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from medvlp.cli import demo

if TYPE_CHECKING:
    from conftest import TinyDemo

TQDM = re.compile(r"\d+%\||\| *\d+/\d+ \[")
PHASES = ["synth", "build", "stage1-text", "stage1-image", "stage2-align", "baseline (align only)", "evaluation"]


def test_demo_has_the_options_the_tests_use() -> None:
    assert {"out", "kind", "n", "seed", "config", "set_", "ablation"} <= set(inspect.signature(demo).parameters)


def test_demo_set_overrides_the_config_in_the_run(tiny_demo: TinyDemo) -> None:
    """``--set`` changes the demo's config as ``medvlp train --set`` does: the run folder's config records it."""
    config = yaml.safe_load((tiny_demo.check().run / "config.yaml").read_text())
    assert config["stages"]["stage1-image"]["checkpoint_every"] == 6  # tiny-2d.yaml says 3
    assert config["stages"]["stage1-text"]["checkpoint_every"] == 3


def test_demo_rejects_a_bad_override_before_any_work(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from medvlp.cli import app

    out = tmp_path / "demo-out"
    r = CliRunner().invoke(app, ["demo", "--out", str(out), "--n", "20", "--set", "model.text_num_layers"])
    assert r.exit_code == 2, r.output
    assert "--set expects key=value" in r.output
    assert not out.exists()  # no cohort written for a run that cannot start


def test_demo_shows_one_pipeline_progress(tiny_demo: TinyDemo) -> None:
    text = tiny_demo.check().output
    assert re.search(r"pipeline\s+\S*━", text), "the overall pipeline bar was never drawn"
    assert not TQDM.search(text), f"another progress bar was drawn: {TQDM.search(text)}"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    n = len(PHASES)
    done = [ln for ln in lines if re.fullmatch(rf"\[\d/{n}\] [^:]+: .+ \(\d+\.\d s\)", ln)]
    assert [ln.split("] ", 1)[1].split(":", 1)[0] for ln in done] == PHASES, done
    assert [int(ln[1]) for ln in done] == list(range(1, n + 1))
    bars = [ln for ln in lines if ln.startswith("pipeline")]
    totals = {re.search(r"(\d+)/(\d+)", ln).group(2) for ln in bars}
    assert len(totals) == 1, f"more than one pipeline display: {totals}"


def test_demo_ends_with_the_card_and_how_to_serve(tiny_demo: TinyDemo) -> None:
    lines = [ln.strip() for ln in tiny_demo.check().output.splitlines() if ln.strip()]
    card = tiny_demo.out / "card" / "model_card.md"
    assert card.is_file() and (tiny_demo.run / "stage2-align" / "model" / "config.json").is_file()
    assert any(p.suffix == ".png" for p in card.parent.iterdir())
    tail = "\n".join(lines[-3:])
    assert "card:  demo-out/card/model_card.md" in tail, tail
    assert "serve: medvlp serve --model demo-out/run" in tail, tail
    # the align-only baseline trained under the demo's display is the one the card's evaluation used
    assert (tiny_demo.out / "card" / "baselines" / "align-only" / "stage2-align" / "model").is_dir()


def test_pipeline_progress_off_a_terminal_prints_only_the_phase_lines() -> None:
    """In a log file (no terminal) the bars are not drawn; each finished phase still gets its line."""
    import io

    from rich.console import Console

    from medvlp.progress import PipelineProgress

    buf = io.StringIO()
    console = Console(file=buf, force_terminal=False, width=100)
    with PipelineProgress({"build": 10, "stage1-text": 4}, console) as bar:
        bar.start("build")
        for i in range(5):
            bar.update("build", i + 1, 5)  # 5 studies to process, rescaled to the 10 planned
        bar.update("elsewhere", 1, 1)  # a phase not under way is ignored
        assert bar.done == {"build": 10, "stage1-text": 0}
        bar.finish("5 studies")
        bar.start("stage1-text")
        bar.update("stage1-text", 0, 0)  # nothing to do: ignored
        bar.update("stage1-text", 2, 4)
        assert bar.done["stage1-text"] == 2
        assert bar.progress.tasks[0].completed == 12  # the overall bar
    lines = buf.getvalue().splitlines()
    assert len(lines) == 1 and re.fullmatch(r"\[1/2\] build: 5 studies \(\d+\.\d s\)", lines[0]), lines
