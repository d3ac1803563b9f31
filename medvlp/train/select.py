"""Validation drives training: which evaluated step is the best so far, and when to stop.

The loop evaluates a stage on its ``val`` split every ``val_every`` steps (the numbers come from the stage's
``validate``); a :class:`BestTracker` keeps the weights of the step best on one val metric, so the run's model
folder is that step's model. Its state (best step, value, weights, evaluations without improvement) travels in
the checkpoint, so a killed run resumes with the same best-so-far.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

#: The val metrics a stage reports, and which way is better.
VAL_METRICS: dict[str, str] = {"val/zero_shot_auroc": "max", "val/r10": "max", "val/loss": "min"}
BEST_FILE = "best.json"


@dataclass
class BestTracker:
    """The best evaluated step on ``metric``; a later step must be strictly better to replace it.

    Attributes:
        metric: a key of :data:`VAL_METRICS`.
        patience: stop after this many evaluations in a row without a better value (None: never stop).
        step, value: the best step and its value (None until a finite value is seen).
        bad: evaluations since the last improvement.
        weights: the module's ``state_dict`` at the best step, on the CPU.
    """

    metric: str
    patience: int | None = None
    step: int | None = None
    value: float | None = None
    bad: int = 0
    weights: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.metric not in VAL_METRICS:
            raise ValueError(f"select metric {self.metric!r} is not one of {', '.join(VAL_METRICS)}")
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"patience must be >= 1, got {self.patience}")

    @property
    def mode(self) -> str:
        return VAL_METRICS[self.metric]

    def better(self, value: float) -> bool:
        """True when ``value`` is finite and strictly better than the best so far (a tie is not)."""
        if not math.isfinite(value):
            return False
        if self.value is None:
            return True
        return value > self.value if self.mode == "max" else value < self.value

    def update(self, step: int, metrics: dict[str, float], module: nn.Module) -> bool:
        """Record an evaluation; keep ``module``'s weights when it is the new best. Returns whether it was."""
        if self.metric not in metrics:
            raise ValueError(f"the evaluation at step {step} has no {self.metric!r} (it has {sorted(metrics)})")
        value = float(metrics[self.metric])
        if not self.better(value):
            self.bad += 1
            return False
        self.step, self.value, self.bad = step, value, 0
        self.weights = {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}
        return True

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.bad >= self.patience

    def record(self) -> dict[str, Any]:
        """What ``best.json`` and the stage's results say: metric, mode, step and value (None before any)."""
        return {"metric": self.metric, "mode": self.mode, "step": self.step, "value": self.value}

    def state_dict(self) -> dict[str, Any]:
        return {**self.record(), "bad": self.bad, "weights": self.weights}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["metric"] != self.metric:
            raise ValueError(
                f"the checkpoint selected on {state['metric']!r}, this run on {self.metric!r}; "
                "resume with the same select_metric or start a new run"
            )
        self.step, self.value, self.bad, self.weights = state["step"], state["value"], state["bad"], state["weights"]
