"""The zero-shot diagnosis HTTP API and its viewer (``medvlp serve``).

The web layer needs the ``serve`` extra (FastAPI, uvicorn); its names are imported on first use, so that
``medvlp.serve.context`` (the cohort record a served model needs) imports without it.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["ServeSettings", "create_app", "load_service", "run_server"]

_WHERE = {
    "ServeSettings": "medvlp.serve.app",
    "create_app": "medvlp.serve.app",
    "load_service": "medvlp.serve.server",
    "run_server": "medvlp.serve.server",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'medvlp.serve' has no attribute {name!r}")
