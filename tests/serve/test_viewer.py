"""The viewer in a real headless Chromium: paste the key, upload a study, see probabilities and the heatmap."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from .conftest import TinyRun
from .helpers import API_KEY, Server, require_module, require_tool, study_file

pytestmark = pytest.mark.external


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    chromium = require_tool("chromium", "/usr/bin/chromium")
    sync_api = require_module("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


def test_upload_a_study_and_see_findings_and_heatmap(
    browser, server: Server, tiny_run: TinyRun, tmp_path: Path
) -> None:
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server.url + "/")
    page.fill("#api-key", API_KEY)
    page.click("#key-save")
    page.wait_for_selector("#model-info:has-text('synthetic-cxr')")
    page.set_input_files("#file", str(study_file(tiny_run.cohort, "S00007")))
    page.click("#diagnose")
    page.wait_for_selector("#predictions tbody tr")
    page.wait_for_function(
        "() => { const o = document.getElementById('overlay'); return !o.hidden && o.complete && o.naturalWidth > 0; }"
    )
    rows = page.locator("#predictions tbody tr")
    assert rows.count() == 4
    names = [rows.nth(i).get_attribute("data-finding") for i in range(4)]
    assert names == ["cardiomegaly", "pleural_effusion", "lung_nodule", "pneumothorax"]
    for i in range(4):
        prob = rows.nth(i).locator("td.prob").inner_text()
        assert prob.endswith("%") and 0.0 <= float(prob[:-1]) <= 100.0
    sizes = page.evaluate(
        "() => ['base-image', 'overlay'].map(id => { const i = document.getElementById(id); "
        "return [i.naturalWidth, i.naturalHeight, i.getBoundingClientRect().width]; })"
    )
    assert sizes[0][:2] == sizes[1][:2] == [128, 128]  # the heatmap lies exactly on the image
    assert sizes[0][2] == pytest.approx(sizes[1][2]) and sizes[0][2] >= 256
    rows.nth(2).click()  # another finding's heatmap
    assert "lung_nodule" in page.inner_text("#view-title")
    assert page.locator("#similar-list li").count() == 3
    shot = tmp_path / "viewer.png"
    page.screenshot(path=str(shot), full_page=True)
    assert Image.open(shot).size[0] == 1280
    assert page.evaluate("sessionStorage.getItem('medvlp.apiKey')") == API_KEY
    assert errors == []
    page.close()


def test_a_wrong_key_shows_the_error(browser: Any, server: Server, tiny_run: TinyRun) -> None:
    page = browser.new_page()
    page.goto(server.url + "/")
    page.fill("#api-key", "not-the-right-key-at-all")
    page.click("#key-save")
    page.set_input_files("#file", str(study_file(tiny_run.cohort, "S00007")))
    page.click("#diagnose")
    page.wait_for_selector("#error:not([hidden])")
    assert "unauthorized" in page.inner_text("#error")
    assert page.locator("#predictions tbody tr").count() == 0
    page.close()


def test_compare_sentences_about_the_study(browser: Any, server: Server, tiny_run: TinyRun) -> None:
    """Sentences typed one per line are scored against the chosen study through /v1/score, best match first."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server.url + "/")
    page.fill("#api-key", API_KEY)
    page.click("#key-save")
    page.click("#score")  # no study chosen yet: said, nothing sent
    page.wait_for_selector("#error:not([hidden])")
    assert "choose a study" in page.inner_text("#error")
    page.set_input_files("#file", str(study_file(tiny_run.cohort, "S00007")))
    sentences = ["Small left pleural effusion.", "Small right pleural effusion.", "No pleural effusion."]
    page.fill("#sentences", "\n".join(sentences) + "\n\n")
    page.click("#score")
    page.wait_for_selector("#scores tbody tr")
    rows = page.locator("#scores tbody tr")
    assert rows.count() == 3 and page.locator("#error").is_hidden()
    shown = [rows.nth(i).locator("td").nth(0).inner_text() for i in range(3)]
    scores = [float(rows.nth(i).locator("td.score").inner_text()) for i in range(3)]
    assert sorted(shown) == sorted(sentences) and scores == sorted(scores, reverse=True)
    assert "no side check" in page.inner_text("#score-info")  # the tiny model has none
    assert errors == []
    page.close()
