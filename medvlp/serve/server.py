"""Load a model once and serve it with uvicorn (what ``medvlp serve`` runs)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from medvlp.artifacts import RunDir
from medvlp.serve.app import ServeSettings, create_app
from medvlp.serve.context import resolve_context
from medvlp.serve.service import DiagnosisService

logger = logging.getLogger(__name__)

__all__ = ["load_service", "run_server"]


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_service(
    model: Path,
    *,
    cohort_yaml: Path | None = None,
    cache_dir: Path | None = None,
    card: Path | None = None,
    device: str = "auto",
    corpus: bool = True,
) -> DiagnosisService:
    """Load the model of a run (or model) folder with its training context, and embed the retrieval corpus.

    Raises:
        FileNotFoundError: no model, or a ``card``/``cache_dir`` that is not there.
        ValueError: no record of the training preprocessing, or one that does not fit the model.
    """
    t0 = time.perf_counter()
    run = RunDir.open(model)
    context = resolve_context(run, cohort_yaml=cohort_yaml, cache_dir=cache_dir, card=card)
    vlm = run.load_model(map_location=_device(device))
    service = DiagnosisService(vlm, context)
    if corpus and context.cache_dir is not None:
        service.build_corpus(context.cache_dir)
    logger.info(
        "model ready in %.1f s: %dD, input %s, %d findings, corpus %s",
        time.perf_counter() - t0,
        service.spatial_dims,
        list(service.size),
        len(service.findings),
        "yes" if service.corpus else "no",
    )
    return service


def run_server(service: DiagnosisService, settings: ServeSettings, host: str, port: int) -> None:
    """Serve until interrupted; one process, one model (micro-batching does the rest)."""
    import uvicorn

    app = create_app(service, settings)
    uvicorn.run(app, host=host, port=port, log_config=None, access_log=False, server_header=False, workers=1)
