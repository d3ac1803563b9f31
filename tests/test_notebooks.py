"""The notebooks in ``notebooks/``: stored without outputs, and executed end to end on a tiny run.

Each notebook is executed with nbclient after injecting its parameters (papermill style: a cell tagged
``injected-parameters`` after the one tagged ``parameters``), and must finish without an error or stderr output and
with the expected number of figures drawn (``image/png`` outputs). Phrase grounding also runs on a 3D CT cohort,
with the untrained tiny-3d architecture (the notebook's 3D path: maps over volumes, slices through the peak).

Most of a notebook's time is its kernel importing torch, so the executions run two kernels at a time, once per
module, and the tests check the results.
"""

from __future__ import annotations

import asyncio
import json
import math
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nbformat
import pytest
from nbclient import NotebookClient
from nbformat.v4 import new_code_cell

if TYPE_CHECKING:
    from conftest import TinyDemo

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
FIGURES = {  # notebook -> image/png outputs it draws
    "01_zero_shot_diagnosis.ipynb": 3,
    "02_phrase_grounding.ipynb": 4,
    "03_survival.ipynb": 2,
    "04_retrieval_and_embeddings.ipynb": 3,
}
GROUNDING_3D = "02_phrase_grounding.ipynb[3d]"
KERNELS_AT_ONCE = 2


def client(name: str, parameters: dict[str, Any], timeout: int = 300, last: str | None = None) -> NotebookClient:
    """A client for a notebook of ``notebooks/`` with ``parameters`` injected after its ``parameters`` cell (and
    ``last``, when given, appended as a final cell)."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{name}: needs exactly one cell tagged 'parameters'"
    cell = new_code_cell("\n".join(f"{k} = {v!r}" for k, v in parameters.items()))
    cell.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(tagged[0] + 1, cell)
    if last is not None:
        nb.cells.append(new_code_cell("import json\n" + last))
    return NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}})


def execute_all(clients: dict[str, NotebookClient]) -> dict[str, nbformat.NotebookNode | BaseException]:
    """Execute the notebooks, ``KERNELS_AT_ONCE`` at a time: each executed notebook, or what it raised."""

    async def main() -> list[Any]:
        gate = asyncio.Semaphore(KERNELS_AT_ONCE)

        async def one(c: NotebookClient) -> nbformat.NotebookNode:
            async with gate:
                return await c.async_execute()  # raises CellExecutionError on the first failing cell

        return await asyncio.gather(*(one(c) for c in clients.values()), return_exceptions=True)

    return dict(zip(clients, asyncio.run(main()), strict=True))


def model_3d(ct_cohort_src: Path, folder: Path) -> dict[str, str]:
    """An untrained tiny-3d model on a copy of the 10-study synthetic CT cohort: the notebook's parameters."""
    import torch

    from medvlp.config import load_config
    from medvlp.data.build import build_cohort
    from medvlp.data.cache import CachedCohort
    from medvlp.models import MedVLP, ModelConfig

    cohort = Path(shutil.copytree(ct_cohort_src.parent, folder / "ct")) / ct_cohort_src.name
    cache = build_cohort(cohort, folder / "cache", workers=0).out
    size = tuple(CachedCohort.open(cache).summary["preprocess"]["size"])
    arch = {k: v for k, v in load_config(ROOT / "configs" / "tiny-3d.yaml").model.items() if k != "text_dropout"}
    torch.manual_seed(0)
    MedVLP(ModelConfig(**arch, spatial_dims=3, image_size=size)).save_pretrained(folder / "model")
    return {"run": str(folder / "model"), "cohort": str(cohort), "cache": str(cache)}


@pytest.fixture(scope="module")
def executed(
    tiny_demo: TinyDemo, ct_cohort_src: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, nbformat.NotebookNode | BaseException]:
    params_3d = model_3d(ct_cohort_src, tmp_path_factory.mktemp("grounding-3d"))
    extra_3d = {"free_text": "There is a renal mass.", "max_sentences": 3}
    clients = {GROUNDING_3D: client("02_phrase_grounding.ipynb", params_3d | extra_3d)}
    if tiny_demo.returncode == 0:  # otherwise the 2D tests report the demo's failure
        run = {"run": str(tiny_demo.run), "cohort": str(tiny_demo.cohort)}
        clients |= {name: client(name, run, last=NUMBERS[name]) for name in FIGURES}
    return execute_all(clients)


def outputs(nb: nbformat.NotebookNode) -> list[Any]:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]


def check_executed(result: nbformat.NotebookNode | BaseException, figures: int) -> nbformat.NotebookNode:
    if isinstance(result, BaseException):
        raise result
    outs = outputs(result)
    errors = [f"{o.ename}: {o.evalue}" for o in outs if o.output_type == "error"]
    assert not errors, errors
    pngs = [o for o in outs if "image/png" in o.get("data", {})]
    assert len(pngs) == figures, f"{len(pngs)} figures drawn, expected {figures}"
    assert all(len(o.data["image/png"]) > 2000 for o in pngs), "an empty figure"
    stderr = [o.text for o in outs if o.output_type == "stream" and o.name == "stderr"]
    assert not stderr, stderr
    return result


def test_every_notebook_is_tested() -> None:
    assert {p.name for p in NOTEBOOKS.glob("*.ipynb")} == set(FIGURES)


@pytest.mark.parametrize("name", sorted(FIGURES))
def test_committed_notebooks_have_no_outputs(name: str) -> None:
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{name}: outputs are stored"
    assert sum("parameters" in c.metadata.get("tags", []) for c in nb.cells) == 1


@pytest.mark.parametrize("name", sorted(FIGURES))
def test_notebook_runs_on_a_tiny_run(name: str, tiny_demo: TinyDemo, executed: dict[str, Any]) -> None:
    tiny_demo.check()
    check_executed(executed[name], FIGURES[name])


def test_phrase_grounding_in_3d(executed: dict[str, Any]) -> None:
    nb = check_executed(executed[GROUNDING_3D], FIGURES["02_phrase_grounding.ipynb"])
    text = "".join(o.get("text", "") for o in outputs(nb))
    assert "tiny_resnet, 3D" in text  # the setup cell names the model's spatial dims


# ------------------------------------------------ one truth per number: the notebooks' numbers are the card's
NUMBERS = {  # notebook -> a last cell printing the numbers it computed, as the card stores them
    "01_zero_shot_diagnosis.ipynb": 'print("NUMBERS", json.dumps({"zero_shot/mean_auroc": zs["mean_auroc"], '
    '"robustness/mean_accuracy": rob["mean_accuracy"]}))',
    "02_phrase_grounding.ipynb": 'print("NUMBERS", json.dumps({"grounding/mean_cnr": summary["mean_cnr"], '
    '"grounding/mean_miou": summary["mean_miou"]}))',
    "03_survival.ipynb": 'print("NUMBERS", json.dumps({"survival/c_index": metrics["c_index"]}))',
    "04_retrieval_and_embeddings.ipynb": 'print("NUMBERS", json.dumps({"retrieval/image_to_report/R@10": '
    'metrics["image_to_report"]["R@10"], "retrieval/report_to_image/R@10": metrics["report_to_image"]["R@10"]}))',
}


def printed_numbers(nb: nbformat.NotebookNode) -> dict[str, float]:
    text = "".join(o.get("text", "") for o in outputs(nb) if o.output_type == "stream")
    line = next(ln for ln in text.splitlines() if ln.startswith("NUMBERS "))
    return json.loads(line.removeprefix("NUMBERS "))


def test_the_notebooks_numbers_are_the_cards(tiny_demo: TinyDemo, executed: dict[str, Any]) -> None:
    card = json.loads((tiny_demo.check().out / "card" / "metrics.json").read_text())
    seen = {}
    for name in NUMBERS:
        seen |= printed_numbers(check_executed(executed[name], FIGURES[name]))
    assert len(seen) == 7
    for path, value in seen.items():
        node = card
        for key in path.split("/"):
            node = node[key]
        assert isinstance(value, float) and math.isclose(value, node, rel_tol=1e-9, abs_tol=1e-12), (path, value, node)


def test_modality_gap_and_nearest_reports() -> None:
    import numpy as np

    from medvlp.tasks.embeddings import modality_gap, nearest_reports

    img = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    txt = np.array([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])  # each report = its image + a shared offset
    gap = modality_gap(img, txt)
    r = np.sqrt(0.5)  # unit reports: (1, 0, 1) * r and (0, 1, 1) * r; centroids (.5, .5, 0) and (.5 r, .5 r, r)
    assert np.isclose(gap["gap"], np.linalg.norm([0.5 - 0.5 * r, 0.5 - 0.5 * r, -r]))
    assert np.isclose(gap["matched"], r) and np.isclose(gap["unmatched"], 0.0)
    assert np.isclose(gap["image_image"], 0.0) and np.isclose(gap["text_text"], 0.5)
    top = nearest_reports(img, txt, ["first", "second"], query=1, k=2)
    assert list(top["report"]) == ["second", "first"] and list(top["own report"]) == [True, False]


def test_compare_models_reports_the_gain_from_the_image() -> None:
    import numpy as np
    import pandas as pd

    from medvlp.tasks.survival_compare import compare_models, survival_data

    rng = np.random.default_rng(0)
    n = 160
    image = rng.normal(size=(n, 6))
    age = rng.normal(60, 10, n)
    hazard = np.exp(1.5 * image[:, 0])  # the image carries the risk, age none
    time = rng.exponential(1 / hazard)
    records = pd.DataFrame({"time": np.minimum(time, 2.0), "event": (time < 2.0).astype(float), "age": age})
    records.loc[3, "age"] = np.nan  # left out
    data = survival_data(image[:100], records[:100], image[100:], records[100:].reset_index(drop=True), ["age"], 3)
    assert len(data.x_train) == 99 and list(data.x_train.columns) == ["pc1", "pc2", "pc3", "age"]
    result = compare_models(data, n_boot=100)
    table, risks = result.table, result.risks
    assert list(table.index) == ["image+covariates", "covariates", "image", "gain from image"]
    gain = table.loc["gain from image"]
    assert np.isclose(gain["c_index"], table.at["image+covariates", "c_index"] - table.at["covariates", "c_index"])
    assert gain["ci_low"] > 0  # the image adds information, and the paired interval says so
    assert set(risks) == {"image+covariates", "covariates", "image"}
