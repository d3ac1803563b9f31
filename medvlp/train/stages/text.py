"""Stage 1, language: masked-language-model domain adaptation of the text tower on the cohort's reports.

Whole-word masking: a word split into several word pieces ("pneumo", "##thorax") is masked whole, so
the model cannot fill in a finding from its own fragments. Each report's mask is drawn from a generator seeded by
(seed, step, its index in the training set): resuming a run reproduces it exactly, and N ranks mask as one process.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from medvlp.config import TextStageConfig
from medvlp.data.cache import CachedCohort
from medvlp.data.reports import split_sections
from medvlp.models.text import default_text_model_path, quiet_transformers
from medvlp.train.data import mask_generators
from medvlp.train.loop import LrPlan
from medvlp.train.runtime import mean_over_ranks


class ReportSections(Dataset):
    """Each section of each training report (FINDINGS, IMPRESSION, ...) as one text: sections differ in style.

    Every report of the train split counts, report-only studies (no image) included.
    """

    def __init__(self, cache: CachedCohort, sections: list[str]) -> None:
        texts: list[str] = []
        studies: list[str] = []  # the study (pseudonym) of each text
        records = cache.split("train", need=("report",))
        for study, report in zip(records["study"], records["report"], strict=True):
            parts = split_sections(report)
            chosen = [t for t in ([parts[s] for s in sections if s in parts] or [" ".join(report.split())]) if t]
            texts.extend(chosen)
            studies.extend([study] * len(chosen))
        if not texts:
            raise ValueError(f"{cache.root}: no report text in the train split")
        self.texts, self.studies = texts, studies

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        i = key[0] if isinstance(key, tuple) else key
        return {"index": i, "text": self.texts[i]}


def whole_word_mask(
    input_ids: torch.Tensor,
    word_ids: list[list[int | None]],
    tokenizer,
    probability: float,
    generator: torch.Generator | Sequence[torch.Generator],
    whole_words: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking (80% [MASK], 10% random token, 10% kept) of whole words.

    Args:
        input_ids: ``[B, T]`` token ids.
        word_ids: per sequence, the word index of each token (None for special and padding tokens).
        probability: share of words to mask (at least one word per sequence).
        generator: one for the whole batch, or one per sequence; each sequence's draws cover its own tokens only,
            so with one generator per sequence its mask depends neither on the other sequences nor on the padding.

    Returns:
        ``(masked_input_ids, labels)`` with labels -100 where nothing is predicted.
    """
    B = input_ids.shape[0]
    gens = [generator] * B if isinstance(generator, torch.Generator) else list(generator)
    if len(gens) != B:
        raise ValueError(f"{len(gens)} generators for a batch of {B}")
    labels = torch.full_like(input_ids, -100)
    masked = input_ids.clone()
    for b, (wids, g) in enumerate(zip(word_ids, gens, strict=True)):
        units = (
            [w for w in dict.fromkeys(wids) if w is not None]
            if whole_words
            else [t for t, w in enumerate(wids) if w is not None]
        )
        if not units:
            continue
        n = max(1, round(probability * len(units)))
        picked = {units[int(c)] for c in torch.randperm(len(units), generator=g)[:n]}
        pos = torch.tensor(
            [t for t, w in enumerate(wids) if w is not None and (w if whole_words else t) in picked], dtype=torch.long
        )
        labels[b, pos] = input_ids[b, pos]
        roll = torch.rand(len(pos), generator=g)  # [P] one draw per predicted token
        masked[b, pos[roll < 0.8]] = tokenizer.mask_token_id
        swap = pos[(roll >= 0.8) & (roll < 0.9)]
        masked[b, swap] = torch.randint(len(tokenizer), (len(swap),), generator=g)
    return masked, labels


class MaskedLM(nn.Module):
    """A masked-LM model whose vocabulary head runs only at the masked positions (~15% of tokens).

    The head (hidden -> vocabulary, 30k outputs) costs as much as the encoder when applied to every token, as
    ``BertForMaskedLM.forward`` does; here it sees only the rows that have a label. Models without a separate
    head attribute (``cls`` for BERT, ``lm_head`` for RoBERTa-likes) fall back to their own forward.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.head = getattr(model, "cls", None) or getattr(model, "lm_head", None)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        denominator: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Mean cross-entropy over the masked tokens; ``denominator`` replaces their count (see ``mean_over_ranks``)."""
        picked = labels != -100  # [B, T]
        count = picked.sum()
        if self.head is None:
            loss = self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
            return loss if denominator is None else loss * count / denominator.clamp_min(1.0)
        hidden = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        logits = self.head(hidden[picked])  # [M, vocab]
        total = nn.functional.cross_entropy(logits.float(), labels[picked], reduction="sum")
        return total / (count if denominator is None else denominator).clamp_min(1.0)


class TextStage:
    """Continues masked-language pretraining of any local transformers folder on the reports."""

    name = "stage1-text"

    def __init__(
        self,
        cfg: TextStageConfig,
        cache: CachedCohort,
        sections: list[str],
        seed: int,
        text_path: str | None = None,
        num_layers: int | None = None,
        max_length: int = 128,
        dropout: float | None = None,
    ) -> None:
        from transformers import AutoModelForMaskedLM, AutoTokenizer

        self.config, self.cache, self.sections, self.seed = cfg, cache, sections, seed
        self.path = str(text_path or default_text_model_path())
        extra: dict[str, Any] = {} if num_layers is None else {"num_hidden_layers": num_layers}
        if dropout is not None:
            extra |= {"hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout}
        self.tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        if self.tokenizer.mask_token_id is None:
            raise ValueError(f"{self.path}: the tokenizer has no [MASK] token; masked-language training needs one")
        with quiet_transformers():  # the MLM head is new: transformers' load report would list it as missing
            self.model = AutoModelForMaskedLM.from_pretrained(self.path, local_files_only=True, **extra)
        self.max_length = max_length
        if cfg.freeze_embeddings:
            self.model.get_input_embeddings().weight.requires_grad_(False)
        self.net = MaskedLM(self.model)

    def module(self) -> nn.Module:
        return self.net

    def lr_plan(self, name: str) -> LrPlan:
        """The new MLM head learns alone for ``head_only_steps``, then the encoder follows at ``body_lr_scale``.

        A random head's first gradients are noise; passed into a pretrained encoder at full rate they undo what
        the encoder knew before the head has learnt to read it.
        """
        if name.startswith(f"model.{self.model.base_model_prefix}."):
            return LrPlan(self.config.body_lr_scale, self.config.head_only_steps)
        return LrPlan()

    def dataset(self) -> Dataset:
        return ReportSections(self.cache, self.sections)

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        enc = self.tokenizer(
            [it["text"] for it in items], padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return {
            "index": torch.tensor([it["index"] for it in items]),
            "input_ids": enc["input_ids"],
            "attention_mask": enc["attention_mask"],
            "word_ids": [enc.word_ids(b) for b in range(len(items))],
        }

    def training_forward(self, module: nn.Module, batch: dict[str, Any], step: int) -> dict[str, torch.Tensor]:
        ids, labels = whole_word_mask(
            batch["input_ids"].cpu(),
            batch["word_ids"],
            self.tokenizer,
            self.config.mlm_probability,
            mask_generators(self.seed, step, batch["index"].tolist()),
            self.config.whole_word_mask,
        )
        dev = batch["input_ids"].device
        labels = labels.to(dev)
        denominator = mean_over_ranks((labels != -100).sum().float())
        return {"loss": module(ids.to(dev), batch["attention_mask"], labels, denominator)}

    def save_final(self, out_dir: Path) -> None:
        """The adapted encoder as a plain transformers folder (``out_dir/text``), the MLM head beside it."""
        with quiet_transformers():
            self.model.base_model.save_pretrained(out_dir / "text")
            self.tokenizer.save_pretrained(out_dir / "text")
            self.model.save_pretrained(out_dir / "mlm")
