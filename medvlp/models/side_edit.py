"""The side edit: a rank-one change of the text embedding that makes "left" and "right" point where the image does.

The aligned towers learn the side of a finding for whole reports but hardly for a sentence alone: the image
embedding holds the side (a linear probe reads it), while a sentence and its side-swapped twin stay almost the same
text embedding. The edit moves the embedding of a text that names a side along the image embedding's own side
direction, by how much the text's side part points along the text tower's side direction::

    s(x) = w . (e(x) - e(mirror(x))) / 2          e'(x) = normalize(e(x) + strength * s(x) * u)

``e`` is the unit text embedding, ``mirror`` swaps every left and right (:func:`medvlp.data.perturb.mirror_sides`),
``w`` is the text side direction scaled so that a typical one-sided training sentence has ``|s| = 1``, and ``u`` the
image side direction. A text that names no side is its own mirror (``s = 0``): it is not changed, so the zero-shot
prompts of the templates keep their embeddings exactly. By default (``texts="sentences"``) only a text of one
sentence is edited: the twin term already teaches whole reports their side, while a sentence alone is where the side
is lost, and the reports (the zero-shot report prototypes, retrieval) keep their embeddings; ``"all"`` edits every
text that names a side. The directions are fitted on the training split and the
strength chosen on ``val`` (:func:`medvlp.tasks.side_edit.fit_side_edit`); the model folder stores them as weights
(``side_edit.*``) and its config says ``side_edit: true``. The edit acts where texts arrive as strings
(:meth:`medvlp.models.MedVLP.encode_text`: evaluation, notebooks, server); token batches (training, the ONNX text
graph) are the tower without it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medvlp.data.perturb import mirror_sides, named_sides
from medvlp.data.reports import text_sentences

__all__ = ["SideEdit", "moved_along_side"]


def moved_along_side(
    own: Tensor, mirrored: Tensor, image_direction: Tensor, text_direction: Tensor, strength: float | Tensor
) -> Tensor:
    """The edit's formula on unit embeddings ``own`` ``[B, E]`` of texts and ``mirrored`` of their mirrors: each row
    moved by ``strength * s`` along ``image_direction``, ``s = text_direction . (own - mirrored) / 2``, renormalized."""
    s = (own - mirrored) @ text_direction.to(own.dtype) / 2
    return F.normalize(own + strength * s[:, None] * image_direction.to(own.dtype), dim=-1)


class SideEdit(nn.Module):
    """The fitted directions and strength (all zero until :func:`medvlp.tasks.side_edit.fit_side_edit` sets them)."""

    def __init__(self, embed_dim: int, texts: str = "sentences") -> None:
        super().__init__()
        if texts not in ("sentences", "all"):
            raise ValueError(f"the side edit acts on 'sentences' or 'all' texts, not {texts!r}")
        self.texts = texts
        self.register_buffer("image_direction", torch.zeros(embed_dim))
        self.register_buffer("text_direction", torch.zeros(embed_dim))
        self.register_buffer("strength", torch.zeros(()))

    def set(self, image_direction: Tensor, text_direction: Tensor, strength: float) -> None:
        """Store a fit: the unit image side direction, the scaled text side direction and the strength."""
        self.image_direction.copy_(torch.as_tensor(image_direction, dtype=self.image_direction.dtype))
        self.text_direction.copy_(torch.as_tensor(text_direction, dtype=self.text_direction.dtype))
        self.strength.fill_(float(strength))

    def _acts_on(self, text: str) -> bool:
        return self.texts == "all" or len(text_sentences(text)) == 1

    def forward(self, texts: Sequence[str], embedding: Tensor, encode: Callable[[list[str]], Tensor]) -> Tensor:
        """``embedding`` ``[B, E]`` of ``texts`` with the edit applied to the texts that name a side (of one sentence
        unless the edit acts on ``"all"``).

        ``encode`` embeds a list of strings (unit norm, the tower without the edit). The result keeps each row's norm
        (a unit row stays unit).
        """
        if float(self.strength) == 0.0:
            return embedding
        sided = [i for i, t in enumerate(texts) if named_sides(t) and self._acts_on(t)]
        if not sided:
            return embedding
        rows = torch.as_tensor(sided, device=embedding.device)
        picked = embedding[rows]
        norm = picked.norm(dim=-1, keepdim=True)
        own = F.normalize(picked, dim=-1)
        mirrored = F.normalize(encode([mirror_sides(texts[i]) for i in sided]).to(own.dtype), dim=-1)
        out = embedding.clone()
        out[rows] = moved_along_side(own, mirrored, self.image_direction, self.text_direction, self.strength) * norm
        return out
