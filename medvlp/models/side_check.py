"""The side check: "left" is scored where the finding is on the image, read from the image tokens.

The global image embedding holds the side of a finding only roughly (a linear probe on it reads a one-sided sentence's
side in 70 to 80 % of the training studies), so even the side edit (:mod:`medvlp.models.side_edit`) stops short of
ranking "small left effusion" above "small right effusion" on the image that has it. The patch (voxel) tokens know
better where a finding is (the phrase grounding reads them). The check adds to the score of an image with a text that
is one affirmative sentence naming exactly one side::

    score(x, t) = cos(x, t) + strength * orientation * side(t) * (max_upper(x, topic(t)) - max_lower(x, topic(t)))

``side(t)`` is +1 for left and -1 for right (:func:`checked_sides`, the words alone: a negated, hedged or two-sided
text, or one of several sentences, gets no check), ``topic(t)`` the text without its side (the unit sum of the
text's and its mirror's embeddings, towers alone), and ``max_upper`` / ``max_lower`` the largest cosine of a token
with the topic in the upper / lower half of the token grid along the image's left-right axis (the middle row of an
odd grid in neither). ``orientation`` says which half is the patient's left (fitted on the training reports' words,
so no display convention is assumed), ``strength`` is chosen on ``val``
(:func:`medvlp.tasks.side_check.fit_side_check`). The check is a term of the pair score
(:meth:`medvlp.models.MedVLP.score_pairs`), not of an embedding: retrieval, the zero-shot probabilities and the
exported ONNX towers do not carry it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medvlp.data.perturb import mirror_sides, named_sides, negate
from medvlp.data.reports import text_sentences

__all__ = ["SideCheck", "checked_sides", "half_difference"]


def checked_sides(texts: Sequence[str]) -> Tensor:
    """``[T]``: +1 for a text of one affirmative sentence naming the left only, -1 for the right only, else 0."""

    def side(text: str) -> float:
        sides = named_sides(text)
        if len(sides) != 1 or len(text_sentences(text)) != 1 or negate(text) is None:
            return 0.0
        return 1.0 if "left" in sides else -1.0

    return torch.tensor([side(t) for t in texts], dtype=torch.float32)


def half_difference(similarity: Tensor, grid: Sequence[int], axis: int) -> Tensor:
    """``[B]``: the largest value of ``similarity`` ``[B, N]`` (row-major over ``grid``) in the upper half of
    ``axis`` minus the largest in the lower half; an odd axis leaves its middle row out."""
    grid = tuple(int(g) for g in grid)
    half = grid[axis] // 2
    if half < 1:
        raise ValueError(f"the token grid {grid} has fewer than two rows along axis {axis}")
    values = similarity.reshape(similarity.shape[0], *grid)
    dim = 1 + axis
    upper = values.narrow(dim, grid[axis] - half, half).flatten(1).amax(1)
    lower = values.narrow(dim, 0, half).flatten(1).amax(1)
    return upper - lower


class SideCheck(nn.Module):
    """The fitted orientation (+1: the upper half of ``axis`` is the patient's left, -1: the lower) and strength,
    zero until :func:`medvlp.tasks.side_check.fit_side_check` sets them; ``axis`` is the spatial axis of the image
    (and of the token grid) that runs across the patient."""

    def __init__(self, axis: int) -> None:
        super().__init__()
        self.axis = int(axis)
        self.register_buffer("orientation", torch.zeros(()))
        self.register_buffer("strength", torch.zeros(()))

    def set(self, orientation: float, strength: float) -> None:
        """Store a fit."""
        self.orientation.fill_(float(orientation))
        self.strength.fill_(float(strength))

    def forward(
        self, texts: Sequence[str], tokens: Tensor, grid: Sequence[int], encode: Callable[[list[str]], Tensor]
    ) -> Tensor:
        """``[B]``: the check's term for each image's tokens ``[B, N, E]`` with its text (zero where it does not act).

        ``encode`` embeds a list of strings (unit norm, the towers alone)."""
        term = torch.zeros(len(texts), device=tokens.device, dtype=torch.float32)
        sides = checked_sides(texts).to(tokens.device)
        rows = sides.nonzero().flatten()
        if float(self.strength) == 0.0 or len(rows) == 0:
            return term
        picked = [texts[int(i)] for i in rows]
        topic = F.normalize(encode(picked).float() + encode([mirror_sides(t) for t in picked]).float(), dim=-1)
        similarity = torch.einsum("bne,be->bn", F.normalize(tokens[rows].float(), dim=-1), topic)
        difference = half_difference(similarity, grid, self.axis)
        term[rows] = self.strength * self.orientation * sides[rows] * difference
        return term
