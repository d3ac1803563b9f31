"""Fitting the side check of a model folder (:mod:`medvlp.models.side_check`): orientation on train, strength on val.

No label is read. The reports' sentences that the check acts on (one affirmative sentence that names one side,
:func:`medvlp.models.side_check.checked_sides`) and their studies' images give both:

- the orientation: which half of the left-right axis the training reports call left, the sign of the check's term at
  orientation +1 summed over the training sentences (a cohort stored in any display convention is read as it is);
- the strength, among :data:`STRENGTHS`, by how often each ``val`` image scores such a sentence of its report above
  its side-swapped twin and above its negated twin (the robustness suite's two perturbations, pooled; a tie counts
  against; between strengths the smaller wins a tie, so 0, no check, wins when nothing helps).

The check is written into the model folder's weights and ``config.json`` (``side_check_axis``), its fit into
``side_check.json``. The base scores include the side edit when the model has one, so fit the edit first.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["SIDE_CHECK_RECORD", "STRENGTHS", "checked_sentences", "fit_side_check"]

logger = logging.getLogger(__name__)

#: The candidate strengths, in units of the score's cosine per unit of token-cosine difference (0: no check).
STRENGTHS = (0.0, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2)
#: The fit's record in the model folder.
SIDE_CHECK_RECORD = "side_check.json"
#: Fewer checked sentences of either side than this in train or val: no check is fitted.
MIN_PER_SIDE = 5


def checked_sentences(reports: Sequence[str]) -> tuple[list[int], list[str], np.ndarray]:
    """The sentences of ``reports`` that the check acts on: report index, sentence, +1 left / -1 right."""
    from medvlp.data.reports import text_sentences
    from medvlp.models.side_check import checked_sides

    pairs = [(i, s) for i, report in enumerate(reports) for s in text_sentences(report)]
    sides = checked_sides([s for _, s in pairs]).numpy() if pairs else np.zeros(0, np.float32)
    keep = np.flatnonzero(sides)
    return [pairs[k][0] for k in keep], [pairs[k][1] for k in keep], sides[keep]


def _base_and_term(
    model: Any, cache: Any, axis: int, studies: list[str], texts: list[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each pair's score without a check, and the check's term at orientation +1 and strength 1."""
    from medvlp.models.side_check import SideCheck
    from medvlp.tasks.embed import score_pairs

    model.side_check = None
    base = score_pairs(model, cache, studies, texts)
    model.side_check = SideCheck(axis)
    model.side_check.set(1.0, 1.0)
    term = score_pairs(model, cache, studies, texts) - base
    model.side_check = None
    return base, term


def _left_right_axis(cache: Any) -> int | None:
    from medvlp.train.data import left_right_axis

    try:
        return left_right_axis(cache)
    except ValueError as exc:
        logger.warning("side check: %s; no check", exc)
        return None


@torch.no_grad()
def fit_side_check(
    model_dir: str | Path, cache: Any, sections: Sequence[str], strengths: Sequence[float] = STRENGTHS
) -> dict[str, Any] | None:
    """Fit the side check of a model folder on its cohort (orientation on ``train``, strength on ``val``), write it.

    Returns:
        The record written to ``side_check.json``, or None when the cache has no known left-right axis or its train or
        val reports hold too few checked sentences of a side (the model folder is left as it was, with a warning).
    """
    from medvlp.data.perturb import negate, swap_laterality
    from medvlp.data.reports import report_text
    from medvlp.models import MedVLP
    from medvlp.models.side_check import SideCheck

    axis = _left_right_axis(cache)
    if axis is None:
        return None
    model_dir = Path(model_dir)
    model = MedVLP.from_pretrained(model_dir).eval()
    found: dict[str, tuple[list[str], list[str], np.ndarray]] = {}
    for split in ("train", "val"):
        rec = cache.split(split)
        rows, sentences, sides = checked_sentences([report_text(r, list(sections)) for r in rec["report"]])
        if min(int((sides > 0).sum()), int((sides < 0).sum())) < MIN_PER_SIDE:
            logger.warning("side check: %d checked %s sentences, too few of one side; no check", len(sides), split)
            return None
        found[split] = ([str(rec["study"].iloc[r]) for r in rows], sentences, sides)
    studies, sentences, _ = found["train"]
    train_term = _base_and_term(model, cache, axis, studies, sentences)[1]
    orientation = 1.0 if float(train_term.sum()) >= 0 else -1.0
    studies, sentences, _ = found["val"]
    twins = {
        "laterality": [str(swap_laterality(s)) for s in sentences],
        "negation": [str(negate(s)) for s in sentences],
    }
    n, texts = len(sentences), [*sentences, *twins["laterality"], *twins["negation"]]
    base, term = _base_and_term(model, cache, axis, studies * 3, texts)
    term = orientation * term
    val: dict[float, dict[str, float]] = {}
    for k in sorted(float(k) for k in strengths):
        score = base + k * term
        wins = {name: score[:n] > score[(i + 1) * n : (i + 2) * n] for i, name in enumerate(twins)}
        val[k] = {name: float(w.float().mean()) for name, w in wins.items()}
        val[k]["pooled"] = float(torch.cat(list(wins.values())).float().mean())
    chosen = max(val, key=lambda k: (val[k]["pooled"], -k))  # ties: the smaller strength
    model.config = model.config.model_copy(update={"side_check_axis": axis})
    model.side_check = SideCheck(axis)
    model.side_check.set(orientation, chosen)
    model.save_pretrained(model_dir)
    record = {
        "axis": axis,
        "orientation": orientation,
        "strength": chosen,
        "val_accuracy": {str(k): v for k, v in val.items()},
        "train_sentences": len(train_term),
        "val_sentences": n,
        "train_agreement": float((orientation * train_term > 0).float().mean()),
    }
    (model_dir / SIDE_CHECK_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    logger.info("side check: orientation %+d, strength %s chosen on val (%s)", orientation, chosen, val[chosen])
    return record
