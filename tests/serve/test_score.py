"""``POST /v1/score``: sentences scored against one image, with the side check where the model has one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from medvlp import load_model
from medvlp.artifacts import RunDir, find_model_dir
from medvlp.data.cache import CachedCohort
from medvlp.data.privacy import load_or_create_key, pseudonym
from medvlp.models import MedVLP
from medvlp.models.side_check import SideCheck
from medvlp.serve.context import resolve_context
from medvlp.serve.schemas import MAX_SCORE_TEXTS
from medvlp.serve.service import DiagnosisService, ImageJob

from .conftest import TinyRun
from .helpers import Server, assert_error, study_file

TEXTS = [
    "Small left pleural effusion.",
    "Small right pleural effusion.",
    "No pleural effusion.",
    "Small left pleural effusion. The heart is enlarged.",
]


def _score(client: httpx.Client, data: bytes, texts: object) -> httpx.Response:
    return client.post("/v1/score", files={"file": ("upload", data)}, data={"texts": json.dumps(texts)})


def _cached(tiny_run: TinyRun, study: str) -> torch.Tensor:
    cache = CachedCohort.open(tiny_run.cache)
    key = pseudonym(load_or_create_key(tiny_run.cache), "st", study)
    return torch.from_numpy(np.asarray(cache.load_image(key), dtype=np.float32))[None]  # [1, 1, *size]


def test_score_answers_the_librarys_pair_scores_in_order(server: Server, tiny_run: TinyRun) -> None:
    """A model without a side check: each score is the cosine the library's `score_pairs` gives on the training
    array of the same study, in the order sent; no text is checked."""
    with server.client() as c:
        resp = _score(c, study_file(tiny_run.cohort, "S00003").read_bytes(), TEXTS)
        info = c.get("/v1/model").json()
    assert resp.status_code == 200, resp.text
    answer = resp.json()
    assert answer["side_check"] is False and info["side_check"] is False
    assert [s["text"] for s in answer["scores"]] == TEXTS and answer["image"]["spatial_dims"] == 2
    model = load_model(tiny_run.run)
    with torch.no_grad():
        expected = model.score_pairs(_cached(tiny_run, "S00003").expand(len(TEXTS), -1, -1, -1), TEXTS).numpy()
    np.testing.assert_allclose([s["score"] for s in answer["scores"]], expected, atol=2e-5)
    for s in answer["scores"]:
        assert s["score"] == pytest.approx(s["cosine"] + s["side_check"], abs=2e-6)
        assert s["side_check"] == 0.0 and s["checked"] is False
    assert len({s["score"] for s in answer["scores"]}) > 1  # the texts are told apart


def test_score_refuses_what_it_cannot_read(server: Server, tiny_run: TinyRun) -> None:
    data = study_file(tiny_run.cohort).read_bytes()
    with server.client() as c:
        assert_error(c.post("/v1/score", files={"file": ("upload", data)}), 422, "validation_error")
        assert_error(c.post("/v1/score", files={"file": ("u", data)}, data={"texts": "a, b"}), 422, "validation_error")
        for texts in ([], ["x"] * (MAX_SCORE_TEXTS + 1), ["  "], ["a\x00b"], ["x" * 501], [1, 2], {"a": 1}):
            assert_error(_score(c, data, texts), 422, "validation_error")
        assert_error(c.post("/v1/score", content=b"texts", headers={"content-type": "text/plain"}), 415)
        assert_error(c.post("/v1/score", json={"texts": ["a"]}), 422, "validation_error")  # no image named
        far = {"dicomweb": {"url": "http://192.0.2.1/dicom-web", "study": "1.2.3"}, "texts": ["a"]}
        refused = c.post("/v1/score", json=far)  # not an allowed DICOMweb server: refused before any connection
        assert 400 <= refused.status_code < 500
        assert_error(refused, refused.status_code)


def test_the_side_check_in_served_scores(tiny_run: TinyRun, tmp_path: Path) -> None:
    """A model with a fitted side check: the service's scores equal `score_pairs` on the same preprocessed image; a
    one-sided sentence and its side-swapped twin get opposite terms; negated and two-sentence texts none."""
    model_dir = shutil.copytree(find_model_dir(tiny_run.run), tmp_path / "model")
    model = MedVLP.from_pretrained(model_dir).eval()
    model.config = model.config.model_copy(update={"side_check_axis": 0})
    model.side_check = SideCheck(0)
    model.side_check.set(orientation=1.0, strength=1.0)
    service = DiagnosisService(model, resolve_context(RunDir.open(tiny_run.run)))
    assert service.side_check is True and service.describe()["side_check"] is True
    workdir = tmp_path / "work"
    workdir.mkdir()
    job = ImageJob(study_file(tiny_run.cohort, "S00002"), workdir, texts=TEXTS)
    job.prepared = service.prepare(job)
    (answer,) = service.run_images([job])
    assert isinstance(answer, dict)
    scores = answer["scores"]
    assert [s["checked"] for s in scores] == [True, True, False, False]
    assert scores[0]["side_check"] != 0.0 and scores[0]["side_check"] == pytest.approx(-scores[1]["side_check"])
    assert scores[2]["side_check"] == scores[3]["side_check"] == 0.0
    x = torch.from_numpy(job.prepared.pre.array.astype(np.float32))[None].expand(len(TEXTS), -1, -1, -1)
    with torch.no_grad():
        expected = model.score_pairs(x, TEXTS).numpy()
        plain = model.pair_score_parts(model.forward_image(x), TEXTS)[0].numpy()
    np.testing.assert_allclose([s["score"] for s in scores], expected, atol=2e-5)
    np.testing.assert_allclose([s["cosine"] for s in scores], plain, atol=2e-5)
    other = ImageJob(study_file(tiny_run.cohort, "S00005"), workdir, texts=TEXTS[2:0:-1])
    other.prepared = service.prepare(other)
    (alone,) = service.run_images([other])
    together = service.run_images([job, other])  # one image pass, one text pass for both requests' sentences
    assert [[s["text"] for s in a["scores"]] for a in together] == [TEXTS, TEXTS[2:0:-1]]  # type: ignore[index]
    for got, want in zip(together, (answer, alone), strict=True):
        assert isinstance(got, dict) and isinstance(want, dict)
        np.testing.assert_allclose([s["score"] for s in got["scores"]], [s["score"] for s in want["scores"]], atol=2e-5)
        assert [s["checked"] for s in got["scores"]] == [s["checked"] for s in want["scores"]]
    model.side_check.set(orientation=1.0, strength=0.0)  # a check fitted to strength 0 reads nothing
    (unfitted,) = service.run_images([ImageJob(job.path, workdir, texts=TEXTS, prepared=job.prepared)])
    assert isinstance(unfitted, dict) and service.side_check is False
    assert not any(s["checked"] for s in unfitted["scores"]) and all(s["side_check"] == 0 for s in unfitted["scores"])
