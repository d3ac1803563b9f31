"""ONNX export: onnxruntime gives PyTorch's embeddings (2D and 3D, any batch) and the server's probabilities."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from medvlp.export import export_onnx
from medvlp.models import MedVLP
from medvlp.serve.service import DiagnosisService, ImageJob
from medvlp.tasks.zeroshot import zero_shot_probabilities

from .conftest import CALIBRATION_2D, TinyModel

ROOT = Path(__file__).resolve().parents[2]
TEXTS = ["There is a small left pleural effusion.", "No pneumothorax.", "Cardiomegaly with a much longer sentence."]


def _check_export(service: DiagnosisService, folder: Path, image: Path, tmp_path: Path) -> None:
    from medvlp.data.preprocess import preprocess_image
    from medvlp.data.readers import read_image
    from medvlp.hospital.onnx_scorer import OnnxScorer, softmax_probabilities

    scorer = OnnxScorer(folder)
    for batch in (1, 3):
        x = torch.rand(batch, 1, *service.size)
        with torch.no_grad():
            ref = service.model.forward_image(x)
        emb, tokens = scorer.image_embeddings(x.numpy())
        assert np.abs(emb - ref.embedding.numpy()).max() < 1e-4
        assert np.abs(tokens - ref.tokens.numpy()).max() < 1e-4
    with torch.no_grad():
        ref_text = service.model.encode_text(TEXTS).numpy()
    assert np.abs(scorer.text_embeddings(TEXTS) - ref_text).max() < 1e-4
    np.testing.assert_allclose(scorer.prompts, service.prompt_embeddings(service.findings).numpy(), atol=1e-6)

    # one study end to end: the training preprocessing, then onnxruntime alone, against the server's answer
    pre = preprocess_image(read_image(image), service.spec)
    probs = scorer.probabilities(pre.array[None].astype(np.float32))[0]
    (answer,) = service.run_images([ImageJob(image, tmp_path)])
    np.testing.assert_allclose(probs, [p["probability"] for p in answer["predictions"]], atol=1e-4)
    # the numpy restatement of the zero-shot probability is the library's function
    emb, _ = scorer.image_embeddings(np.random.default_rng(0).random((4, 1, *service.size), dtype=np.float32))
    probs_np = softmax_probabilities(emb, scorer.prompts, scorer.logit_scale)
    ref_probs = zero_shot_probabilities(torch.from_numpy(emb), torch.from_numpy(scorer.prompts), scorer.logit_scale)
    np.testing.assert_allclose(probs_np, ref_probs, atol=1e-6)
    assert probs_np.shape == (4, len(service.findings))


def test_onnx_export_2d_through_the_cli(model_2d: TinyModel, service_2d: DiagnosisService, tmp_path: Path) -> None:
    out = tmp_path / "export"
    cmd = [sys.executable, "-m", "medvlp", "export", "--model", str(model_2d.model), "--format", "onnx", "--out"]
    r = subprocess.run([*cmd, str(out)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    meta = json.loads((out / "scorer.json").read_text())
    assert meta["findings"] == service_2d.findings and meta["calibration"] == CALIBRATION_2D  # served as calibrated
    assert meta["preprocess"] == service_2d.spec.model_dump(mode="json")
    _check_export(service_2d, out, model_2d.cohort.parent / "images" / "S00001.dcm", tmp_path)


def test_onnx_export_3d(model_3d: TinyModel, service_3d: DiagnosisService, tmp_path: Path) -> None:
    out = export_onnx(service_3d, tmp_path / "export")
    _check_export(service_3d, out, model_3d.cohort.parent / "images" / "S00002", tmp_path)


def test_export_refusals(model_2d: TinyModel, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from medvlp.cli import app
    from medvlp.hospital.onnx_scorer import OnnxScorer

    r = CliRunner().invoke(app, ["export", "--model", str(model_2d.model), "--format", "tflite", "--out", "x"])
    assert r.exit_code == 2 and "tflite" in r.output
    (tmp_path / "scorer.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="not a medvlp ONNX export"):
        OnnxScorer(tmp_path)


def _tiny_model(
    tiny: TinyModel,
    encoder: str,
    args: dict[str, object],
    seed: int,
    image_refit: tuple[str, ...] | None = None,
    cell: int | None = None,
) -> MedVLP:
    """A MedVLP with ``encoder`` and ``args`` (and an image refit reading ``image_refit``, its tokens on cells of
    ``cell`` voxels) on the preprocessing of ``tiny``'s cohort record."""
    from medvlp.models import ModelConfig

    record = json.loads((tiny.model / "cohort.json").read_text())
    torch.manual_seed(seed)
    return MedVLP(
        ModelConfig(
            image_encoder=encoder,
            image_encoder_args=args,
            spatial_dims=tiny.spatial_dims,
            image_size=tuple(record["preprocess"]["size"]),
            text_num_layers=1,
            text_max_length=64,
            embed_dim=64,
            image_refit=image_refit,
            image_refit_cell=cell,
        )
    )


def _export_and_check(model: MedVLP, tiny: TinyModel, image: str, tmp_path: Path) -> None:
    """Save ``model`` with ``tiny``'s cohort record, serve it, export it and check onnxruntime against both."""
    from medvlp.serve.server import load_service

    folder = tmp_path / "model"
    model.save_pretrained(folder)
    (folder / "cohort.json").write_text((tiny.model / "cohort.json").read_text())
    service = load_service(folder, device="cpu", corpus=False)
    out = export_onnx(service, tmp_path / "export")
    _check_export(service, out, tiny.cohort.parent / "images" / image, tmp_path)


@pytest.mark.parametrize("args", [{"global_pool": "avgattn"}, {"global_pool": "avgattn", "laterality": True}])
def test_onnx_export_of_the_demo_tower_with_its_attention_pool(
    model_2d: TinyModel, tmp_path: Path, args: dict[str, object]
) -> None:
    """The 2D demo's tower (a timm CNN ending in the mean plus a positional attention residual, `global_pool:
    avgattn`, with or without the laterality head) exports with its trained residuals: onnxruntime gives PyTorch's
    embeddings and the server's answer."""
    model = _tiny_model(model_2d, "tiny_timm_resnet", args, seed=5)
    residual = [p for n, p in model.named_parameters() if n.endswith(("pool.proj.weight", "laterality.proj.weight"))]
    assert len(residual) == len(args), "the tower ends in the attention pool (and the laterality head)"
    with torch.no_grad():
        for p in residual:  # as training leaves it: not the zero the residual starts at
            p.normal_(0, 0.05)
    _export_and_check(model, model_2d, "S00001.dcm", tmp_path)


@pytest.mark.parametrize("spot_maps", [False, True])
def test_onnx_export_of_a_3d_tower_with_blob_statistics(model_3d: TinyModel, tmp_path: Path, spot_maps: bool) -> None:
    """A 3D ResNet with the fixed spot statistics (`blobs`: every kind), alone and with the spot maps into its
    stem (`spot_maps`), exports with its trained maps and norms: onnxruntime gives PyTorch's embeddings and the
    server's answer."""
    args = {"blobs": ["margins", "levels", "contrast"], "spot_maps": spot_maps}
    model = _tiny_model(model_3d, "tiny_resnet", args, seed=6)
    blobs, spots = model.image_encoder.blobs, model.image_encoder.spot_maps
    assert blobs is not None and (spots is not None) == spot_maps
    with torch.no_grad():  # as training leaves them: maps that are not zero, statistics of the training images
        blobs.proj.weight.normal_(0, 0.05)
        norms = [blobs.norm]
        if spots is not None:
            spots.conv.weight.normal_(0, 0.05)
            norms.append(spots.norm)
        for norm in norms:
            norm.running_mean.uniform_(0.0, 0.2)
            norm.running_var.uniform_(0.01, 0.05)
    _export_and_check(model, model_3d, "S00002", tmp_path)


def test_onnx_export_of_a_3d_model_with_an_image_refit(model_3d: TinyModel, tmp_path: Path) -> None:
    """A 3D model whose global embedding and tokens (on cells of 4 voxels) are refitted from its spot statistics after
    training (`medvlp.models.image_refit`) exports with the fitted maps: onnxruntime gives PyTorch's embeddings and
    tokens and the server's answer (a refit without cells is the same graph less the tokens' part)."""
    kinds = ("margins", "contrast")
    model = _tiny_model(model_3d, "tiny_resnet", {"blobs": True}, seed=7, image_refit=kinds, cell=4)
    refit = model.image_refit
    assert refit is not None
    n = refit.spots.num_statistics
    torch.manual_seed(8)
    refit.set(torch.rand(n) * 0.1, torch.rand(n) + 0.5, torch.randn(refit.num_features, 64) * 0.1)
    assert refit.grid is not None
    cells = refit.cell_mean.shape[0]
    refit.set_cells(torch.rand(cells, n) * 0.1, torch.rand(cells, n) + 0.5)
    _export_and_check(model, model_3d, "S00002", tmp_path)
