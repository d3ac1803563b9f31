"""Does "left" mean left, and does "no" mean no? The negation and laterality robustness suite.

For every annotated finding phrase of the split (the sentence a radiologist wrote about a finding that is there,
from the cohort's grounding file) the model must rank the true sentence above its negated twin and above its
laterality-swapped twin (:mod:`medvlp.data.perturb`), by the cosine similarity of the image with each text. Ties
count against the model. Accuracy is reported per perturbation and per finding; 0.5 is what a model that cannot tell
the twins apart scores on average.

Those cases have the finding on the image, so a model that ranks every negated sentence low passes the negation
without looking. The suite therefore also asks the question the other way round (``absence``): each negation case's
pair of sentences on a study of the same split labelled without the finding
(:func:`medvlp.tasks.grounding.control_studies`), where the negated sentence must win. ``mean_accuracy`` stays the
mean over the negation and laterality cases; ``mean_accuracy_with_absence`` counts the absence cases too, and a
model that scores "no" low everywhere gets about 0.5 on negation and absence together
(``negation_balanced_accuracy``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch

from medvlp.data.perturb import PERTURBATIONS
from medvlp.tasks.embed import score_pairs
from medvlp.tasks.grounding import control_studies, grounding_pairs

__all__ = ["ABSENCE", "SUITE", "absence_cases", "robustness_cases", "robustness_suite"]

#: The suite's perturbations of a true finding sentence (affirmation applies to negated sentences only).
SUITE = {name: PERTURBATIONS[name] for name in ("negation", "laterality")}
#: The perturbation name of the cases asked the other way round: the negated sentence on an image without the finding.
ABSENCE = "absence"


def robustness_cases(cache: Any, split: str = "test") -> pd.DataFrame:
    """One row per (study, phrase, perturbation) that has a twin: ``study, finding, phrase, perturbation, twin``."""
    rows = []
    for p in grounding_pairs(cache, split).itertuples(index=False):
        for name, rule in SUITE.items():
            twin = rule(p.phrase)
            if twin is not None and twin != p.phrase:
                rows.append(
                    {"study": p.study, "finding": p.finding, "phrase": p.phrase, "perturbation": name, "twin": twin}
                )
    return pd.DataFrame(rows, columns=["study", "finding", "phrase", "perturbation", "twin"])


def absence_cases(cache: Any, split: str = "test") -> pd.DataFrame:
    """The negation cases turned round, one per negation case whose finding has a study without it in the split:
    ``study`` is that study (:func:`~medvlp.tasks.grounding.control_studies`), ``phrase`` the negated sentence (the
    true one there), ``twin`` the affirmative sentence, ``perturbation`` :data:`ABSENCE`."""
    pairs = grounding_pairs(cache, split)
    columns = ["study", "finding", "phrase", "perturbation", "twin"]
    if pairs.empty:
        return pd.DataFrame(columns=columns)
    rows = []
    for p, control in zip(pairs.itertuples(index=False), control_studies(cache, pairs, split), strict=True):
        twin = SUITE["negation"](p.phrase)
        if control is not None and twin is not None and twin != p.phrase:
            rows.append(
                {"study": control, "finding": p.finding, "phrase": twin, "perturbation": ABSENCE, "twin": p.phrase}
            )
    return pd.DataFrame(rows, columns=columns)


@torch.no_grad()
def robustness_suite(model: Any, cache: Any, image_emb: np.ndarray, studies: list[str], split: str = "test") -> dict:
    """Accuracy of ranking each true finding sentence above its perturbed twins.

    A model with a side check (:mod:`medvlp.models.side_check`) ranks by its pair score (the check reads the image
    tokens, :func:`medvlp.tasks.embed.score_pairs`); the ranking by the embeddings alone is then reported beside it as
    ``without_side_check``. The absence cases (:func:`absence_cases`) are scored the same way, beside the others.

    Args:
        model: a :class:`~medvlp.models.MedVLP` (its text tower embeds the sentences).
        cache: the cohort cache (its grounding phrases are the true sentences; its images, for a side check).
        image_emb: ``[N, E]`` image embeddings of the split (:func:`medvlp.tasks.embed.embed_split`).
        studies: the ``N`` study pseudonyms of ``image_emb``'s rows.
        split: the split.

    Returns:
        ``{"n", "mean_accuracy", "per_perturbation": {name: {"accuracy", "n"}}, "per_finding": {finding: {name:
        accuracy}}, "mean_accuracy_with_absence", "negation_balanced_accuracy"}`` (and ``without_side_check``:
        the same four summary keys with a side check); ``n`` and ``mean_accuracy`` count the negation
        and laterality cases only, as before the absence cases were added; ``per_perturbation`` and ``per_finding``
        hold ``absence`` too; ``mean_accuracy`` None when the split has no annotated phrase with a twin.
    """
    cases = robustness_cases(cache, split)
    if cases.empty:
        return {"n": 0, "mean_accuracy": None, "per_perturbation": {}, "per_finding": {}}
    cases = pd.concat([cases, absence_cases(cache, split)], ignore_index=True)
    row = {s: i for i, s in enumerate(studies)}
    img = torch.nn.functional.normalize(torch.as_tensor(image_emb[[row[s] for s in cases["study"]]]).float(), dim=-1)
    texts = list(dict.fromkeys([*cases["phrase"], *cases["twin"]]))
    was_training = model.training
    model.eval()
    try:
        emb = torch.cat([model.encode_text(texts[i : i + 64]).float().cpu() for i in range(0, len(texts), 64)])
    finally:
        model.train(was_training)
    emb = torch.nn.functional.normalize(emb, dim=-1)
    index = {t: i for i, t in enumerate(texts)}
    true = (img * emb[[index[t] for t in cases["phrase"]]]).sum(-1)
    twin = (img * emb[[index[t] for t in cases["twin"]]]).sum(-1)
    plain = _accuracies(cases, true > twin)
    if getattr(model, "side_check", None) is None:
        return plain
    both = score_pairs(model, cache, [*cases["study"], *cases["study"]], [*cases["phrase"], *cases["twin"]])
    out = _accuracies(cases, both[: len(cases)] > both[len(cases) :])
    keys = ("mean_accuracy", "per_perturbation", "mean_accuracy_with_absence", "negation_balanced_accuracy")
    out["without_side_check"] = {k: plain[k] for k in keys}
    return out


def _accuracies(cases: pd.DataFrame, correct: torch.Tensor) -> dict[str, Any]:
    """The suite's summary of one ranking: ``correct[i]`` is True where case ``i``'s true sentence won (a tie is a
    miss)."""
    cases = cases.assign(correct=correct.numpy())
    suite = cases[cases["perturbation"] != ABSENCE]
    per_pert = {str(k): {"accuracy": float(g["correct"].mean()), "n": len(g)} for k, g in cases.groupby("perturbation")}
    per_finding = {
        str(f): {str(k): float(g2["correct"].mean()) for k, g2 in g.groupby("perturbation")}
        for f, g in cases.groupby("finding")
    }
    negation = cases[cases["perturbation"].isin(["negation", ABSENCE])]
    return {
        "n": len(suite),
        "mean_accuracy": float(suite["correct"].mean()),
        "per_perturbation": per_pert,
        "per_finding": per_finding,
        "mean_accuracy_with_absence": float(cases["correct"].mean()),
        "negation_balanced_accuracy": (
            float(negation.groupby("perturbation")["correct"].mean().mean())
            if set(negation["perturbation"]) == {"negation", ABSENCE}
            else None
        ),
    }
