"""Training data from a built cache, with batches that are a pure function of the step.

The sample indices of micro-step ``s`` depend only on (seed, s, rank, world size): the epoch's
permutation comes from ``seed + epoch``, and rank ``r`` takes its slice of each global batch. So
resuming at step ``s`` needs no iterator state, and N ranks with batch ``b`` see exactly the samples
one process with batch ``N * b`` sees. Augmentations are seeded per (seed, epoch, sample, view) for
the same reason.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, get_args

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset, Sampler

from medvlp.config import Interpolation
from medvlp.data.cache import PAIRED, CachedCohort
from medvlp.data.perturb import mirror_sides
from medvlp.data.reports import report_text


@dataclass(frozen=True)
class StepSchedule:
    """Maps a micro-step to the dataset indices of this rank's batch."""

    n: int
    batch_size: int  # per rank
    seed: int
    rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        if self.global_batch > self.n:
            raise ValueError(
                f"global batch {self.global_batch} (batch_size {self.batch_size} x {self.world_size} processes) "
                f"is larger than the {self.n} training samples; lower batch_size"
            )

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    @property
    def batches_per_epoch(self) -> int:
        return self.n // self.global_batch

    def epoch_of(self, step: int) -> int:
        return step // self.batches_per_epoch

    def indices(self, step: int) -> list[int]:
        epoch, b = divmod(step, self.batches_per_epoch)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        perm = torch.randperm(self.n, generator=g)
        start = b * self.global_batch + self.rank * self.batch_size
        return perm[start : start + self.batch_size].tolist()


class StepBatchSampler(Sampler[list[tuple[int, int]]]):
    """Batches of ``(index, epoch)`` keys for micro-steps ``start .. stop-1``, for a DataLoader's ``batch_sampler``."""

    def __init__(self, schedule: StepSchedule, start: int, stop: int) -> None:
        self.schedule, self.start, self.stop = schedule, start, stop

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for s in range(self.start, self.stop):
            epoch = self.schedule.epoch_of(s)
            yield [(i, epoch) for i in self.schedule.indices(s)]

    def __len__(self) -> int:
        return max(0, self.stop - self.start)


def sample_seed(seed: int, epoch: int, index: int, view: int = 0) -> int:
    return int(np.random.SeedSequence([seed, epoch, index, view]).generate_state(1)[0])


MASK_STREAM = 0x4D41534B  # keeps mask seeds apart from augmentation seeds
BOX_STREAM = 0x424F5845  # and the draw of a study's annotated phrase apart from both
MIRROR_STREAM = 0x4D495252  # and the draw of which samples are mirrored apart from all three


def mask_generators(seed: int, step: int, indices: torch.Tensor | list[int]) -> list[torch.Generator]:
    """One generator per sample for masking at ``step``, seeded by (seed, step, the sample's dataset index).

    The index is the sample's place in the whole training set, not in the batch, so a sample gets the same mask
    whichever rank draws it and however the global batch is split (N ranks mask exactly as one process does).
    """
    return [
        torch.Generator().manual_seed(
            int(np.random.SeedSequence([seed, step, int(i), MASK_STREAM]).generate_state(1, np.uint64)[0] >> 1)
        )
        for i in indices
    ]


INTERPOLATIONS: tuple[str, ...] = get_args(Interpolation)


def augmentation(spatial_dims: int, strong: bool = False, interpolation: Interpolation = "bilinear"):
    """MONAI augmentations for radiographs/CT in [0, 1]: small affine, intensity jitter, noise (+ more if strong).

    ``interpolation`` is the affine's resampling: ``bilinear`` (trilinear in 3D) spreads a one-voxel dot over its
    neighbours and lowers its peak by up to half per axis, so a lesion of a voxel or two is fainter in most augmented
    samples than in the un-augmented ones the model is scored on; ``nearest`` moves voxels without mixing them.
    """
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation {interpolation!r}: expected one of {', '.join(INTERPOLATIONS)}")
    from monai.transforms import (
        Compose,
        RandAdjustContrast,
        RandAffine,
        RandGaussianNoise,
        RandGaussianSmooth,
        RandScaleIntensity,
        RandShiftIntensity,
    )

    rot = (0.35 if strong else 0.1,) * (1 if spatial_dims == 2 else 3)
    steps = [
        RandAffine(
            prob=0.9 if strong else 0.5,
            rotate_range=rot,
            scale_range=(0.2 if strong else 0.08,) * spatial_dims,
            translate_range=(0.08,) * spatial_dims,
            padding_mode="zeros",
            mode=interpolation,
        ),
        RandScaleIntensity(factors=0.15 if strong else 0.05, prob=0.5),
        RandShiftIntensity(offsets=0.1 if strong else 0.03, prob=0.5),
        RandGaussianNoise(prob=0.5, std=0.03 if strong else 0.01),
    ]
    if strong:
        steps += [RandAdjustContrast(prob=0.5, gamma=(0.7, 1.5)), RandGaussianSmooth(prob=0.3)]
    return Compose(steps)


def left_right_axis(cache: CachedCohort) -> int:
    """The spatial axis of the cached arrays that runs across the patient's left and right, for mirroring.

    Radiographs: the columns (axis 0), as a frontal view is stored. Volumes: the axis whose code in the cache's
    ``preprocess.orientation`` is L or R; a cache kept in its stored orientation (None) has no known one. A cohort
    whose finding names carry a side (``left_effusion``) is refused too: its labels would not follow the mirror.
    """
    sided = [f for f in cache.findings if mirror_sides(words := re.sub(r"[\W_]+", " ", f)) != words]
    if sided:
        raise ValueError(f"mirror: the findings {sided} name a side, and their labels would not follow the mirror")
    if cache.spatial_dims == 2:
        return 0
    orientation = (cache.summary.get("preprocess") or {}).get("orientation")
    codes = [c in "LR" for c in str(orientation or "").upper()]
    if len(codes) != 3 or sum(codes) != 1:
        raise ValueError(
            f"mirror: the cache's preprocess orientation {orientation!r} names no left-right axis; build it with an "
            "orientation such as RAS"
        )
    return codes.index(True)


class CachedImages(Dataset):
    """Images (and reports, labels) of one split of a built cache.

    Args:
        cache: the built cohort.
        split: train, val or test.
        sections: report sections for the text, see :func:`medvlp.data.reports.report_text`.
        views: how many augmented views per image (2 for SimCLR); 0 returns the image un-augmented.
        strong: use the strong augmentation set (self-supervised stages).
        seed: the run's seed.
        need: what each study must hold, see :meth:`CachedCohort.split`: the pairs by default (stage 2 and every
            evaluation), ``("image",)`` for every image including the image-only studies (stage1-image).
        boxes: also give each study one of its annotated phrases (the cache's grounding boxes of this split, drawn
            seeded by seed, epoch and study) as ``box_phrase`` and the union of its boxes as ``box_mask`` on the image
            grid, moved by the same augmentation as the image; a study without one has ``box_phrase`` None.
        mirror: the probability (seeded by seed, epoch and study) that an augmented sample is mirrored across the
            patient's left-right axis (:func:`left_right_axis`), with every "left" and "right" of its report and
            phrase swapped (:func:`medvlp.data.perturb.mirror_sides`), so the pair stays true: a left effusion seen
            on the other side is written as a right one.
        interpolation: the augmentation's affine resampling (:func:`augmentation`).
    """

    def __init__(
        self,
        cache: CachedCohort,
        split: str = "train",
        sections: list[str] | None = None,
        views: int = 1,
        strong: bool = False,
        seed: int = 0,
        need: tuple[str, ...] = PAIRED,
        boxes: bool = False,
        mirror: float = 0.0,
        interpolation: Interpolation = "bilinear",
    ) -> None:
        if not 0.0 <= mirror <= 1.0 or (mirror and views != 1):
            raise ValueError(f"mirror {mirror} must be a probability, for one augmented view (views=1, not {views})")
        self.mirror = mirror
        self._mirror_axis = left_right_axis(cache) if mirror else 0
        self.cache = cache
        self.records: pd.DataFrame = cache.split(split, need)
        if self.records.empty:
            raise ValueError(f"the cache at {cache.root} has no studies with {' and '.join(need)} in split {split!r}")
        self.sections = sections or ["findings", "impression"]
        self.views, self.seed = views, seed
        self.findings = cache.findings
        self._aug = augmentation(cache.spatial_dims, strong, interpolation) if views > 0 else None
        labels = self.records[self.findings].astype("float32").to_numpy() if self.findings else np.zeros((len(self), 0))
        self.labels = torch.from_numpy(np.nan_to_num(labels, nan=-2.0))  # -2 unknown, -1 uncertain
        self.phrases: dict[str, list[tuple[str, list]]] | None = None
        if boxes and views > 1:
            raise ValueError("boxes ride along one augmented view; views > 1 (SimCLR) takes none")
        if boxes:
            from medvlp.tasks.grounding import grounding_pairs

            self.phrases = {}
            for row in grounding_pairs(cache, split).itertuples(index=False):
                self.phrases.setdefault(row.study, []).append((row.phrase, row.boxes))

    def __len__(self) -> int:
        return len(self.records)

    def image(self, i: int) -> torch.Tensor:
        return torch.from_numpy(np.asarray(self.cache.load_image(self.records.at[i, "study"]), dtype=np.float32))

    def text(self, i: int) -> str:
        """The report text the text tower sees; ``""`` for an image-only study."""
        report = self.records.at[i, "report"]
        return report_text(report, self.sections) if report else ""

    def _phrase(self, i: int, epoch: int, size: tuple[int, ...]) -> tuple[str | None, torch.Tensor | None]:
        """One annotated phrase of study ``i`` and the mask of its boxes (None, None when it has none)."""
        from medvlp.tasks.grounding import box_mask

        found = (self.phrases or {}).get(self.records.at[i, "study"])
        if not found:
            return None, None
        rng = np.random.default_rng(sample_seed(self.seed, epoch, i, BOX_STREAM))
        phrase, boxes = found[int(rng.integers(len(found)))]
        return phrase, torch.from_numpy(box_mask(boxes, size)).float()[None]

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        i, epoch = key if isinstance(key, tuple) else (key, 0)
        x = self.image(i)
        out: dict[str, Any] = {"index": i, "epoch": epoch, "text": self.text(i), "labels": self.labels[i]}
        mask = None
        if self.phrases is not None:
            out["box_phrase"], mask = self._phrase(i, epoch, tuple(x.shape[1:]))
            if mask is None:
                mask = torch.zeros_like(x[:1])
            x = torch.cat([x, mask])  # the boxes ride along as a last channel, moved by the same affine
        if self.mirror and self._mirrored(i, epoch):
            x = x.flip(1 + self._mirror_axis)  # the patient's left-right axis, mask channel included
            out["text"] = mirror_sides(out["text"])
            if out.get("box_phrase"):
                out["box_phrase"] = mirror_sides(out["box_phrase"])
        if self._aug is None:
            out["image"] = x
            return self._split_mask(out, x.shape[0] - 1) if mask is not None else out
        views = []
        for v in range(self.views):
            self._aug.set_random_state(seed=sample_seed(self.seed, epoch, i, v) % 2**32)
            views.append(torch.as_tensor(self._aug(x)).float().clamp_(0, 1))
        out["image"] = views[0]
        if mask is not None:
            return self._split_mask(out, x.shape[0] - 1)
        if self.views > 1:
            out["views"] = views
        return out

    def _mirrored(self, i: int, epoch: int) -> bool:
        """Whether study ``i`` is mirrored in ``epoch`` (seeded by seed, epoch and study, apart from the affine)."""
        return bool(np.random.default_rng(sample_seed(self.seed, epoch, i, MIRROR_STREAM)).random() < self.mirror)

    @staticmethod
    def _split_mask(out: dict[str, Any], channels: int) -> dict[str, Any]:
        """The box channel back out of the image: a voxel is in the boxes when over half of it moved there."""
        out["box_mask"] = out["image"][channels] > 0.5
        out["image"] = out["image"][:channels]
        return out


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    batch: dict[str, Any] = {
        "index": torch.tensor([it["index"] for it in items]),
        "epoch": torch.tensor([it.get("epoch", 0) for it in items]),
        "text": [it["text"] for it in items],
        "labels": torch.stack([it["labels"] for it in items]),
        "image": torch.stack([it["image"] for it in items]),
    }
    if "box_mask" in items[0]:  # the studies with an annotated phrase, their phrases and box masks
        rows = [k for k, it in enumerate(items) if it["box_phrase"] is not None]
        batch["box_rows"] = torch.tensor(rows, dtype=torch.long)
        batch["box_phrases"] = [items[k]["box_phrase"] for k in rows]
        batch["box_masks"] = torch.stack([items[k]["box_mask"] for k in rows]) if rows else None
    if "views" in items[0]:
        batch["views"] = [torch.stack([it["views"][v] for it in items]) for v in range(len(items[0]["views"]))]
    return batch
