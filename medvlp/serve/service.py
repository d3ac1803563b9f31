"""The model side of the server: loaded once, used from one thread, fed batches by :mod:`medvlp.serve.batching`.

Prompt embeddings are computed once per finding name and kept (the model's own findings at start, free-text
findings on first use, in a bounded LRU). The retrieval corpus, the training split of the cohort cache, is embedded
once at start: its reports (for "similar reports") and its images (for text -> study search).
"""

from __future__ import annotations

import itertools
import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from medvlp.data.image import MedicalImage
from medvlp.data.preprocess import preprocess_image
from medvlp.hospital.peaks import grounding_peaks
from medvlp.models.side_check import checked_sides
from medvlp.models.vlm import FORMAT, ImageEmbeddings, MedVLP
from medvlp.serve.context import ServingContext
from medvlp.serve.errors import ApiError
from medvlp.serve.uploads import UploadLimits, check_upload_size, probe_upload, read_upload
from medvlp.tasks import zeroshot
from medvlp.tasks.calibration import apply_calibration
from medvlp.tasks.grounding import similarity_map
from medvlp.tasks.prompt_forms import mined_prompts, mined_report_prototypes, prompt_form
from medvlp.tasks.retrieval import EmbeddingIndex
from medvlp.viz.orient import planes
from medvlp.viz.png import heatmap_png, image_png

logger = logging.getLogger(__name__)

__all__ = ["Corpus", "DiagnosisService", "ImageJob", "PreparedImage", "TextJob"]

# technical facts about an uploaded image that may be answered; nothing else from a header ever is
SAFE_META = ("modality", "photometric_interpretation", "n_files")
MIN_SIDE = 8  # pixels along each in-plane axis; a 1 x 1 "image" decodes but there is nothing to diagnose


@dataclass
class PreparedImage:
    """An image ready for the model: preprocessed to the model's size, plus the few facts an answer reports.

    The full-size decoded image is not kept: a request waits in the batch queue holding this alone.
    """

    pre: Any  # the preprocessing output: ``array`` [1, *size], ``affine``
    info: dict[str, Any]  # spatial_dims, shape, spacing and the safe technical meta of the source image
    warnings: list[str]


@dataclass
class ImageJob:
    """One image request. ``findings`` None means the model's own; ``embed_only`` answers the embedding alone;
    ``texts`` answers their pair scores with the image instead of findings (:meth:`DiagnosisService.pair_scores`).
    ``prepared`` is filled by :meth:`DiagnosisService.prepare` before the job joins the batch queue."""

    path: Path
    workdir: Path
    findings: list[str] | None = None
    heatmaps: bool = False
    top_k: int = 0
    embed_only: bool = False
    prepared: PreparedImage | None = None
    peaks: bool = False  # add each finding's grounding peak in stored-image voxels ("peak"; for a DICOM SR)
    texts: list[str] | None = None


@dataclass
class TextJob:
    """Texts to embed; with ``k`` > 0, the first text is searched in the corpus (``against`` images or reports)."""

    texts: list[str]
    k: int = 0
    against: str = "images"


@dataclass
class Corpus:
    """The training split's pseudonymous study ids, reports and their two indexes."""

    studies: list[str]
    reports: list[str]
    report_index: EmbeddingIndex
    image_index: EmbeddingIndex

    def hits(self, query: Tensor, k: int, against: str) -> list[dict[str, Any]]:
        index = self.image_index if against == "images" else self.report_index
        scores, ids = index.search(query.reshape(1, -1).numpy(), k)
        return [
            {"study": self.studies[int(i)], "report": self.reports[int(i)], "score": round(float(s), 6)}
            for s, i in zip(scores[0], ids[0], strict=True)
        ]


class DiagnosisService:
    """Zero-shot diagnosis, grounding, embedding and retrieval with one model; not thread-safe by design.

    Args:
        model: the loaded model, in eval mode, on its device.
        context: the training cohort's record (preprocessing, findings, corpus, card).
        prompt_cache_size: most finding names whose prompt embeddings are kept.
    """

    def __init__(self, model: MedVLP, context: ServingContext, prompt_cache_size: int = 4096) -> None:
        self.model = model.eval()
        self.context = context
        self.spec = context.preprocess
        self.spatial_dims = int(model.config.spatial_dims)
        self.size = tuple(int(s) for s in model.config.image_size)
        if tuple(self.spec.size) != self.size:
            raise ValueError(
                f"the training preprocessing gives {list(self.spec.size)} images but the model reads {list(self.size)}"
            )
        self.logit_scale = zeroshot.model_logit_scale(model)
        self.prompt_form = prompt_form(context.calibration)  # chosen on val with the calibration
        self.mined_prompts = mined_prompts(context.calibration)  # the mined form's sentences, when it has them
        self.report_prototypes = mined_report_prototypes(context.calibration)  # the mined_reports form's vectors
        self._prompts: OrderedDict[str, Tensor] = OrderedDict()
        self._prompt_cache_size = int(prompt_cache_size)
        self.prompt_computations = 0  # finding names whose prompts were embedded (tests read it)
        self.corpus: Corpus | None = None
        if context.findings:
            self.prompt_embeddings(context.findings)

    @property
    def findings(self) -> list[str]:
        return list(self.context.findings)

    @property
    def side_check(self) -> bool:
        """Whether the model's pair scores carry a fitted side check (:mod:`medvlp.models.side_check`)."""
        check = self.model.side_check
        return check is not None and float(check.strength) > 0.0

    def prompt_cache_info(self) -> dict[str, int]:
        """Finding names held in the prompt cache and how many were ever embedded."""
        return {"size": len(self._prompts), "computed": self.prompt_computations}

    def describe(self) -> dict[str, Any]:
        """The model card summary, the cohort record and the model's configuration, without paths or identifiers."""
        from medvlp.card import summary

        cfg = self.model.config.model_copy(update={"text_encoder": "text", "image_checkpoint": None})
        metrics = None
        if self.context.metrics_path is not None:
            try:
                metrics = summary(self.context.metrics_path)
            except (OSError, ValueError, KeyError, TypeError):
                logger.warning("the evaluation card's metrics.json cannot be read; answering without metrics")
        return {
            "model": {
                "format": FORMAT,
                "config": cfg.model_dump(mode="json"),
                "source": self.model.source_info,
                "parameters": sum(p.numel() for p in self.model.parameters()),
            },
            "cohort": dict(self.context.cohort),
            "findings": self.findings,
            "metrics": metrics,
            "calibration": None
            if not self.context.calibration
            else {
                "fitted_on": self.context.calibration.get("fitted_on", "val"),
                "findings": sorted(self.context.calibration["findings"]),
                "prompt_form": prompt_form(self.context.calibration),
            },
            "side_check": self.side_check,
            "retrieval": {
                "available": self.corpus is not None,
                "studies": len(self.corpus.studies) if self.corpus else 0,
            },
        }

    # --------------------------------------------------------------------------------------------------- text
    @torch.inference_mode()
    def prompt_embeddings(self, findings: list[str]) -> Tensor:
        """``[F, 2, E]`` positive/negative prompt embeddings, from the cache or computed once."""
        missing = [f for f in dict.fromkeys(findings) if f not in self._prompts]
        if missing:
            emb = zeroshot.build_prompt_embeddings(  # [M, 2, E], in the form chosen on val, the model's context
                self.model,
                missing,
                *self.context.prompts,
                form=self.prompt_form,
                context=self.findings,
                mined=self.mined_prompts,
                prototypes=self.report_prototypes,
            )
            self.prompt_computations += len(missing)
            for f, e in zip(missing, emb, strict=True):
                self._prompts[f] = e
        out = []
        for f in findings:
            self._prompts.move_to_end(f)
            out.append(self._prompts[f])
        while len(self._prompts) > self._prompt_cache_size:
            self._prompts.popitem(last=False)
        return torch.stack(out)

    @torch.inference_mode()
    def run_texts(self, jobs: list[TextJob]) -> list[dict[str, Any] | BaseException]:
        """Embed every job's texts in one text-tower call; search the corpus for retrieval jobs."""
        flat = [t for job in jobs for t in job.texts]
        emb = self.model.encode_text(flat).float().cpu()  # [T, E]
        out: list[dict[str, Any] | BaseException] = []
        start = 0
        for job in jobs:
            part = emb[start : start + len(job.texts)]
            start += len(job.texts)
            if job.k > 0:
                if self.corpus is None:
                    out.append(ApiError(409, "retrieval_unavailable", "this server has no report corpus"))
                else:
                    out.append({"results": self.corpus.hits(part[0], job.k, job.against)})
            else:
                out.append({"embeddings": part.tolist(), "dim": int(part.shape[1])})
        return out

    # -------------------------------------------------------------------------------------------------- images
    def _wrong_dims(self, dims: int, shape: tuple[int, ...]) -> ApiError:
        return ApiError(
            422,
            "wrong_dimensionality",
            f"this model reads {self.spatial_dims}D images; the upload is a {dims}D image of shape {list(shape)}"
            + (" (send one radiograph, not a series or a multi-frame file)" if self.spatial_dims == 2 else ""),
        )

    def _too_small(self, shape: tuple[int, ...]) -> ApiError:
        return ApiError(
            422,
            "unreadable_image",
            f"the image is {' x '.join(map(str, shape))} pixels: too small to diagnose (at least {MIN_SIDE} a side)",
        )

    def prepare(self, job: ImageJob, limits: UploadLimits | None = None) -> PreparedImage:
        """Check, decode and preprocess one upload to the model's size (thread-safe: no model call).

        The headers are read first: an image of the wrong dimensionality, too small, or whose decoded size is over
        ``limits.max_decoded`` is refused before any pixel is decoded.

        Raises:
            ApiError: 413 ``image_too_large``; 422 ``wrong_dimensionality``, ``unreadable_image``...
        """
        limits = limits or UploadLimits()
        probe = probe_upload(job.path, job.workdir, limits)
        if probe is not None:
            shape = probe.shape
            if len(shape) == 3 and self.spatial_dims == 2 and shape[2] == 1:
                shape = shape[:2]
            if len(shape) != self.spatial_dims:
                raise self._wrong_dims(len(shape), probe.shape)
            if min(shape[:2]) < MIN_SIDE:
                raise self._too_small(probe.shape)
        check_upload_size(probe, job.workdir, limits)
        image = read_upload(job.path, job.workdir, limits.max_decoded)
        warnings: list[str] = []
        if image.spatial_dims == 3 and self.spatial_dims == 2 and image.array.shape[2] == 1:
            image = MedicalImage(image.array[:, :, 0], image.spacing[:2], image.affine, image.meta)
        if image.spatial_dims != self.spatial_dims:
            raise self._wrong_dims(image.spatial_dims, image.array.shape)
        if min(image.array.shape[:2]) < MIN_SIDE:
            raise self._too_small(image.array.shape)
        try:
            pre = preprocess_image(image, self.spec)
        except (ValueError, RuntimeError) as exc:
            raise ApiError(422, "unreadable_image", f"the image cannot be preprocessed ({type(exc).__name__})") from exc
        if not np.isfinite(pre.array).all():
            raise ApiError(422, "unreadable_image", "the image has no finite pixel values after preprocessing")
        want = self.context.cohort.get("modality")
        got = image.meta.get("modality")
        if want and got and str(got) != str(want):
            warnings.append(f"the model was trained on {want} images; this is a {got} image")
        info = {
            "spatial_dims": image.spatial_dims,
            "shape": [int(s) for s in image.array.shape],
            "spacing": [round(float(s), 6) for s in image.spacing],
            **{k: image.meta[k] for k in SAFE_META if isinstance(image.meta.get(k), str | int)},
        }
        return PreparedImage(pre, info, warnings)

    def check_job(self, job: ImageJob) -> None:
        """Refuse a request the model cannot answer whatever its image (before anything is decoded).

        Raises:
            ApiError: 422 no findings to score, 409 no corpus for ``top_k``.
        """
        if not job.embed_only and job.texts is None and job.findings is None and not self.findings:
            raise ApiError(422, "validation_error", "this model has no findings of its own: name some")
        if job.top_k and self.corpus is None:
            raise ApiError(409, "retrieval_unavailable", "this server has no report corpus for top_k")

    @torch.inference_mode()
    def run_images(self, jobs: list[ImageJob]) -> list[dict[str, Any] | BaseException]:
        """Encode a batch of prepared images in one forward pass (a job not yet prepared is prepared here first);
        a bad item fails alone."""
        results: list[dict[str, Any] | BaseException | None] = [None] * len(jobs)
        ready: list[tuple[int, PreparedImage]] = []
        for i, job in enumerate(jobs):
            try:
                self.check_job(job)
                ready.append((i, job.prepared if job.prepared is not None else self.prepare(job)))
            except ApiError as exc:
                results[i] = exc
            except Exception as exc:  # a decoder failing in a way the reader does not foresee: this upload alone
                logger.warning("upload could not be decoded: %s", type(exc).__name__)
                results[i] = ApiError(422, "unreadable_image", f"the image cannot be decoded ({type(exc).__name__})")
        if ready:
            x = torch.stack([torch.from_numpy(p.pre.array.astype(np.float32)) for _, p in ready])  # [B, 1, *S]
            out = self.model.forward_image(x.to(self.model.device))
            emb, tokens = out.embedding.float().cpu(), out.tokens.float().cpu()  # [B, E], [B, N, E]
            scoring = [(j, i) for j, (i, _) in enumerate(ready) if jobs[i].texts is not None]
            if scoring:  # every scoring job's sentences in one text pass
                batch = [jobs[i].texts or [] for _, i in scoring]
                scored = self.pair_scores(
                    emb[[j for j, _ in scoring]], tokens[[j for j, _ in scoring]], out.grid, batch
                )
                for (j, i), scores in zip(scoring, scored, strict=True):
                    prep = ready[j][1]
                    results[i] = {"scores": scores, "image": dict(prep.info), "warnings": prep.warnings}
            for j, (i, prep) in enumerate(ready):
                job = jobs[i]
                if job.embed_only:
                    results[i] = {"embeddings": [emb[j].tolist()], "dim": int(emb.shape[1])}
                elif job.texts is None:
                    results[i] = self._answer(job, prep, emb[j], tokens[j], out.grid)
        assert all(r is not None for r in results)
        return results  # type: ignore[return-value]

    @torch.inference_mode()
    def pair_scores(self, emb: Tensor, tokens: Tensor, grid: Any, texts: list[list[str]]) -> list[list[dict[str, Any]]]:
        """Per image (unit embeddings ``[M, E]``, tokens ``[M, N, E]``), each of its texts' score: the score the
        robustness suite ranks by (:meth:`MedVLP.score_pairs`), its cosine and its side check term, and whether the
        check read the text (one affirmative sentence naming one side, with a fitted check). All the images' texts go
        through the text tower together."""
        rows = torch.tensor([m for m, group in enumerate(texts) for _ in group], dtype=torch.long)
        flat = [t for group in texts for t in group]
        device = self.model.device
        image = ImageEmbeddings(emb[rows].to(device), tokens[rows].to(device), tuple(int(g) for g in grid))
        cosine, term = (t.float().cpu() for t in self.model.pair_score_parts(image, flat))
        checked = (checked_sides(flat) != 0).tolist() if self.side_check else [False] * len(flat)
        answers = [
            {
                "text": t,
                "score": round(float(c + s), 6),
                "cosine": round(float(c), 6),
                "side_check": round(float(s), 6),
                "checked": bool(k),
            }
            for t, c, s, k in zip(flat, cosine, term, checked, strict=True)
        ]
        bounds = np.cumsum([0, *(len(group) for group in texts)])
        return [answers[a:b] for a, b in itertools.pairwise(bounds)]

    def _answer(self, job: ImageJob, prep: PreparedImage, emb: Tensor, tokens: Tensor, grid: Any) -> dict[str, Any]:
        findings = job.findings if job.findings is not None else self.findings
        prompts = self.prompt_embeddings(findings)  # [F, 2, E]
        raw = zeroshot.zero_shot_probabilities(emb[None], prompts, self.logit_scale)  # [1, F]
        probs, calibrated = apply_calibration(raw, findings, self.context.calibration)
        predictions: list[dict[str, Any]] = [
            {"finding": f, "probability": round(float(p), 6), "calibrated": c}
            for f, p, c in zip(findings, probs[0], calibrated, strict=True)
        ]
        pre = prep.pre
        if job.peaks:
            points = grounding_peaks(tokens, grid, prompts[:, 0], self.size, pre.source_to_output)
            for pred, point in zip(predictions, points, strict=True):
                pred["peak"] = point
        answer: dict[str, Any] = {"predictions": predictions, "image": dict(prep.info), "warnings": prep.warnings}
        if job.heatmaps:
            volume = pre.array[0].astype(np.float32)  # [*size]
            n = len(findings)
            maps = similarity_map(tokens.expand(n, *tokens.shape), grid, prompts[:, 0], self.size)  # [F, *size]
            answer["image_png"] = image_png(planes(volume, affine=pre.affine, views=("axial",))[0].image)
            for pred, m in zip(predictions, maps.numpy(), strict=True):
                plane = planes(volume, m, affine=pre.affine, views=("axial",))[0]  # through the map's peak
                pred["heatmap_png"] = heatmap_png(plane.overlay)
                if plane.index is not None:
                    pred["slice"] = plane.index
                    pred["slice_png"] = image_png(plane.image)
        if job.top_k:
            assert self.corpus is not None
            answer["similar_reports"] = self.corpus.hits(emb, job.top_k, "reports")
        return answer

    # -------------------------------------------------------------------------------------------------- corpus
    @torch.inference_mode()
    def build_corpus(self, cache_dir: Path, batch_size: int = 32) -> Corpus | None:
        """Embed the training split of a cohort cache (reports and images) into two exact indexes."""
        from medvlp.data.cache import CachedCohort
        from medvlp.tasks.embed import embed_split

        cache = CachedCohort.open(cache_dir)
        if cache.spatial_dims != self.spatial_dims or tuple(cache.summary["preprocess"]["size"]) != self.size:
            logger.warning("the cache at %s does not match the model's input; no retrieval corpus", cache_dir)
            return None
        if cache.split("train").empty:
            logger.warning("the cache at %s has no training split; no retrieval corpus", cache_dir)
            return None
        emb = embed_split(self.model, cache, "train", self.context.report_sections, batch_size)
        dim = int(self.model.config.embed_dim)
        report_index, image_index = EmbeddingIndex(dim), EmbeddingIndex(dim)
        report_index.add(emb.text, range(len(emb.text)))
        image_index.add(emb.image, range(len(emb.image)))
        studies, reports = list(emb.records["study"]), [str(r) for r in emb.records["report"]]
        self.corpus = Corpus(studies, reports, report_index, image_index)
        logger.info("retrieval corpus: %d training studies", len(studies))
        return self.corpus
