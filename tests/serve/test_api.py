"""The HTTP API against a real `medvlp serve` process: answers, parity with the library, auth, privacy."""

from __future__ import annotations

import asyncio
import base64
import io
import json
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from medvlp import load_model, read_image
from medvlp.artifacts import RunDir
from medvlp.data.cache import CachedCohort
from medvlp.data.preprocess import preprocess_image
from medvlp.data.privacy import load_or_create_key, pseudonym
from medvlp.data.reports import report_text
from medvlp.tasks import zeroshot
from medvlp.tasks.calibration import apply_calibration

from .conftest import TinyRun
from .helpers import API_KEY, OTHER_KEY, PHI, PHI_UIDS, Server, assert_error, pydicom_file, study_file, with_phi

FINDINGS = ["cardiomegaly", "pleural_effusion", "lung_nodule", "pneumothorax"]


def _diagnose(client: httpx.Client, data: bytes, **fields: str) -> httpx.Response:
    return client.post("/v1/diagnose", files={"file": ("upload", data)}, data=fields)


def _png(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


@pytest.fixture(scope="module")
def model(tiny_run: TinyRun):
    return load_model(tiny_run.run)


def test_health_needs_no_key_and_openapi_documents_the_api(server: Server) -> None:
    with server.client(key=None) as c:
        assert c.get("/v1/health").json() == {"status": "ok", "version": "0.1.0"}
        spec = c.get("/openapi.json").json()
        viewer = c.get("/")
    assert {"/v1/health", "/v1/model", "/v1/diagnose", "/v1/score", "/v1/embed", "/v1/retrieve"} <= set(spec["paths"])
    body = spec["paths"]["/v1/diagnose"]["post"]["requestBody"]["content"]
    assert set(body) == {"multipart/form-data", "application/json"}
    assert "DiagnoseJSON" in spec["components"]["schemas"]
    assert spec["paths"]["/v1/diagnose"]["post"]["security"] == [{"bearer": []}]
    assert "security" not in spec["paths"]["/v1/health"]["get"]
    assert viewer.status_code == 200 and "medvlp" in viewer.text
    assert "script-src 'self'" in viewer.headers["content-security-policy"]


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer not-a-valid-key-000000"},
        {"Authorization": f"Basic {API_KEY}"},
        {"Authorization": "Bearer"},
    ],
    ids=["none", "wrong", "basic-scheme", "empty"],
)
def test_every_endpoint_but_health_needs_a_valid_key(server: Server, headers: dict[str, str]) -> None:
    with httpx.Client(base_url=server.url, headers=headers, timeout=30) as c:
        for resp in (
            c.get("/v1/model"),
            c.post("/v1/diagnose", files={"file": ("f", b"x")}),
            c.post("/v1/embed", json={"texts": ["a"]}),
            c.post("/v1/retrieve", json={"text": "effusion"}),
        ):
            assert_error(resp, 401, "unauthorized")
            assert resp.headers["www-authenticate"] == "Bearer"
    for key in (API_KEY, OTHER_KEY):  # either configured key works
        with server.client(key=key) as c:
            assert c.get("/v1/model").status_code == 200


def test_model_card_summary_and_config_without_paths(server: Server, tiny_run: TinyRun) -> None:
    with server.client() as c:
        info = c.get("/v1/model").json()
    assert info["findings"] == FINDINGS
    assert info["cohort"]["cohort"] == "synthetic-cxr" and info["cohort"]["spatial_dims"] == 2
    assert info["cohort"]["preprocess"]["size"] == [128, 128]
    metrics = json.loads((tiny_run.run / "card" / "metrics.json").read_text())
    assert info["metrics"]["zero-shot mean AUROC"] == pytest.approx(metrics["zero_shot"]["mean_auroc"])
    assert info["model"]["config"]["image_encoder"] == "tiny_resnet"
    text = json.dumps(info)
    assert str(tiny_run.run) not in text and "/tmp" not in text  # no machine path (a user name, a patient folder)
    assert info["retrieval"] == {"available": True, "studies": 28}
    assert info["calibration"]["fitted_on"] == "val" and set(info["calibration"]["findings"]) <= set(FINDINGS)
    assert info["calibration"]["prompt_form"] == "report_section" == metrics["zero_shot"]["prompts"]["form"]
    assert info["serving"]["micro_batching"] is True and info["serving"]["authentication"] is True


def test_served_preprocessing_is_the_training_one(server: Server, tiny_run: TinyRun, model) -> None:
    """The served embedding of a training study's DICOM equals the model on that study's cached training array."""
    cache = CachedCohort.open(tiny_run.cache)
    study = pseudonym(load_or_create_key(tiny_run.cache), "st", "S00003")
    cached = torch.from_numpy(np.asarray(cache.load_image(study), dtype=np.float32))[None]
    with server.client() as c:
        resp = c.post("/v1/embed", files={"file": ("upload", study_file(tiny_run.cohort, "S00003").read_bytes())})
    assert resp.status_code == 200, resp.text
    served = np.asarray(resp.json()["embeddings"][0])
    with torch.no_grad():
        expected = model.encode_image(cached)[0].numpy()
    np.testing.assert_allclose(served, expected, atol=2e-5)
    assert np.linalg.norm(served) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("name", ["CT_small.dcm", "RG3_J2KR.dcm", "RG1_J2KI.dcm", "JPGExtended.dcm"])
def test_diagnose_real_dicom_files_as_the_library_does(server: Server, tiny_run: TinyRun, model, name: str) -> None:
    path = pydicom_file(name)
    with server.client() as c:
        resp = _diagnose(c, path.read_bytes())
    assert resp.status_code == 200, resp.text
    answer = resp.json()
    assert [p["finding"] for p in answer["predictions"]] == FINDINGS
    # the same numbers the library gives for this file with the training preprocessing
    spec = CachedCohort.open(tiny_run.cache).summary["preprocess"]
    from medvlp.data.cohort import PreprocessSpec

    pre = preprocess_image(read_image(path), PreprocessSpec.model_validate(spec))
    calibration = RunDir.open(tiny_run.run).calibration()  # training fitted it on val; the server applies it
    with torch.no_grad():
        emb = model.encode_image(torch.from_numpy(pre.array.astype(np.float32))[None])
        prompts = zeroshot.build_prompt_embeddings(model, FINDINGS, form=calibration["prompt_form"])
    raw = zeroshot.zero_shot_probabilities(emb, prompts, zeroshot.model_logit_scale(model))
    expected, applied = apply_calibration(raw, FINDINGS, calibration)
    np.testing.assert_allclose([p["probability"] for p in answer["predictions"]], expected[0], atol=1e-5)
    assert [p["calibrated"] for p in answer["predictions"]] == applied and any(applied)
    modality = answer["image"].get("modality")
    assert (modality == "CR") == (not answer["warnings"])  # a CT or MR image is flagged: the model saw radiographs


def test_diagnose_synthetic_study_with_heatmaps_and_similar_reports(server: Server, tiny_run: TinyRun) -> None:
    with server.client() as c:
        resp = _diagnose(c, study_file(tiny_run.cohort).read_bytes(), heatmaps="true", top_k="3")
    assert resp.status_code == 200, resp.text
    a = resp.json()
    assert a["image"]["modality"] == "CR" and a["warnings"] == [] and a["image"]["spatial_dims"] == 2
    base = _png(a["image_png"])
    assert base.size == (128, 128) and base.mode == "L"
    for p in a["predictions"]:
        assert 0.0 <= p["probability"] <= 1.0
        heat = _png(p["heatmap_png"])
        assert heat.size == (128, 128) and heat.mode == "RGBA"
        alpha = np.asarray(heat)[..., 3]
        assert alpha.max() > 0 and alpha.min() == 0  # strongest regions shown, weakest transparent
        assert "slice" not in p
    train = CachedCohort.open(tiny_run.cache).split("train")
    reports = dict(zip(train["study"], train["report"], strict=True))
    hits = a["similar_reports"]
    assert len(hits) == 3 and all(reports[h["study"]] == h["report"] for h in hits)
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)


def test_free_text_findings_and_the_prompt_cache(server: Server, tiny_run: TinyRun) -> None:
    data = study_file(tiny_run.cohort).read_bytes()
    with server.client() as c:
        before = c.get("/v1/model").json()["serving"]["prompt_cache"]
        first = _diagnose(c, data, findings="small left pleural effusion, cardiomegaly")
        second = _diagnose(c, data, findings=" small  left pleural effusion ,cardiomegaly,")
        after = c.get("/v1/model").json()["serving"]["prompt_cache"]
    assert first.status_code == second.status_code == 200
    names = [p["finding"] for p in first.json()["predictions"]]
    assert names == ["small left pleural effusion", "cardiomegaly"]
    assert first.json()["predictions"] == second.json()["predictions"]
    assert after["computed"] == before["computed"] + 1  # the new phrase embedded once; the model's own were cached


def test_a_free_text_finding_reads_in_the_context_of_the_models_own(server: Server, tiny_run: TinyRun, model) -> None:
    """The run's prompt form is a report one: a phrase asked for is framed by the model's findings, all negated."""
    data = study_file(tiny_run.cohort).read_bytes()
    with server.client() as c:
        answer = _diagnose(c, data, findings="small left pleural effusion").json()["predictions"][0]
        emb = torch.tensor(c.post("/v1/embed", files={"file": ("upload", data)}).json()["embeddings"])
    scale = zeroshot.model_logit_scale(model)
    framed, bare = (
        zeroshot.zero_shot_probabilities(
            emb, zeroshot.build_prompt_embeddings(model, ["small left pleural effusion"], form=f, context=ctx), scale
        )[0, 0]
        for f, ctx in (("report_section", FINDINGS), ("sentence", None))
    )
    assert answer["calibrated"] is False and abs(framed - bare) > 1e-4
    assert answer["probability"] == pytest.approx(framed, abs=1e-5)


def test_png_and_nifti_uploads(server: Server, tmp_path: Path) -> None:
    from .helpers import nifti_bytes, png_bytes, zip_bytes

    with server.client() as c:
        assert _diagnose(c, png_bytes()).status_code == 200
        assert _diagnose(c, nifti_bytes((70, 90), tmp_path / "a.nii")).status_code == 200
        assert _diagnose(c, nifti_bytes((70, 90), tmp_path / "a.nii.gz")).status_code == 200
        assert _diagnose(c, zip_bytes({"any/name.png": png_bytes()})).status_code == 200
        assert_error(_diagnose(c, nifti_bytes((30, 30, 12), tmp_path / "v.nii")), 422, "wrong_dimensionality")


def test_retrieve_and_text_embeddings(server: Server, tiny_run: TinyRun, model) -> None:
    train = CachedCohort.open(tiny_run.cache).split("train")
    unique = train[~train["report"].duplicated(keep=False)].iloc[0]
    query = report_text(unique["report"], ["findings", "impression"])
    with server.client() as c:
        by_report = c.post("/v1/retrieve", json={"text": query, "k": 3, "against": "reports"})
        by_image = c.post("/v1/retrieve", json={"text": "large right pleural effusion", "k": 5})
        emb = c.post("/v1/embed", json={"texts": ["No pneumothorax.", "Cardiomegaly."]})
    assert by_report.status_code == by_image.status_code == emb.status_code == 200
    top = by_report.json()["results"][0]
    assert top["study"] == unique["study"] and top["report"] == unique["report"]
    assert top["score"] == pytest.approx(1.0, abs=1e-4)
    hits = by_image.json()["results"]
    assert by_image.json()["against"] == "images" and len(hits) == 5
    assert all(h["study"].startswith("st-") for h in hits)
    with torch.no_grad():
        expected = model.encode_text(["No pneumothorax.", "Cardiomegaly."]).numpy()
    np.testing.assert_allclose(np.asarray(emb.json()["embeddings"]), expected, atol=1e-5)


def without_pictures(node: object) -> object:
    """An answer with its base64 pictures (``*_png`` fields) left out: pixels, not text."""
    if isinstance(node, dict):
        return {k: without_pictures(v) for k, v in node.items() if not k.endswith("_png")}
    if isinstance(node, list):
        return [without_pictures(v) for v in node]
    return node


def test_no_identifier_in_answers_or_log(server: Server, tiny_run: TinyRun, tmp_path: Path) -> None:
    phi_file = with_phi(study_file(tiny_run.cohort), tmp_path / "Doe_Janet_MRN-99887766.dcm")
    truncated = phi_file.read_bytes()[:2000]  # header with the identifiers, pixel data cut off
    with server.client() as c:
        answers = [
            c.post(
                "/v1/diagnose",
                files={"file": (phi_file.name, phi_file.read_bytes())},
                data={"heatmaps": "true", "top_k": "2"},
            ),
            c.post("/v1/embed", files={"file": (phi_file.name, phi_file.read_bytes())}),
            c.post("/v1/diagnose", files={"file": (phi_file.name, truncated)}),
        ]
    assert [r.status_code for r in answers] == [200, 200, 422]
    identifiers = [*PHI.values(), *PHI_UIDS.values(), "Doe", "Janet", phi_file.name]
    log = server.log_text()
    for r in answers:
        text = json.dumps(without_pictures(r.json()))  # base64 PNG pixels can spell "Doe" by chance
        assert len(text) > 100
        for value in identifiers:
            assert value not in text, value
    for value in [*identifiers, API_KEY, OTHER_KEY]:
        assert value not in log, value
    assert "/v1/diagnose 200" in log  # the log is there, just without identifiers


def test_concurrency_8_without_error_and_requests_share_batches(server: Server, tiny_run: TinyRun) -> None:
    files = [study_file(tiny_run.cohort, f"S{i:05d}").read_bytes() for i in range(8)]

    async def run() -> list[httpx.Response]:
        headers = {"Authorization": f"Bearer {API_KEY}"}
        async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=120) as c:
            return await asyncio.gather(
                *(c.post("/v1/diagnose", files={"file": ("upload", d)}, data={"heatmaps": "true"}) for d in files)
            )

    for _ in range(2):
        responses = asyncio.run(run())
        assert [r.status_code for r in responses] == [200] * 8, [r.text[:200] for r in responses]
        sizes = [r.json()["batch_size"] for r in responses]
        if max(sizes) > 1:
            break
    assert max(sizes) > 1, sizes  # concurrent requests went through the model together
