"""Stage 2: contrastive image-report alignment (CLIP or SigLIP losses, false-negative aware), validated on `val`.

Studies whose normalized reports are the same (the many near-identical normal reports), or whose label
vectors are the same, are not pushed apart as negatives: they share the target mass of their row.

With ``sentence_weight`` each image is also aligned with one sentence drawn from its own report (seeded by the run's
seed, the epoch and the study), so that one-finding texts such as a zero-shot prompt land where the image is; with
``hard_negatives`` the drawn sentence's rule-made twin (negated, or left and right swapped) is an extra negative for
its image. With ``twin_weight`` each image must also prefer its own report over the same report with one sentence
flipped by those rules (:func:`medvlp.losses.terms.twin_loss`). With ``box_weight`` one annotated phrase of each
training study with grounding boxes must point into its boxes over the image tokens
(:func:`medvlp.losses.terms.box_grounding_loss`). With ``branch_weight`` the image tower's fixed-statistics branch
must also match its own report alone (the reports held fixed in that term).
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from medvlp.config import AlignStageConfig, Interpolation
from medvlp.data.cache import COHORT_RECORD, CachedCohort, atomic_write_json, cohort_record
from medvlp.data.perturb import mirror_sides, negate, polarity, swap_laterality, twins
from medvlp.data.reports import normalize_report, text_sentences
from medvlp.losses import ContrastiveLoss, box_grounding_loss
from medvlp.models import MedVLP, ModelConfig
from medvlp.train.data import CachedImages, collate, sample_seed
from medvlp.train.loop import LrPlan

logger = logging.getLogger(__name__)

MAX_LOG_SCALE = math.log(100.0)  # open_clip's bound: the logit scale stays in [1, 100]
SENTENCE_STREAM = 0x53454E54  # keeps sentence draws apart from augmentation seeds
TWIN_STREAM = 0x5457494E  # and the flipped sentence of each report's twin apart from both


def set_dropout(module: nn.Module, p: float) -> None:
    """Set every dropout probability of a module (0 makes the text tower deterministic)."""
    for m in module.modules():
        if isinstance(m, nn.Dropout):
            m.p = p


def balanced_weights(pairs: list[tuple[str, str]], rows: torch.Tensor) -> torch.Tensor:
    """``[b]`` float weights of the sentence twin term (``twin_sentence_balance``): among the ``rows`` kept, the pairs
    whose statement must win and those whose denial must win (:func:`medvlp.data.perturb.polarity`) share their total
    weight equally (each side half of it); other pairs weigh 1, and a batch with pairs of one way only keeps 1 for
    all. Rows left out weigh 0."""
    ways = torch.tensor([polarity(s, t) for s, t in pairs]) * rows.bool()
    weights = rows.bool().float()
    yes, no = int((ways == 1).sum()), int((ways == -1).sum())
    if yes and no:
        weights[ways == 1] = (yes + no) / (2 * yes)
        weights[ways == -1] = (yes + no) / (2 * no)
    return weights


class AlignNet(nn.Module):
    """What DDP wraps in stage 2: the joint model, returning only the tensors the loss uses.

    DDP decides which parameters will get a gradient by walking back from the forward's outputs; returning
    patch and word tokens that a global loss never touches would leave their projections "expected" but never
    reduced, and the all-reduce of their bucket would never run.
    """

    def __init__(self, model: MedVLP, with_tokens: bool, with_branch: bool = False) -> None:
        super().__init__()
        self.model, self.with_tokens, self.with_branch = model, with_tokens, with_branch

    def forward(
        self,
        images: torch.Tensor,
        tokens: dict[str, torch.Tensor],
        extra_tokens: dict[str, torch.Tensor] | None = None,
    ) -> dict[str, Any]:
        out = self._pairs(images, tokens)
        if extra_tokens is not None:  # the sentences (and their twins) in the same pass, so DDP sees their gradients
            out["extra_text_features"] = self.model.encode_text(extra_tokens)
        return out

    def _pairs(self, images: torch.Tensor, tokens: dict[str, torch.Tensor]) -> dict[str, Any]:
        branch: dict[str, Any] = {}
        if self.with_tokens:
            out = self.model(images, tokens, with_branch=self.with_branch)
            if self.with_branch:
                branch["branch_features"] = out.image_branch
            return {
                **branch,
                "image_features": out.image_features,
                "text_features": out.text_features,
                "logit_scale": out.logit_scale,
                "logit_bias": out.logit_bias,
                "image_tokens": out.image_tokens,
                "text_tokens": out.text_tokens,
                "text_mask": out.text_mask,
                "image_grid": out.image_grid,
            }
        image = self.model.forward_image(images, with_branch=self.with_branch)
        if self.with_branch:
            branch["branch_features"] = image.branch
        return {
            **branch,
            "image_features": image.embedding,
            "text_features": self.model.encode_text(tokens),
            "logit_scale": self.model.logit_scale.exp(),
            "logit_bias": self.model.logit_bias,
        }


class AlignStage:
    """Trains the joint model; its ``save_final`` writes the model folder that every downstream task loads."""

    name = "stage2-align"

    def __init__(
        self,
        cfg: AlignStageConfig,
        cache: CachedCohort,
        model_config: ModelConfig,
        sections: list[str],
        seed: int,
        augment: bool = True,
        text_dropout: float | None = None,
        interpolation: Interpolation = "bilinear",
    ) -> None:
        self.config, self.cache, self.sections, self.seed, self.augment = cfg, cache, sections, seed, augment
        self.interpolation = interpolation
        self.model = MedVLP(model_config)
        if text_dropout is not None:
            set_dropout(self.model.text_encoder, text_dropout)
        if cfg.lock_text_layers is not None:
            self.model.lock_text_tower(unlocked_layers=cfg.lock_text_layers)
        if cfg.branch_weight and not self.model.image_encoder.has_branch:
            raise ValueError(
                f"branch_weight {cfg.branch_weight} aligns the image tower's fixed-statistics branch alone, and "
                f"{type(self.model.image_encoder).__name__} has none here (set model.image_encoder_args.blobs)"
            )
        with_tokens = cfg.local_weight > 0 or cfg.box_weight > 0
        self.net = AlignNet(self.model, with_tokens=with_tokens, with_branch=cfg.branch_weight > 0)
        self.loss = ContrastiveLoss(
            model_config.loss,
            chunk_size=cfg.chunk_size,
            noise_weighting=cfg.noise_weighting,
            uniformity_weight=cfg.uniformity_weight,
            alignment_weight=cfg.alignment_weight,
            local_weight=cfg.local_weight,
            sentence_weight=cfg.sentence_weight,
            twin_weight=cfg.twin_weight,
            twin_sentence_weight=cfg.twin_sentence_weight,
            twin_sentence_text_only=cfg.twin_sentence_text_only,
        )
        # the branch term: the pair loss of the same kind and options, without any added term (their weights default
        # to 0)
        self.branch_loss = ContrastiveLoss(
            model_config.loss, chunk_size=cfg.chunk_size, noise_weighting=cfg.noise_weighting
        )
        # the val loss: the same terms on rank 0's whole val batches, never gathered across ranks
        self.val_loss = ContrastiveLoss(config=replace(self.loss.config, gather=False, local_loss=False))
        self.val_data = self._val_data() if cfg.val_every else None
        self.absence_phrases = self._absence_phrases() if cfg.twin_absence else {}

    def _absence_phrases(self) -> dict[int, list[str]]:
        """``twin_absence``'s pool: per finding (its column in the labels), the training split's annotated phrases
        that have a negated twin."""
        findings = list(self.cache.findings)
        g = self.cache.grounding
        g = g[g["study"].isin(set(self.cache.split("train")["study"]))]
        pool = {
            findings.index(f): sorted({str(t) for t in part["label_text"] if negate(str(t)) is not None})
            for f, part in g.groupby("category_name")
            if f in findings
        }
        pool = {j: phrases for j, phrases in pool.items() if phrases}
        if not pool:
            logger.warning("%s: twin_absence, but the train split has no annotated phrase of a finding", self.name)
        return pool

    def _val_data(self) -> CachedImages | None:
        if self.cache.split("val").empty:
            if self.config.select_metric is not None:
                raise ValueError(
                    f"select_metric {self.config.select_metric!r} needs a val split, and {self.cache.root} has none"
                )
            logger.warning("%s: the cohort has no val split; val_every is ignored", self.name)
            return None
        return CachedImages(self.cache, "val", self.sections, views=0)

    def module(self) -> nn.Module:
        return self.net

    def lr_plan(self, name: str) -> LrPlan:
        """Pretrained towers move slower than the new projections: a full rate on the text tower wipes out what
        its pretraining (and stage 1) taught it within a few hundred steps."""
        if name.startswith("model.text_encoder."):
            return LrPlan(self.config.text_lr_scale)
        heads = tuple(f"model.image_encoder.{p}" for p in self.model.image_encoder.head_prefixes)
        if heads and name.startswith(heads) and self.config.head_lr_scale is not None:
            return LrPlan(self.config.head_lr_scale)
        if name.startswith("model.image_encoder."):
            return LrPlan(self.config.image_lr_scale)
        return LrPlan()

    def dataset(self) -> Dataset:
        views = 1 if self.augment else 0
        if self.config.mirror and not views:
            logger.warning("%s: mirror %s needs data.augment; no sample is mirrored", self.name, self.config.mirror)
        mirror = self.config.mirror if views else 0.0
        data = CachedImages(
            self.cache,
            "train",
            self.sections,
            views=views,
            seed=self.seed,
            boxes=self.boxes,
            mirror=mirror,
            interpolation=self.interpolation,
        )
        if self.boxes and not data.phrases:
            logger.warning(
                "%s: box_weight %s, but the train split of %s has no phrase boxes (grounding.csv); the term is 0",
                self.name,
                self.config.box_weight,
                self.cache.root,
            )
        return data

    @property
    def boxes(self) -> bool:
        """Whether training reads the grounding boxes (the phrase-box term is on)."""
        return self.config.box_weight > 0

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        batch = collate(items)
        batch["tokens"] = dict(self.model.text_encoder.tokenize(batch["text"]))
        extra: list[str] = []  # encoded in the same forward as the reports: sentences, their twins, report twins
        if self.config.sentence_weight:
            batch.update(self._sentences(batch))
            extra += batch["sentences"] + (batch["hard_texts"] if self.config.hard_negatives else [])
        if self.config.twin_weight or self.config.twin_sentence_weight:
            report_twins, pairs, batch["twin_mask"], absent = self._report_twins(batch)
            if self.config.twin_weight:
                batch["report_twins"] = report_twins
                extra += report_twins
            if self.config.twin_sentence_weight:
                batch["twin_sentences"] = pairs
                if (kinds := self.config.twin_sentence_kinds) is not None:  # the pairs those rules made
                    rules = [k for k in kinds if k != "absence"]
                    drawn = zip(pairs, batch["twin_mask"].tolist(), absent, strict=True)
                    chosen = [
                        has and ("absence" in kinds if away else twin in twins(s, rules))
                        for (s, twin), has, away in drawn
                    ]
                    batch["twin_sentence_mask"] = torch.tensor(chosen, dtype=torch.bool)
                if self.config.twin_sentence_balance:
                    rows = batch.get("twin_sentence_mask", batch["twin_mask"])
                    batch["twin_sentence_mask"] = balanced_weights(pairs, rows)
                extra += [p[0] for p in pairs] + [p[1] for p in pairs]
        extra += batch.get("box_phrases") or []  # last, so the box term takes the tail of the extra features
        if extra:
            batch["extra_tokens"] = dict(self.model.text_encoder.tokenize(extra))
        return batch

    def _sentences(self, batch: dict[str, Any]) -> dict[str, Any]:
        """One sentence per study drawn from its report, the positives matrix and the hard-negative twins."""
        drawn, hard, has_hard, own = [], [], [], []
        for text, index, epoch in zip(batch["text"], batch["index"].tolist(), batch["epoch"].tolist(), strict=True):
            sentences = text_sentences(text) or [text]
            own.append({normalize_report(x) for x in sentences})
            rng = np.random.default_rng(sample_seed(self.seed, epoch, index, SENTENCE_STREAM))
            sentence = sentences[int(rng.integers(len(sentences)))]
            # a twin that the report itself states (a swapped side the report also names) is no negative
            options = [t for t in twins(sentence, self.config.hard_negatives) if normalize_report(t) not in own[-1]]
            drawn.append(sentence)
            hard.append(options[int(rng.integers(len(options)))] if options else sentence)
            has_hard.append(bool(options))
        keys = [normalize_report(x) for x in drawn]
        positives = torch.tensor([[k in mine for k in keys] for mine in own])  # [b, b]: report i states sentence j
        return {
            "sentences": drawn,
            "sentence_positives": positives,
            "hard_texts": hard,
            "hard_mask": torch.tensor(has_hard) if self.config.hard_negatives else None,
        }

    def _report_twins(self, batch: dict[str, Any]) -> tuple[list[str], list[tuple[str, str]], torch.Tensor, list[bool]]:
        """Each report with one of its sentences flipped by a ``hard_negatives`` rule, that (sentence, twin) pair,
        which reports have one, and which drew an absence pair.

        The flipped sentence is drawn (seeded by seed, epoch and study) among the report's sentences that have a twin
        the report does not itself state; a report without one keeps its own text (and pairs it with itself), masked
        out of the twin terms. With ``twin_absence`` the draw also holds, per finding the study is labelled without, a
        training phrase of it (drawn from :attr:`absence_phrases`) paired as (its negation, the phrase): the report's
        twin is then the report with the phrase added (an absence row). With ``twin_sides: report`` a laterality twin
        swaps every side the report names, not the drawn sentence's alone (the pair stays the drawn sentence and its
        twin).
        """
        out, pairs, mask, absent_rows = [], [], [], []
        rows = zip(batch["text"], batch["index"].tolist(), batch["epoch"].tolist(), batch["labels"], strict=True)
        for text, index, epoch, labels in rows:
            sentences = list(dict.fromkeys(text_sentences(text)))
            own = {normalize_report(x) for x in sentences}
            options = [
                (s, t)
                for s in sentences
                for t in twins(s, self.config.hard_negatives)
                if normalize_report(t) not in own
            ]
            rng = np.random.default_rng(sample_seed(self.seed, epoch, index, TWIN_STREAM))
            flips = len(options)  # the options past these are absence pairs
            absent = [ps[int(rng.integers(len(ps)))] for j, ps in self.absence_phrases.items() if labels[j] == 0]
            options += [(str(negate(p)), p) for p in absent]  # the negated phrase is true of this image
            if options:
                k = int(rng.integers(len(options)))
                sentence, twin = options[k]
                away = k >= flips  # an absence pair
                whole = self.config.twin_sides == "report" and twin == swap_laterality(sentence)
                if away:  # the report with a false phrase added
                    out.append(f"{text.rstrip()} {twin}")
                else:
                    out.append(mirror_sides(text) if whole else text.replace(sentence, twin, 1))
                pairs.append((sentence, twin))
                absent_rows.append(away)
            else:
                out.append(text)
                pairs.append((text, text))
                absent_rows.append(False)
            mask.append(bool(options))
        return out, pairs, torch.tensor(mask), absent_rows

    def _keys(self, batch: dict[str, Any]) -> Any:
        mode = self.config.false_negatives
        if mode == "report":
            return [normalize_report(t) for t in batch["text"]]
        if mode == "labels":
            labels = batch["labels"]
            known = (labels >= 0).all(dim=1)  # only fully labelled studies may share a key
            keys = torch.where(known[:, None], labels, -10.0 - batch["index"][:, None].to(labels).expand_as(labels))
            return keys
        return None

    def training_forward(self, module: nn.Module, batch: dict[str, Any], step: int) -> dict[str, torch.Tensor]:
        out = module(batch["image"], *self._tokens(batch, batch["image"].device))
        terms = self._terms(self.loss, out, batch)
        if self.boxes:
            terms["box"] = self._box_term(out, batch, self.config.box_text_grad)
            terms["loss"] = terms["loss"] + self.config.box_weight * terms["box"]
        if self.config.branch_weight:  # the statistics' branch alone against the reports, held fixed
            scale, bias = out["logit_scale"].detach(), out["logit_bias"]
            bias = None if bias is None else bias.detach()
            fixed = out["text_features"].detach()
            branch = self.branch_loss(out["branch_features"], fixed, scale, bias, keys=self._keys(batch))
            terms["branch"] = branch["contrastive"]
            terms["loss"] = terms["loss"] + self.config.branch_weight * terms["branch"]
        terms["logit_scale"] = out["logit_scale"].detach()
        return terms

    @staticmethod
    def _box_term(out: dict[str, Any], batch: dict[str, Any], text_grad: bool = True) -> torch.Tensor:
        """The phrase-box loss of the batch's annotated phrases (0, attached to the graph, when it has none); without
        ``text_grad`` the phrase embeddings are constants of the term."""
        tokens = out["image_tokens"]
        rows = batch["box_rows"].to(tokens.device)
        if not len(rows):
            return tokens.sum() * 0.0
        phrases = out["extra_text_features"][-len(rows) :]  # [K, E], encoded after every other extra text
        phrases = phrases if text_grad else phrases.detach()
        masks = batch["box_masks"].to(tokens.device)
        return box_grounding_loss(tokens[rows], phrases, masks, tuple(out["image_grid"]), out["logit_scale"].detach())

    @staticmethod
    def _tokens(batch: dict[str, Any], device: torch.device) -> tuple[dict[str, torch.Tensor], ...]:
        """The report tokens, and the sentence tokens when the batch has them, on ``device``."""
        found = [batch["tokens"]] + ([batch["extra_tokens"]] if "extra_tokens" in batch else [])
        return tuple({k: v.to(device) for k, v in t.items()} for t in found)

    def _terms(self, loss: nn.Module, out: dict[str, Any], batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The contrastive loss terms of one forward pass (training or validation)."""
        extra: dict[str, Any] = {}
        if "extra_text_features" in out:
            features, b = out["extra_text_features"], len(batch["text"])
            device, start = features.device, 0
            if "sentences" in batch:
                extra = {
                    "sentence_features": features[:b],
                    "sentence_positives": batch["sentence_positives"].to(device),
                }
                start = b
                if batch["hard_mask"] is not None:
                    extra.update(hard_features=features[b : 2 * b], hard_mask=batch["hard_mask"].to(device))
                    start = 2 * b
            if "twin_mask" in batch:
                extra["twin_mask"] = batch["twin_mask"].to(device)
            if "report_twins" in batch:
                extra["twin_features"] = features[start : start + b]
                start += b
            if "twin_sentences" in batch:
                extra["twin_sentences"] = (features[start : start + b], features[start + b : start + 2 * b])
                if "twin_sentence_mask" in batch:
                    extra["twin_sentence_mask"] = batch["twin_sentence_mask"].to(device)
        return loss(
            out["image_features"],
            out["text_features"],
            out["logit_scale"],
            out["logit_bias"],
            keys=self._keys(batch),
            image_tokens=out.get("image_tokens"),
            text_tokens=out.get("text_tokens"),
            text_mask=out.get("text_mask"),
            **extra,
        )

    @torch.no_grad()
    def validate(self, batch_size: int) -> dict[str, float]:
        """Zero-shot mean AUROC, image->report R@10 and the loss on the val split, from the task functions.

        The val studies pass in order, in batches of ``batch_size`` (the global training batch, so the loss sees as
        many negatives as in training), un-augmented, with the model in eval mode; the metrics are computed in fp32
        even when training runs under bf16 autocast.
        """
        ds = self.val_data
        if ds is None:
            return {}
        device = self.model.device
        modes = [(m, m.training) for m in self.net.modules()]
        self.net.eval()
        try:
            images, texts, loss_sum = [], [], 0.0
            for start in range(0, len(ds), batch_size):
                batch = self.collate([ds[i] for i in range(start, min(start + batch_size, len(ds)))])
                out = self.net(batch["image"].to(device), *self._tokens(batch, device))
                terms = self._terms(self.val_loss, out, batch)
                loss_sum += float(terms["loss"]) * len(batch["index"])
                images.append(out["image_features"].float().cpu())  # [b, E]
                texts.append(out["text_features"].float().cpu())  # [b, E]
            image, text = torch.cat(images), torch.cat(texts)
            with torch.autocast(device.type, enabled=False):  # the metrics in fp32 even under bf16 training
                zero_shot, retrieval = self._val_metrics(ds, image, text)
        finally:
            for m, training in modes:
                m.train(training)
        return {
            "val/zero_shot_auroc": zero_shot["mean_auroc"],
            "val/r10": retrieval["image_to_report"]["R@10"],
            "val/loss": loss_sum / len(ds),
        }

    def _val_metrics(self, ds: CachedImages, image: torch.Tensor, text: torch.Tensor) -> tuple[dict, dict]:
        """Zero-shot metrics and retrieval metrics of the val embeddings, by the evaluation's own functions."""
        from medvlp.data.reports import report_text
        from medvlp.tasks.retrieval import retrieval_metrics
        from medvlp.tasks.zeroshot import classification_metrics, prompt_spec, zero_shot_scores

        findings = list(self.cache.findings)
        zero_shot: dict = {"mean_auroc": math.nan}
        if findings:
            probs = zero_shot_scores(self.model, image, findings, *prompt_spec(self.cache.summary))
            labels = ds.records[findings].astype("float32").to_numpy()  # NaN unknown, -1 uncertain
            zero_shot = classification_metrics(labels, probs, findings)
        reports = [report_text(r, list(self.sections)) for r in ds.records["report"]]
        return zero_shot, retrieval_metrics(image, text, texts=reports)  # identical reports are one answer

    @torch.no_grad()
    def after_step(self) -> None:
        """Keep the log logit scale in ``[0, ln 100]`` after each optimizer step (the forward never changes it)."""
        self.model.logit_scale.clamp_(0.0, MAX_LOG_SCALE)

    def save_final(self, out_dir: Path) -> None:
        """The model folder, with the cohort's preprocessing and findings (``cohort.json``) beside the weights."""
        folder = self.model.save_pretrained(out_dir / "model")
        atomic_write_json(folder / COHORT_RECORD, cohort_record(self.cache.summary))
