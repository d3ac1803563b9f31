"""Fitting the image refit of a model folder (:mod:`medvlp.models.image_refit`): the map on train, its ridge on val.

No label is read. On the training split the trained model embeds every image and its report; the image's spot
statistics are standardised with the training mean and scale; a ridge regression (the constant not penalised) maps
``[unit image embedding, statistics, 1]`` onto the unit report embeddings, once per strength of :data:`RIDGES`. On
``val`` each map, and the trained embedding without a map, is scored by image -> report retrieval (R@10, then the
mean rank; identical reports are one answer, as :func:`medvlp.tasks.retrieval.retrieval_metrics` counts them); the
best wins, a tie going to the stronger ridge and, before every map, to no refit. The choice and every candidate's
scores go to ``image_refit.json`` in the model folder, the map into its weights. A refit starts from the model
without one, so fitting twice gives the same model.

With ``cell`` the chosen map also refits the tokens (:class:`medvlp.models.image_refit.ImageRefit`): each cell's
statistics are standardised with that cell's mean and scale over the training images (again no label).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["IMAGE_REFIT_RECORD", "RIDGES", "fit_image_refit", "ridge_map"]

logger = logging.getLogger(__name__)

#: The candidate ridge strengths, strongest first (a tie keeps the stronger), in units of one standardised feature.
RIDGES = (1000.0, 300.0, 100.0, 30.0, 10.0, 3.0, 1.0)
#: The fit's record in the model folder.
IMAGE_REFIT_RECORD = "image_refit.json"
#: A statistic whose training spread is below this is left at its mean (scale 1): it carries nothing.
MIN_SCALE = 1e-6
#: A cell's scale is at least this fraction of its statistic's scale over whole images: a place where a statistic
#: hardly varies over the training images (air, the table) does not turn its noise into a finding.
CELL_SCALE_FLOOR = 0.1


def ridge_map(features: np.ndarray, targets: np.ndarray, strength: float) -> np.ndarray:
    """``W`` minimising ``|features @ W - targets|^2 + strength * |W without its last row|^2`` (the last column of
    ``features`` is the constant, not penalised), in float64."""
    x, t = np.asarray(features, np.float64), np.asarray(targets, np.float64)
    penalty = np.full(x.shape[1], float(strength))
    penalty[-1] = 0.0
    return np.linalg.solve(x.T @ x + np.diag(penalty), x.T @ t)


def _split(
    model: Any, refit: Any, cache: Any, split: str, sections: Sequence[str], batch_size: int, cells: bool = False
) -> dict[str, Any]:
    """The split's unit image and report embeddings (``model``, without a refit), its reports, the images' raw spot
    statistics and, with ``cells`` (and a ``refit`` that has them), the sums of their cells' statistics: values,
    squares and counts (the maps computed once for both)."""
    from medvlp.tasks.embed import embed_split, load_images

    emb = embed_split(model, cache, split, sections, batch_size)
    studies = list(emb.records["study"])
    stats, sums = [], [torch.zeros(())] * 3
    for i in range(0, len(studies), batch_size):
        x = load_images(cache, studies[i : i + batch_size])
        maps = refit.spots.maps(x)
        stats.append(refit.spots.statistics(x, maps=maps))
        if cells and refit.grid is not None:
            values = refit.spots.cell_statistics(x, refit.grid, maps=maps).double()
            held = torch.isfinite(values)
            values = torch.where(held, values, torch.zeros_like(values))
            sums = [sums[0] + values.sum(0), sums[1] + (values**2).sum(0), sums[2] + held.sum(0)]
    out = {"image": emb.image, "text": emb.text, "reports": emb.reports, "stats": torch.cat(stats).numpy()}
    return out | {"cell_sums": sums}


def _cell_moments(sums: Sequence[Tensor], scale: np.ndarray) -> tuple[Tensor, Tensor]:
    """From the training images' cell sums of :func:`_split` (values, squares, counts), per cell and statistic the
    mean and standard deviation, the latter at least :data:`CELL_SCALE_FLOOR` of the statistic's ``scale`` over whole
    images (0 and 1 in the other half's columns, which a cell never holds)."""
    total, square, count = sums
    mean = total / count.clamp(min=1)
    std = (square / count.clamp(min=1) - mean**2).clamp(min=0).sqrt()
    floor = torch.as_tensor(CELL_SCALE_FLOOR * scale, dtype=std.dtype)
    return mean.float(), torch.where(count > 0, std.maximum(floor), torch.ones_like(std)).float()


def _retrieval(image: np.ndarray, text: np.ndarray, reports: list[str]) -> tuple[float, float]:
    from medvlp.tasks.retrieval import retrieval_metrics

    i2r = retrieval_metrics(image, text, ks=(10,), texts=reports)["image_to_report"]
    return float(i2r["R@10"]), float(i2r["mean_rank"])


@torch.no_grad()
def fit_image_refit(
    model_dir: str | Path,
    cache: Any,
    sections: Sequence[str],
    kinds: Sequence[str],
    ridges: Sequence[float] = RIDGES,
    batch_size: int = 16,
    cell: int | None = None,
) -> dict[str, Any]:
    """Fit the image refit of a model folder on its cohort (the map on ``train``, the ridge on ``val``), write it.

    ``kinds``: the spot statistics it reads (:data:`medvlp.models.blobs.BLOB_KINDS`). The model must be 2D or 3D
    with images of at least two pixels across its laterality axis (the statistics read two halves). ``cell``: the
    refitted tokens' cell size in voxels (None: the tokens stay the tower's).

    Returns:
        The record written to ``image_refit.json``: the chosen ``ridge`` (None: no refit, the folder's model is left
        without one) and every candidate's val R@10 and mean rank.
    """
    from medvlp.models import MedVLP

    model_dir = Path(model_dir)
    model = MedVLP.from_pretrained(model_dir).eval()
    model.image_refit = None  # the embeddings are the trained model's (a refit fitted before is left out)
    config = model.config.model_copy(update={"image_refit": tuple(kinds), "image_refit_cell": cell})
    refit = MedVLP.image_refit_module(config)
    if refit is None:
        raise ValueError("the image refit needs at least one kind of spot statistics")
    data = {s: _split(model, refit, cache, s, sections, batch_size, cells=s == "train") for s in ("train", "val")}
    mean = data["train"]["stats"].mean(0)
    scale = data["train"]["stats"].std(0)
    scale = np.where(scale > MIN_SCALE, scale, 1.0)

    def features(d: dict[str, Any]) -> np.ndarray:
        unit = d["image"] / np.linalg.norm(d["image"], axis=1, keepdims=True)
        return np.concatenate([unit, (d["stats"] - mean) / scale, np.ones((len(unit), 1))], axis=1)

    x_train, x_val = features(data["train"]), features(data["val"])
    val = data["val"]
    scores: dict[str, tuple[float, float]] = {"none": _retrieval(val["image"], val["text"], val["reports"])}
    maps = {}
    for strength in ridges:
        maps[strength] = ridge_map(x_train, data["train"]["text"], strength)
        scores[str(float(strength))] = _retrieval(x_val @ maps[strength], val["text"], val["reports"])
    best = max(scores, key=lambda k: (scores[k][0], -scores[k][1]))  # the first of equals: none, then the strongest
    chosen = None if best == "none" else float(best)
    record = {
        "kinds": list(kinds),
        "ridge": chosen,
        "val_r10": {k: v[0] for k, v in scores.items()},
        "val_mean_rank": {k: v[1] for k, v in scores.items()},
        "train_pairs": len(x_train),
        "val_pairs": len(x_val),
        "num_statistics": int(refit.spots.num_statistics),
        "cell": cell,
        "token_grid": None if refit.grid is None or chosen is None else list(refit.grid),
    }
    if chosen is not None:
        refit.set(torch.as_tensor(mean), torch.as_tensor(scale), torch.as_tensor(maps[chosen]))
        if refit.grid is not None:
            refit.set_cells(*_cell_moments(data["train"]["cell_sums"], scale))
        model.config, model.image_refit = config, refit
    else:  # a folder refitted before goes back to the model without a map
        model.config = model.config.model_copy(update={"image_refit": None, "image_refit_cell": None})
    model.save_pretrained(model_dir)
    (model_dir / IMAGE_REFIT_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    logger.info("image refit: ridge %s chosen on val (R@10 %s)", chosen, record["val_r10"])
    return record
