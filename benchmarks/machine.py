"""What a benchmark ran on, for the ``machine`` entry of its JSON.

The same seed gives the same figures on the same kind of CPU only: float kernels differ between CPU families (AVX2
against AVX-512, for one), so a trained model's figures can move by about 0.01-0.02 AUROC from one machine to
another. The CPU model is recorded so a reader can tell two such runs apart.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), or what :mod:`platform` knows elsewhere."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(**extra: Any) -> dict[str, Any]:
    """``{"cpus", "platform", "cpu", **extra}``: the keys every benchmark wrote before, and the CPU model beside."""
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "cpu": cpu_model(), **extra}
