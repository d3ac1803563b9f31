"""The folders medvlp writes, and the one way to open each of them.

Four layouts, each written by one owner and opened here (the README has one table per layout):

- **cohort cache** (written by ``medvlp cohort build``, :func:`medvlp.data.build.build_cohort`; read by
  :class:`medvlp.data.cache.CachedCohort`): ``summary.json``, ``quarantine.csv``, ``records.parquet``,
  ``grounding.parquet``, ``images/``, ``items/``, ``secret/``. By default it lives beside the cohort YAML in
  ``.medvlp-cache/<cohort name>`` (:func:`default_cache_dir`).
- **run folder** (written by ``medvlp train``, :func:`medvlp.train.run.train`): ``config.yaml``, ``run.json``,
  ``train.log`` and one folder per stage, the aligned model in ``stage2-align/model``.
- **model folder** (written by :meth:`medvlp.models.MedVLP.save_pretrained` and stage 2): ``config.json``,
  ``model.safetensors``, ``text/``, ``cohort.json``, ``calibration.json`` (fitted on ``val`` after training),
  ``side_edit.json`` (with the side edit, :mod:`medvlp.tasks.side_edit`), ``side_check.json`` (with the side
  check, :mod:`medvlp.tasks.side_check`), ``image_refit.json`` (with the image refit, :mod:`medvlp.tasks.image_refit`).
- **card folder** (written by ``medvlp evaluate``): ``metrics.json``, ``model_card.md``, ``*.png`` and, with the
  align-only baseline, ``baselines/align-only/`` (a run folder).

Only ``medvlp cohort build``, ``medvlp train`` and ``medvlp demo`` build a cache; every other entry point
(evaluation, notebooks, the server, the benchmarks) finds one through :meth:`RunDir.find_cache`, or says which
command makes it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medvlp.config import STAGES

if TYPE_CHECKING:
    import torch

    from medvlp.config import TrainConfig
    from medvlp.data.cache import CachedCohort
    from medvlp.models import MedVLP

__all__ = [
    "CACHE_DIR",
    "CARD_METRICS",
    "DEFAULT_SECTIONS",
    "MODEL_SUBDIR",
    "RUN_CONFIG",
    "RUN_INFO",
    "RunDir",
    "default_cache_dir",
    "find_card",
    "find_model_dir",
]

CACHE_DIR = ".medvlp-cache"  # beside the cohort YAML
RUN_CONFIG = "config.yaml"  # the resolved training config of a run
RUN_INFO = "run.json"  # code version, command, cohort and cache of a run
MODEL_SUBDIR = Path("stage2-align") / "model"  # the aligned model inside a run folder
CARD_METRICS = "metrics.json"  # every number of an evaluation card
CARD_TEXT = "model_card.md"
ALIGN_ONLY_RUN = Path("baselines") / "align-only"  # inside a card folder
DEFAULT_SECTIONS = ["findings", "impression"]
_BUILD_HINT = "build it with `medvlp cohort build {cohort} --out {cache}` (`medvlp train` also builds it)"


def default_cache_dir(cohort_yaml: str | Path) -> Path:
    """Where a cohort's cache lives unless told otherwise: ``<cohort folder>/.medvlp-cache/<cohort name>``."""
    from medvlp.data.cohort import load_spec

    cohort_yaml = Path(cohort_yaml)
    return cohort_yaml.resolve().parent / CACHE_DIR / load_spec(cohort_yaml).name


def is_cache(path: Path | None) -> bool:
    """Whether ``path`` is a built cohort cache."""
    return path is not None and (Path(path) / "summary.json").is_file()


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _is_model_dir(folder: Path) -> bool:
    """Whether ``folder`` holds a medvlp model; a model of another format version raises ValueError."""
    from medvlp.models.vlm import _read_meta

    return _read_meta(folder) is not None


def find_model_dir(path: str | Path) -> Path:
    """The model folder of ``path``: the folder itself, ``stage2-align/model``, ``model``, or the ``*/model`` whose
    ``config.json`` is newest.

    Raises:
        FileNotFoundError: nothing found; the message lists the places looked at.
        ValueError: a model folder of a format this medvlp does not read.
    """
    from medvlp.models.vlm import CONFIG_FILE

    root = Path(path)
    others = sorted(
        (p for p in root.glob("*/model") if (p / CONFIG_FILE).is_file()),
        key=lambda p: (p / CONFIG_FILE).stat().st_mtime,
        reverse=True,
    )
    for folder in (root, root / MODEL_SUBDIR, root / "model", *others):
        if _is_model_dir(folder):
            return folder
    raise FileNotFoundError(
        f"no medvlp model under {root}: looked for config.json in {root}, {root / MODEL_SUBDIR}, {root / 'model'} "
        f"and {root}/*/model"
    )


def find_card(run: Path, card: Path | None = None) -> Path | None:
    """The ``metrics.json`` of a run's evaluation card.

    ``card`` (a card folder or the file itself) when given, else ``RUN/card/metrics.json``, ``RUN/metrics.json`` or
    ``RUN/../card/metrics.json`` (the demo's layout); None when there is none.

    Raises:
        FileNotFoundError: ``card`` given but not a card.
    """
    if card is not None:
        path = card / CARD_METRICS if card.is_dir() else card
        if not path.is_file():
            raise FileNotFoundError(f"no evaluation card at {card} (expected {CARD_METRICS})")
        return path
    for cand in (run / "card" / CARD_METRICS, run / CARD_METRICS, run.parent / "card" / CARD_METRICS):
        if cand.is_file():
            return cand
    return None


@dataclass(frozen=True)
class RunDir:
    """A run folder (``medvlp train --out``) or a bare model folder, opened once.

    Attributes:
        root: the folder the user named.
        model_dir: its model folder.
        run_root: the run folder holding ``config.yaml`` and ``run.json`` (None for a bare model folder).
        config: the resolved training config, when there is one.
        info: ``run.json`` (empty for a bare model folder).
    """

    root: Path
    model_dir: Path
    run_root: Path | None
    config: TrainConfig | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def open(cls, path: str | Path) -> RunDir:
        """Open a run or model folder.

        Raises:
            FileNotFoundError: no model in it.
            medvlp.config.ConfigError: its ``config.yaml`` is not a valid training config.
        """
        from medvlp.config import load_config

        root = Path(path)
        model_dir = find_model_dir(root)
        run_root = next((f for f in cls._run_candidates(root, model_dir) if (f / RUN_CONFIG).is_file()), None)
        config = load_config(run_root / RUN_CONFIG) if run_root is not None else None
        info = (_read_json(run_root / RUN_INFO) or {}) if run_root is not None else {}
        return cls(root, model_dir, run_root, config, info)

    @staticmethod
    def _run_candidates(root: Path, model_dir: Path) -> list[Path]:
        folders = [root]
        if model_dir.name == "model" and model_dir.parent.name in STAGES:
            folders.append(model_dir.parent.parent)  # RUN/<stage>/model
        return folders

    @property
    def report_sections(self) -> list[str]:
        """The report sections the text tower was trained on."""
        return list(self.config.data.report_sections) if self.config is not None else list(DEFAULT_SECTIONS)

    @property
    def cohort_yaml(self) -> Path | None:
        """The training cohort's YAML, as ``run.json`` records it."""
        return Path(self.info["cohort"]) if isinstance(self.info.get("cohort"), str) else None

    def cohort_record(self) -> dict[str, Any] | None:
        """``cohort.json`` (preprocessing, findings, modality) from the run or the model folder."""
        from medvlp.data.cache import COHORT_RECORD

        for folder in (self.root, self.model_dir):
            record = _read_json(folder / COHORT_RECORD)
            if record is not None:
                return record
        return None

    def recorded_cache(self) -> Path | None:
        """The training cohort's cache named in ``run.json``, when it is built."""
        cache = Path(self.info["cache"]) if isinstance(self.info.get("cache"), str) else None
        return cache if is_cache(cache) else None

    def find_cache(self, cohort: str | Path | None = None, cache: str | Path | None = None) -> Path:
        """The cohort cache to evaluate on; never builds one.

        Args:
            cohort: a cohort YAML; None takes the training cohort recorded in ``run.json``.
            cache: the cache folder itself.

        Raises:
            FileNotFoundError: the cache is not built (the message says which command builds it).
            ValueError: no cohort given and the run records none.
        """
        if cache is not None:
            if not is_cache(Path(cache)):
                raise FileNotFoundError(f"{cache} is not a built cohort cache (no summary.json)")
            return Path(cache)
        recorded = self.recorded_cache()
        if cohort is None:
            if recorded is None:
                raise ValueError(f"{self.root} records no built cohort cache: pass the cohort YAML (or the cache)")
            return recorded
        cohort = Path(cohort)
        if recorded is not None and self.cohort_yaml is not None and self.cohort_yaml.resolve() == cohort.resolve():
            return recorded
        path = default_cache_dir(cohort)
        if not is_cache(path):
            raise FileNotFoundError(f"no cohort cache for {cohort}: " + _BUILD_HINT.format(cohort=cohort, cache=path))
        return path

    def open_cache(self, cohort: str | Path | None = None, cache: str | Path | None = None) -> CachedCohort:
        """:meth:`find_cache`, opened."""
        from medvlp.data.cache import CachedCohort

        return CachedCohort.open(self.find_cache(cohort, cache))

    def load_model(self, map_location: str | torch.device = "cpu") -> MedVLP:
        """The model, in eval mode."""
        from medvlp.models import MedVLP

        return MedVLP.from_pretrained(self.model_dir, map_location=map_location).eval()

    def calibration(self) -> dict[str, Any] | None:
        """The model's zero-shot calibration (``calibration.json``, fitted on ``val``), or None."""
        from medvlp.tasks.calibration import load_calibration

        return load_calibration(self.model_dir)

    def side_edit(self) -> dict[str, Any] | None:
        """The side edit's fit record (``side_edit.json``: texts, strength, val accuracies), or None without one."""
        from medvlp.tasks.side_edit import SIDE_EDIT_RECORD

        return _read_json(self.model_dir / SIDE_EDIT_RECORD)

    def image_refit(self) -> dict[str, Any] | None:
        """The image refit's fit record (``image_refit.json``: kinds, ridge, val R@10 per candidate), or None."""
        from medvlp.tasks.image_refit import IMAGE_REFIT_RECORD

        return _read_json(self.model_dir / IMAGE_REFIT_RECORD)

    def side_check(self) -> dict[str, Any] | None:
        """The side check's fit record (``side_check.json``: axis, orientation, strength, val accuracies), or None."""
        from medvlp.tasks.side_check import SIDE_CHECK_RECORD

        return _read_json(self.model_dir / SIDE_CHECK_RECORD)

    def card(self, card: Path | None = None) -> Path | None:
        """The evaluation card's ``metrics.json`` (see :func:`find_card`)."""
        return find_card(self.root, card)
