"""Export a model's towers to ONNX (``medvlp export --format onnx``), for scoring with onnxruntime alone.

The export folder is the one owner of this layout (read by :class:`medvlp.hospital.onnx_scorer.OnnxScorer`)::

    OUT/image.onnx      images [B, 1, *size] float32 in [0, 1] -> embedding [B, E], tokens [B, N, E] (unit norm)
    OUT/text.onnx       input_ids, attention_mask [B, T] int64 -> text_embedding [B, E] (unit norm)
    OUT/tokenizer/      the text tower's tokenizer (transformers format; only needed for new finding names)
    OUT/prompts.npy     [F, 2, E] positive/negative prompt embeddings of the model's findings
    OUT/scorer.json     findings, logit scale, grid, input size, the training preprocessing, calibration, versions

A model with a side edit (:mod:`medvlp.models.side_edit`) has it in ``prompts.npy``; ``text.onnx`` is the text tower
without it (the edit embeds a text's mirror too, which a token graph cannot), so a new text that names a side scored
through it differs from the model's answer; ``scorer.json`` says so (``side_edit``: the strength and the texts it
acts on, or null). A side check (:mod:`medvlp.models.side_check`) is a term of the model's pair score of a
one-sided sentence, not of an embedding nor of the zero-shot probabilities: the export leaves it out and
``scorer.json`` says so (``side_check``: its axis, orientation and strength, or null).

Batch (and the text length) are dynamic axes. The preprocessing is the training one, written down for the caller
(:func:`medvlp.data.preprocess.preprocess_image` applies it).
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from medvlp.serve.service import DiagnosisService

logger = logging.getLogger(__name__)

__all__ = ["FORMATS", "SCORER_FILE", "export_onnx"]

FORMATS = ("onnx",)
SCORER_FILE = "scorer.json"
OPSET = 18


class _ImageTower(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        out = self.model.forward_image(images)
        return out.embedding, out.tokens


class _TextTower(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.model.encode_text({"input_ids": input_ids, "attention_mask": attention_mask})  # [B, E]


def _export(module: nn.Module, args: tuple[Tensor, ...], path: Path, names: dict[str, Any]) -> None:
    """``torch.export`` -> ONNX with dynamic axes; the exported graph is checked by the tests against PyTorch."""
    dims: dict[str, Any] = {}
    shapes = {
        name: {axis: dims.setdefault(label, torch.export.Dim(label, min=1, max=4096)) for axis, label in axes.items()}
        for name, axes in names["axes"].items()
        if name in names["inputs"]
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module,
            args,
            input_names=names["inputs"],
            output_names=names["outputs"],
            dynamic_shapes=shapes,
            opset_version=OPSET,
            dynamo=True,
            verbose=False,
        )
    program.save(str(path))


@torch.no_grad()
def export_onnx(service: DiagnosisService, out: Path) -> Path:
    """Write the ONNX export of a loaded model (see the module docstring); returns ``out``.

    Args:
        service: the model with its training context (:func:`medvlp.serve.server.load_service`).
        out: the export folder (created; existing files are replaced).
    """
    from medvlp import __version__
    from medvlp.hospital.sr import algorithm_of

    model = service.model.eval().to("cpu")
    out.mkdir(parents=True, exist_ok=True)
    size = tuple(int(s) for s in service.size)
    example = torch.rand(2, 1, *size)
    grid = tuple(int(g) for g in model.forward_image(example).grid)
    _export(
        _ImageTower(model),
        (example,),
        out / "image.onnx",
        {
            "inputs": ["images"],
            "outputs": ["embedding", "tokens"],
            "axes": {"images": {0: "batch"}, "embedding": {0: "batch"}, "tokens": {0: "batch"}},
        },
    )
    tok = model.text_encoder.tokenize(["There is a small pleural effusion.", "No pneumothorax."])
    _export(
        _TextTower(model),
        (tok["input_ids"], tok["attention_mask"]),
        out / "text.onnx",
        {
            "inputs": ["input_ids", "attention_mask"],
            "outputs": ["text_embedding"],
            "axes": {
                "input_ids": {0: "batch", 1: "length"},
                "attention_mask": {0: "batch", 1: "length"},
                "text_embedding": {0: "batch"},
            },
        },
    )
    model.text_encoder.tokenizer.save_pretrained(str(out / "tokenizer"))
    findings = service.findings
    prompts = service.prompt_embeddings(findings).numpy() if findings else np.zeros((0, 2, model.config.embed_dim))
    np.save(out / "prompts.npy", prompts.astype(np.float32))
    algo = algorithm_of(model, service.context.cohort)
    meta = {
        "format": "medvlp-onnx/1",
        "medvlp_version": __version__,
        "algorithm": {"name": algo.name, "version": algo.version},
        "findings": findings,
        "logit_scale": service.logit_scale,
        "spatial_dims": service.spatial_dims,
        "image_size": list(size),
        "grid": list(grid),
        "embed_dim": int(model.config.embed_dim),
        "text_max_length": int(model.text_encoder.max_length),
        "preprocess": service.spec.model_dump(mode="json"),
        "calibration": service.context.calibration,  # fitted on val after training (None: the zero-shot softmax)
        "opset": OPSET,
        "side_edit": None
        if model.side_edit is None
        else {  # not in text.onnx
            "strength": float(model.side_edit.strength),
            "texts": model.side_edit.texts,
        },
        "side_check": None
        if model.side_check is None
        else {  # a term of the pair score, not in the graphs
            "axis": model.side_check.axis,
            "orientation": float(model.side_check.orientation),
            "strength": float(model.side_check.strength),
        },
    }
    (out / SCORER_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    logger.info("exported %s to ONNX: %d findings", algo.name, len(findings))
    return out
