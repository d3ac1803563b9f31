"""A 3D model served from a bare model folder (its cohort record beside it), with micro-batching switched off."""

from __future__ import annotations

import asyncio
import base64
import io
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from medvlp import read_image
from medvlp.data.cohort import default_preprocess
from medvlp.data.preprocess import preprocess_image
from medvlp.models import MedVLP, ModelConfig
from medvlp.serve.context import COHORT_RECORD
from medvlp.tasks import zeroshot

from .helpers import API_KEY, Server, assert_error, png_bytes, pydicom_file, start_server, zip_bytes

FINDINGS = ["renal_mass", "ascites"]


@pytest.fixture(scope="module")
def volume_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained tiny 3D model saved as a model folder, with the record of its (CT) training preprocessing."""
    torch.manual_seed(0)
    spec = default_preprocess(3)
    config = ModelConfig(
        image_encoder="tiny_resnet", spatial_dims=3, image_size=spec.size, text_num_layers=1, embed_dim=16
    )
    folder = MedVLP(config).save_pretrained(tmp_path_factory.mktemp("vol") / "model")
    record = {"cohort": "ct-test", "modality": "CT", "spatial_dims": 3, "findings": FINDINGS}
    (folder / COHORT_RECORD).write_text(json.dumps(record | {"preprocess": spec.model_dump(mode="json")}))
    return folder


@pytest.fixture(scope="module")
def ct_series(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from medvlp.data.synthetic import synthesize

    images = synthesize("ct", 1, tmp_path_factory.mktemp("ct"), seed=5).parent / "images"
    return next(p for p in images.iterdir() if p.is_dir())


@pytest.fixture(scope="module")
def volume_server(volume_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(volume_model, tmp_path_factory.mktemp("vol-log") / "server.log", "--no-batching")
    yield srv
    srv.stop()


def _zip(series: Path) -> bytes:
    return zip_bytes({f"series/{p.name}": p.read_bytes() for p in series.iterdir()})


def _png(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_a_ct_series_zip_is_diagnosed_with_slices(volume_server: Server, volume_model: Path, ct_series: Path) -> None:
    with volume_server.client() as c:
        resp = c.post("/v1/diagnose", files={"file": ("u", _zip(ct_series))}, data={"heatmaps": "true"})
    assert resp.status_code == 200, resp.text
    a = resp.json()
    assert [p["finding"] for p in a["predictions"]] == FINDINGS
    assert a["image"]["spatial_dims"] == 3 and a["image"]["modality"] == "CT" and a["warnings"] == []
    assert _png(a["image_png"]).size == (64, 64)
    for p in a["predictions"]:
        assert 0 <= p["slice"] < 32
        assert _png(p["slice_png"]).size == (64, 64) and _png(p["heatmap_png"]).mode == "RGBA"
    model = MedVLP.from_pretrained(volume_model)
    pre = preprocess_image(read_image(ct_series), default_preprocess(3))
    with torch.no_grad():
        emb = model.encode_image(torch.from_numpy(pre.array.astype(np.float32))[None])
        prompts = zeroshot.build_prompt_embeddings(model, FINDINGS)
    expected = zeroshot.zero_shot_probabilities(emb, prompts, zeroshot.model_logit_scale(model))[0]
    np.testing.assert_allclose([p["probability"] for p in a["predictions"]], expected, atol=1e-5)


def test_a_3d_model_refuses_2d_images(volume_server: Server) -> None:
    with volume_server.client() as c:
        for data in (png_bytes(), pydicom_file("CT_small.dcm").read_bytes()):
            err = assert_error(c.post("/v1/diagnose", files={"file": ("u", data)}), 422, "wrong_dimensionality")
            assert "3D images" in err["message"] and "2D image" in err["message"]


def test_without_a_corpus_retrieval_is_unavailable(volume_server: Server, ct_series: Path) -> None:
    with volume_server.client() as c:
        info = c.get("/v1/model").json()
        assert info["retrieval"] == {"available": False, "studies": 0} and info["metrics"] is None
        assert info["findings"] == FINDINGS and info["serving"]["micro_batching"] is False
        assert_error(c.post("/v1/retrieve", json={"text": "ascites"}), 409, "retrieval_unavailable")
        resp = c.post("/v1/diagnose", files={"file": ("u", _zip(ct_series))}, data={"top_k": "2"})
        assert_error(resp, 409, "retrieval_unavailable")


def test_no_batching_runs_each_request_alone(volume_server: Server, ct_series: Path) -> None:
    data = _zip(ct_series)

    async def run() -> list[httpx.Response]:
        headers = {"Authorization": f"Bearer {API_KEY}"}
        async with httpx.AsyncClient(base_url=volume_server.url, headers=headers, timeout=120) as c:
            return await asyncio.gather(*(c.post("/v1/diagnose", files={"file": ("u", data)}) for _ in range(4)))

    responses = asyncio.run(run())
    assert [r.status_code for r in responses] == [200] * 4
    assert [r.json()["batch_size"] for r in responses] == [1] * 4
