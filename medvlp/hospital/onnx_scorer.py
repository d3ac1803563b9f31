"""Score with an ONNX export (``medvlp export --format onnx``) using numpy and onnxruntime only: no PyTorch.

    from medvlp.hospital.onnx_scorer import OnnxScorer
    scorer = OnnxScorer("export/")
    probs = scorer.probabilities(images)          # images: [B, 1, *size] float32 in [0, 1], preprocessed
    dict(zip(scorer.findings, probs[0]))

The images must be preprocessed as in training (``scorer.json``'s ``preprocess``; with medvlp installed,
``medvlp.data.preprocess.preprocess_image(medvlp.read_image(path), PreprocessSpec(**meta["preprocess"]))``).
The probability is the one of :func:`medvlp.tasks.zeroshot.zero_shot_probabilities` (softmax of the scaled cosine
similarities to each finding's positive and negative prompts), restated in numpy so that this module needs no
PyTorch; a test holds the two equal.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["OnnxScorer", "softmax_probabilities"]


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def softmax_probabilities(image_emb: np.ndarray, prompts: np.ndarray, logit_scale: float) -> np.ndarray:
    """``[N, E]`` images, ``[F, 2, E]`` prompts -> ``[N, F]`` probability of the positive prompt (float64)."""
    img, txt = _unit(image_emb.astype(np.float32)), _unit(prompts.astype(np.float32))  # float32 as the library
    logits = (np.float32(logit_scale) * np.einsum("ne,fke->nfk", img, txt)).astype(np.float64)  # [N, F, 2]
    logits -= logits.max(axis=-1, keepdims=True)
    e = np.exp(logits)
    return e[..., 0] / e.sum(axis=-1)


class OnnxScorer:
    """The towers of an export folder in onnxruntime sessions, with the cached prompts.

    Args:
        folder: the export folder.
        providers: onnxruntime execution providers (default: CPU).
        threads: intra-op threads (default: onnxruntime's choice).
    """

    def __init__(self, folder: str | Path, providers: list[str] | None = None, threads: int | None = None) -> None:
        import onnxruntime as ort

        self.folder = Path(folder)
        self.meta: dict[str, Any] = json.loads((self.folder / "scorer.json").read_text())
        if self.meta.get("format") != "medvlp-onnx/1":
            raise ValueError(f"{self.folder} is not a medvlp ONNX export (format {self.meta.get('format')!r})")
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads is not None:
            opts.intra_op_num_threads = int(threads)
        providers = providers or ["CPUExecutionProvider"]
        self.image = ort.InferenceSession(str(self.folder / "image.onnx"), opts, providers=providers)
        self._text: Any = None
        self._providers, self._opts = providers, opts
        self.prompts = np.load(self.folder / "prompts.npy")  # [F, 2, E]
        self.findings: list[str] = list(self.meta["findings"])
        self.logit_scale = float(self.meta["logit_scale"])

    def image_embeddings(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``[B, 1, *size]`` -> embedding ``[B, E]`` and tokens ``[B, N, E]`` (unit norm)."""
        size = tuple(self.meta["image_size"])
        if images.ndim != len(size) + 2 or tuple(images.shape[2:]) != size or images.shape[1] != 1:
            raise ValueError(f"images must be [B, 1, {', '.join(map(str, size))}], got {list(images.shape)}")
        emb, tokens = self.image.run(None, {"images": np.ascontiguousarray(images, dtype=np.float32)})
        return emb, tokens

    def text_embeddings(self, texts: list[str]) -> np.ndarray:
        """``[T, E]`` (unit norm); needs the tokenizer (``transformers``), loaded on first use."""
        if self._text is None:
            import onnxruntime as ort
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(str(self.folder / "tokenizer"), local_files_only=True)
            self._text = ort.InferenceSession(str(self.folder / "text.onnx"), self._opts, providers=self._providers)
        tok = self._tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=int(self.meta["text_max_length"]),
            return_tensors="np",
        )
        feeds = {
            "input_ids": tok["input_ids"].astype(np.int64),
            "attention_mask": tok["attention_mask"].astype(np.int64),
        }
        return self._text.run(None, feeds)[0]

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """``[B, F]`` probability of each of the model's findings (``self.findings``), calibrated as the server's
        when the model has a calibration (``scorer.json``'s ``calibration``)."""
        from medvlp.tasks.calibration import apply_calibration

        emb, _ = self.image_embeddings(images)
        probs = softmax_probabilities(emb, self.prompts, self.logit_scale)
        return apply_calibration(probs, self.findings, self.meta.get("calibration"))[0]
