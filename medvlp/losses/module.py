"""The loss registry and the configurable module the training stages use."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
import torch.nn.functional as F
from monai.utils import look_up_option
from torch import Tensor, nn

from medvlp import distributed as mdist
from medvlp.losses.contrastive import clip_loss, duplicate_groups, siglip_loss
from medvlp.losses.kernels import _check_chunk
from medvlp.losses.terms import (
    alignment_loss,
    local_alignment_loss,
    noise_weights,
    sentence_alignment_loss,
    twin_loss,
    uniformity_loss,
)


# ------------------------------------------------------------------------------------ registry + module
def _look_up(name: str, known: Sequence[str], what: str, exc: type[Exception] = ValueError) -> str:
    """``name`` if it is known; else ``exc`` listing the known names, with MONAI's "did you mean ...?" guess."""
    try:
        return look_up_option(name, known, print_all_options=False)
    except ValueError as err:
        raise exc(
            f"unknown {what} {name!r} (known: {', '.join(sorted(known))}): {' '.join(str(err).split())}"
        ) from None


def _clip_term(
    img: Tensor,
    txt: Tensor,
    scale: Tensor | float,
    bias: Tensor | float | None,
    targets: Tensor | None,
    cfg: ContrastiveLossConfig,
) -> Tensor:
    kw: dict[str, Any] = {
        "targets": targets,
        "gather": cfg.gather,
        "local_loss": cfg.local_loss,
        "chunk_size": cfg.chunk_size,
    }
    if not cfg.noise_weighting:
        return clip_loss(img, txt, scale, **kw)
    per = clip_loss(img, txt, scale, reduction="none", **kw)  # [B], or [b] with local_loss across ranks
    sh = mdist.shard_layout(img.shape[0], img.device, cfg.gather)
    if sh.world == 1 or not cfg.local_loss:
        return (noise_weights(per, cfg.noise_tau) * per).mean()
    w = noise_weights(mdist.gather_features(per.detach(), sizes=sh.sizes), cfg.noise_tau)  # [B]
    return (w[sh.offset : sh.offset + per.shape[0]] * per).sum() * (sh.world / sh.total)


def _siglip_term(
    img: Tensor,
    txt: Tensor,
    scale: Tensor | float,
    bias: Tensor | float | None,
    targets: Tensor | None,
    cfg: ContrastiveLossConfig,
) -> Tensor:
    loss = siglip_loss(img, txt, scale, bias, positives=targets, gather=cfg.gather, chunk_size=cfg.chunk_size)
    if not cfg.noise_weighting:
        return loss
    # weight each image-text pair's own (positive) term; negatives keep weight 1
    pos = -F.logsigmoid(scale * (img * txt).sum(-1) + (0.0 if bias is None else bias))  # [b]
    sh = mdist.shard_layout(img.shape[0], img.device, cfg.gather)
    all_pos = mdist.gather_features(pos.detach(), sizes=sh.sizes) if sh.world > 1 else pos  # [B]
    w = noise_weights(all_pos, cfg.noise_tau)[sh.offset : sh.offset + pos.shape[0]]
    return loss + ((w - 1) * pos).sum() * (sh.world / sh.total)


#: Contrastive kinds: `fn(image_features, text_features, logit_scale, logit_bias, targets, config) -> scalar`.
LOSSES: dict[str, Callable[..., Tensor]] = {"clip": _clip_term, "siglip": _siglip_term}


@dataclass
class ContrastiveLossConfig:
    """Options of `ContrastiveLoss`; every term beyond the contrastive one is off by default.

    Attributes:
        kind: a key of `LOSSES` ("clip" or "siglip").
        gather, local_loss, chunk_size: as in `clip_loss` / `siglip_loss` (`local_loss` is CLIP only).
        noise_weighting: NEVLP-style noise-adaptive pair weights (`noise_weights` of the detached per-pair loss:
            CLIP's per-pair cross-entropy, SigLIP's positive-pair term), computed over the global batch.
        noise_tau: loss scale of the weighting.
        alignment_weight: weight of `alignment_loss` (Wang & Isola), as in the "contrastive gap" paper.
        uniformity_weight: weight of `uniformity_loss` over the concatenated image + text embeddings.
        uniformity_t: its temperature.
        local_weight: weight of the GLoRIA/MGCA-style `local_alignment_loss` (needs image/text tokens).
        local_attention_scale, local_word_scale, local_logit_scale: its inverse temperatures.
        sentence_weight: weight of `sentence_alignment_loss` (one sentence of each report, multi-positive, with
            optional hard-negative twins; needs `sentence_features` and `sentence_positives`).
        twin_weight: weight of `twin_loss` (each image's report against the report with one sentence flipped; needs
            `twin_features`).
        twin_sentence_weight: weight of `twin_loss` on the flipped sentence alone: each image against that sentence
            and its twin, the two texts without the rest of the report (needs `twin_sentences`).
        twin_sentence_text_only: the sentence twin term sees the image features detached (it trains the text side).

    The alignment, uniformity, local, sentence and twin terms use this rank's local batch only.
    """

    kind: str = "clip"
    gather: bool = True
    local_loss: bool = False
    chunk_size: int | None = None
    noise_weighting: bool = False
    noise_tau: float = 0.5
    alignment_weight: float = 0.0
    uniformity_weight: float = 0.0
    uniformity_t: float = 2.0
    local_weight: float = 0.0
    local_attention_scale: float = 4.0
    local_word_scale: float = 5.0
    local_logit_scale: float = 10.0
    sentence_weight: float = 0.0
    twin_weight: float = 0.0
    twin_sentence_weight: float = 0.0
    twin_sentence_text_only: bool = False

    def __post_init__(self) -> None:
        self.kind = _look_up(self.kind, list(LOSSES), "loss kind")
        _check_chunk(self.chunk_size)
        if self.local_loss and self.kind != "clip":
            raise ValueError(f"local_loss applies to kind='clip' only (kind={self.kind!r})")
        for name in ("noise_tau", "uniformity_t"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        weights = ("alignment", "uniformity", "local", "sentence", "twin", "twin_sentence")
        for name in (f"{w}_weight" for w in weights):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


class ContrastiveLoss(nn.Module):
    """Contrastive loss plus optional literature terms; returns `{"loss": total, "contrastive": ..., <terms>}`.

    Example:
        `ContrastiveLoss("siglip", chunk_size=4096, noise_weighting=True)(img, txt, scale, bias)["loss"]`
    """

    def __init__(self, kind: str | None = None, *, config: ContrastiveLossConfig | None = None, **options: Any) -> None:
        super().__init__()
        names = [f.name for f in fields(ContrastiveLossConfig)]
        for key in options:
            _look_up(key, names, "ContrastiveLoss option", TypeError)
        if kind is not None:
            options["kind"] = kind
        self.config = replace(config or ContrastiveLossConfig(), **options)

    def forward(
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: Tensor | float,
        logit_bias: Tensor | float | None = None,
        *,
        targets: Tensor | None = None,
        keys: Sequence[Hashable | None] | Tensor | None = None,
        image_tokens: Tensor | None = None,
        text_tokens: Tensor | None = None,
        text_mask: Tensor | None = None,
        sentence_features: Tensor | None = None,
        sentence_positives: Tensor | None = None,
        hard_features: Tensor | None = None,
        hard_mask: Tensor | None = None,
        twin_features: Tensor | None = None,
        twin_mask: Tensor | None = None,
        twin_sentences: tuple[Tensor, Tensor] | None = None,
        twin_sentence_mask: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Compute the loss terms.

        Args:
            image_features: local image embeddings [b, D], L2-normalized.
            text_features: local text embeddings [b, D], L2-normalized.
            logit_scale: scalar multiplier (already exponentiated).
            logit_bias: SigLIP bias (ignored by CLIP).
            targets: global [B, B] pair matrix or [B] group ids (CLIP soft targets / SigLIP positives).
            keys: per-sample keys instead of `targets` (gathered across ranks when `gather`).
            image_tokens: [b, P, D] patch embeddings (local term).
            text_tokens: [b, T, D] word embeddings (local term).
            text_mask: [b, T] real-word mask (local term).
            sentence_features: [b, D] one sentence per report (sentence term).
            sentence_positives: [b, b] bool, report i contains sentence j (sentence term).
            hard_features: [b, D] hard-negative twins of the sentences, with `hard_mask` [b] (sentence term).
            twin_features: [b, D] each report with one sentence flipped, with `twin_mask` [b] (twin term).
            twin_sentences: ([b, D], [b, D]) the flipped sentence of each report alone and its twin alone, with
                `twin_mask` (sentence twin term).
            twin_sentence_mask: [b] bool, the rows the sentence twin term scores, or [b] float weights of them; None:
                `twin_mask`.

        Returns:
            Dict of scalar tensors: "loss" (weighted total), "contrastive", and each enabled term.
        """
        cfg = self.config
        if keys is not None:
            if targets is not None:
                raise ValueError("pass either targets or keys, not both")
            targets = duplicate_groups(keys, gather=cfg.gather).to(image_features.device)
        terms = {"contrastive": LOSSES[cfg.kind](image_features, text_features, logit_scale, logit_bias, targets, cfg)}
        weights = {
            "contrastive": 1.0,
            "alignment": cfg.alignment_weight,
            "uniformity": cfg.uniformity_weight,
            "local": cfg.local_weight,
            "sentence": cfg.sentence_weight,
            "twin": cfg.twin_weight,
            "twin_sentence": cfg.twin_sentence_weight,
        }
        if cfg.alignment_weight:
            terms["alignment"] = alignment_loss(image_features, text_features)
        if cfg.uniformity_weight:
            terms["uniformity"] = uniformity_loss(torch.cat([image_features, text_features]), cfg.uniformity_t)
        if cfg.local_weight:
            if image_tokens is None or text_tokens is None:
                raise ValueError("local_weight > 0 needs image_tokens and text_tokens")
            terms["local"] = local_alignment_loss(
                image_tokens,
                text_tokens,
                text_mask,
                attention_scale=cfg.local_attention_scale,
                word_scale=cfg.local_word_scale,
                logit_scale=cfg.local_logit_scale,
            )
        if cfg.sentence_weight:
            if sentence_features is None or sentence_positives is None:
                raise ValueError("sentence_weight > 0 needs sentence_features and sentence_positives")
            terms["sentence"] = sentence_alignment_loss(
                image_features, sentence_features, logit_scale, sentence_positives, hard_features, hard_mask
            )
        if cfg.twin_weight:
            if twin_features is None:
                raise ValueError("twin_weight > 0 needs twin_features")
            terms["twin"] = twin_loss(image_features, text_features, twin_features, logit_scale, twin_mask)
        if cfg.twin_sentence_weight:
            if twin_sentences is None:
                raise ValueError("twin_sentence_weight > 0 needs twin_sentences")
            image = image_features.detach() if cfg.twin_sentence_text_only else image_features
            rows = twin_mask if twin_sentence_mask is None else twin_sentence_mask
            terms["twin_sentence"] = twin_loss(image, *twin_sentences, logit_scale, rows)
        total = sum(weights[k] * v for k, v in terms.items())
        return {"loss": total, **terms}
