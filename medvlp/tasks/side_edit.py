"""Fitting the side edit of a model folder (:mod:`medvlp.models.side_edit`): directions on train, strength on val.

No label is read. The training reports' sentences that name exactly one side
(:func:`medvlp.data.perturb.swap_laterality`) and their studies' images give both directions:

- the image side direction ``u``: a logistic regression without intercept on the unit image embeddings, the side
  the sentence names as the target (a study's sentences of both sides pull against each other);
- the text side direction ``w``: the mean difference between each such sentence written on the left and the same
  sentence written on the right, scaled so that ``|s| = 1`` on average over them.

The strength is chosen on ``val`` among :data:`STRENGTHS` by how often each image prefers its own reports' one-sided
sentences over their side-swapped twins (ties: the smaller strength, so 0, no edit, wins when nothing helps); the
choice and every candidate's accuracy are written to ``side_edit.json`` in the model folder, the edit into its
weights. A refit starts from the tower without the edit, so fitting twice gives the same model.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["SIDE_EDIT_RECORD", "STRENGTHS", "fit_side_edit", "one_sided_sentences"]

logger = logging.getLogger(__name__)

#: The candidate strengths, in units of a typical one-sided sentence's side score (0: no edit).
STRENGTHS = (0.0, 0.1, 0.2, 0.4, 0.8)
#: The fit's record in the model folder.
SIDE_EDIT_RECORD = "side_edit.json"
#: Fewer one-sided training sentences of either side than this: no edit is fitted.
MIN_PER_SIDE = 5


def one_sided_sentences(reports: Sequence[str]) -> tuple[list[int], list[str], np.ndarray]:
    """The sentences of ``reports`` that name exactly one side: report index, sentence, 1 for left / 0 for right."""
    from medvlp.data.perturb import named_sides, swap_laterality
    from medvlp.data.reports import text_sentences

    rows, sentences, left = [], [], []
    for i, report in enumerate(reports):
        for sentence in text_sentences(report):
            if swap_laterality(sentence) is not None:
                rows.append(i)
                sentences.append(sentence)
                left.append(int("left" in named_sides(sentence)))
    return rows, sentences, np.asarray(left, dtype=np.int64)


def _pair_embeddings(model: Any, sentences: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit embeddings (the tower without the edit) of each sentence and of its side-swapped twin."""
    from medvlp.data.perturb import swap_laterality
    from medvlp.tasks.embed import encode_texts

    unique = list(dict.fromkeys(sentences))
    own, twin = encode_texts(model, unique), encode_texts(model, [str(swap_laterality(s)) for s in unique])
    position = {s: i for i, s in enumerate(unique)}
    index = [position[s] for s in sentences]
    return own[index], twin[index]


def _accuracy(
    image: torch.Tensor, own: torch.Tensor, twin: torch.Tensor, u: torch.Tensor, w: torch.Tensor, strength: float
) -> float:
    """How often each image prefers its sentence over the twin with the edit at ``strength`` (ties: misses); the
    twin is the sentence's mirror, and the sentence the twin's."""
    from medvlp.models.side_edit import moved_along_side

    a, b = moved_along_side(own, twin, u, w, strength), moved_along_side(twin, own, u, w, strength)
    return float(((image * a).sum(-1) > (image * b).sum(-1)).float().mean())


@torch.no_grad()
def fit_side_edit(
    model_dir: str | Path,
    cache: Any,
    sections: Sequence[str],
    texts: str = "sentences",
    strengths: Sequence[float] = STRENGTHS,
) -> dict[str, Any] | None:
    """Fit the side edit of a model folder on its cohort (directions on ``train``, strength on ``val``), write it.

    ``texts``: what the edit acts on, ``"sentences"`` (a text of one sentence) or ``"all"``
    (:class:`medvlp.models.side_edit.SideEdit`); the fit and the choice read one-sided sentences either way.

    Returns:
        The record written to ``side_edit.json``, or None when the training or validation reports hold too few
        one-sided sentences (the model folder is left as it was, with a warning).
    """
    from sklearn.linear_model import LogisticRegression

    from medvlp.models import MedVLP
    from medvlp.models.side_edit import SideEdit
    from medvlp.tasks.embed import embed_split

    model_dir = Path(model_dir)
    model = MedVLP.from_pretrained(model_dir).eval()
    model.side_edit = None  # the directions are read from the tower alone
    data = {}
    for split in ("train", "val"):
        emb = embed_split(model, cache, split, sections)
        rows, sentences, left = one_sided_sentences(emb.reports)
        if min(int(left.sum()), int(len(left) - left.sum())) < MIN_PER_SIDE:
            logger.warning("side edit: %d one-sided %s sentences, too few of one side; no edit", len(left), split)
            return None
        image = F.normalize(torch.as_tensor(emb.image[rows]).float(), dim=-1)
        data[split] = (image, *_pair_embeddings(model, sentences), left)
    image, own, twin, left = data["train"]
    probe = LogisticRegression(fit_intercept=False, max_iter=2000).fit(image.numpy(), left)
    u = F.normalize(torch.as_tensor(probe.coef_[0]).float(), dim=0)
    sign = torch.as_tensor(2 * left - 1).float()  # own - twin is left minus right for a left sentence
    w = F.normalize(((own - twin) * sign[:, None]).mean(0), dim=0)
    w = w / float(((own - twin) @ w / 2).abs().mean())
    val = {float(k): _accuracy(*data["val"][:3], u, w, float(k)) for k in sorted(strengths)}
    chosen = max(val, key=lambda k: (val[k], -k))  # ties: the smaller strength
    model.config = model.config.model_copy(update={"side_edit": texts})
    model.side_edit = SideEdit(int(model.config.embed_dim), texts)
    model.side_edit.set(u, w, chosen)
    model.save_pretrained(model_dir)
    record = {
        "texts": texts,
        "strength": chosen,
        "val_accuracy": {str(k): v for k, v in val.items()},
        "train_sentences": len(left),
        "val_sentences": len(data["val"][3]),
        "image_side_train_accuracy": float(probe.score(image.numpy(), left)),
    }
    (model_dir / SIDE_EDIT_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    logger.info("side edit: strength %s chosen on val (%s)", chosen, record["val_accuracy"])
    return record
