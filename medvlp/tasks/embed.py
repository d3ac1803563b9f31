"""Frozen embeddings of one split of a cohort cache: what every task, surface and benchmark scores.

:func:`embed_split` is the one place where a split's images and reports go through the towers, for the evaluation
card, the notebooks, the server's retrieval corpus and the benchmarks alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from medvlp.data.cache import CachedCohort

__all__ = ["SplitEmbeddings", "embed_split", "encode_texts", "load_images", "score_pairs"]


@dataclass
class SplitEmbeddings:
    """Frozen embeddings of one split.

    Attributes:
        records: the split's cache records (pseudonymous ``study`` and ``subject``, report, labels, outcomes).
        image: ``[N, E]`` image embeddings.
        text: ``[N, E]`` report embeddings.
        labels: ``[N, F]`` finding labels (1, 0, -1 uncertain, NaN unknown).
        reports: the ``N`` report texts that were embedded (the chosen sections).
    """

    records: pd.DataFrame
    image: np.ndarray
    text: np.ndarray
    labels: np.ndarray
    reports: list[str]


def load_images(cache: CachedCohort, studies: Sequence[str]) -> torch.Tensor:
    """``[B, 1, *size]`` float32 cached images of the given studies (an empty tensor for none)."""
    arrays = [np.asarray(cache.load_image(s), dtype=np.float32) for s in studies]
    return torch.from_numpy(np.stack(arrays)) if arrays else torch.zeros(0)


@torch.no_grad()
def embed_split(
    model: Any, cache: CachedCohort, split: str, sections: Sequence[str], batch_size: int = 32
) -> SplitEmbeddings:
    """Batched, gradient-free embeddings of a split's images and reports (``sections`` of each report)."""
    from medvlp.data.reports import report_text

    was_training = model.training
    model.eval()
    rec = cache.split(split)
    reports = [report_text(r, list(sections)) for r in rec["report"]]
    imgs, txts = [], []
    try:
        for i in range(0, len(rec), batch_size):
            images = load_images(cache, list(rec["study"].iloc[i : i + batch_size]))
            imgs.append(model.encode_image(images.to(model.device)).float().cpu())
            txts.append(model.encode_text(reports[i : i + batch_size]).float().cpu())
    finally:
        model.train(was_training)
    dim = int(model.config.embed_dim)
    image = torch.cat(imgs).numpy() if imgs else np.zeros((0, dim), np.float32)
    text = torch.cat(txts).numpy() if txts else np.zeros((0, dim), np.float32)
    labels = rec[cache.findings].astype("float32").to_numpy() if cache.findings else np.zeros((len(rec), 0))
    return SplitEmbeddings(rec, image, text, labels, reports)


@torch.no_grad()
def encode_texts(model: Any, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
    """``[N, E]`` unit-norm float32 CPU embeddings of ``texts`` (at least one), in batches, the model in eval mode."""
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        chunks = [
            model.encode_text(list(texts[i : i + batch_size]), normalize=True).float().cpu()
            for i in range(0, len(texts), batch_size)
        ]
    finally:
        if was_training:
            model.train()
    return F.normalize(torch.cat(chunks), dim=-1)


@torch.no_grad()
def score_pairs(
    model: Any, cache: CachedCohort, studies: Sequence[str], texts: Sequence[str], batch_size: int = 32
) -> torch.Tensor:
    """``[N]`` float32 CPU scores of each study's cached image with its text (:meth:`medvlp.models.MedVLP.score_pairs`:
    the cosine, plus the side check's term when the model has one), in batches, the model in eval mode."""
    if len(studies) != len(texts):
        raise ValueError(f"{len(studies)} studies for {len(texts)} texts")
    was_training = model.training
    model.eval()
    try:
        chunks = [
            model.score_pairs(load_images(cache, studies[i : i + batch_size]), texts[i : i + batch_size]).float().cpu()
            for i in range(0, len(texts), batch_size)
        ]
    finally:
        model.train(was_training)
    return torch.cat(chunks) if chunks else torch.zeros(0)
