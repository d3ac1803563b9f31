"""Contrastive image-text losses (CLIP InfoNCE, SigLIP): exact across ranks, optionally chunked.

Single process, `clip_loss` equals open_clip's `ClipLoss()(img, txt, scale)` and `siglip_loss` equals
`SigLipLoss()(img, txt, scale, bias)`, values and gradients. Features are L2-normalized by the caller and
`logit_scale` is the multiplier (already exponentiated).

Distributed rule (global batch B = the ranks' local batches concatenated in rank order; L = the loss one process
computes on the global batch; N = world size):

- Every rank returns a term `L_r` with `mean_r L_r == L`. With `clip_loss(local_loss=False)` every term equals L
  (each rank evaluates the full B x B loss); with `clip_loss(local_loss=True)` and `siglip_loss` a rank owns the
  rows of its local samples against all gathered columns, normalized by `B / N` (= the local batch size for even
  shards, as in open_clip), so the mean over ranks is exact even for uneven shards.
- Gathers carry gradients, so `L_r.backward()` leaves `N * dL/dx_r` on the local feature rows `x_r` and
  `dL_r/dtheta` on replicated tensors (`logit_scale`, `logit_bias`). Averaging parameter gradients over ranks
  (what DDP does, or all_reduce(SUM) / N) therefore gives exactly the single-process gradient of L.

Chunking (`chunk_size`) computes the logits in row blocks of `chunk_size x B` inside custom autograd Functions
that recompute each block in backward, so neither forward nor backward holds the B x B matrix.
"""

from __future__ import annotations

from medvlp.losses.contrastive import clip_logits, clip_loss, duplicate_groups, duplicate_targets, siglip_loss
from medvlp.losses.module import LOSSES, ContrastiveLoss, ContrastiveLossConfig
from medvlp.losses.terms import (
    alignment_loss,
    box_grounding_loss,
    local_alignment_loss,
    local_similarity,
    noise_weights,
    sentence_alignment_loss,
    twin_loss,
    uniformity_loss,
)

__all__ = [
    "LOSSES",
    "ContrastiveLoss",
    "ContrastiveLossConfig",
    "alignment_loss",
    "box_grounding_loss",
    "clip_logits",
    "clip_loss",
    "duplicate_groups",
    "duplicate_targets",
    "local_alignment_loss",
    "local_similarity",
    "noise_weights",
    "sentence_alignment_loss",
    "siglip_loss",
    "twin_loss",
    "uniformity_loss",
]
