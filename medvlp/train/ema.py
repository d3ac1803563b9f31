"""A moving average of a stage's weights: the model that val scores, the best step keeps and the run saves.

On a few hundred pairs the weights after any one step carry that step's batch; an exponential moving average of
them (timm's ``ModelEmaV3`` recipe: parameters and buffers alike, a decay that warms up as ``1 - (1 + n) ** -power``
after ``n`` updates and is capped at ``decay``) smooths the last steps' noise without another training step. The
average is kept by ``torch.optim.swa_utils.AveragedModel``; the loop trains the raw weights and swaps the average in
to validate and to write the stage's outputs (``stages.NAME.ema_decay``, off by default).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

#: The decay warmup's power (timm's default): after n updates the decay is at most ``1 - (1 + n) ** -POWER``,
#: so the first updates move the average most (0.80 after 10, 0.93 after 50, 0.96 after 150).
WARMUP_POWER = 2 / 3


def warmup_decay(decay: float, n: int, power: float = WARMUP_POWER) -> float:
    """The decay of the ``n``-th update (n >= 1) of an average capped at ``decay``."""
    return min(decay, 1.0 - (1.0 + n) ** -power)


class WeightAverage:
    """An exponential moving average of ``module``'s parameters and buffers, on the module's device."""

    def __init__(self, module: nn.Module, decay: float, power: float = WARMUP_POWER) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema decay must be in (0, 1), got {decay}")
        self.decay, self.power = decay, power
        self.average = AveragedModel(module, multi_avg_fn=self._lerp, use_buffers=True)

    def _lerp(self, averaged: list[torch.Tensor], current: list[torch.Tensor], n: torch.Tensor) -> None:
        """One update of a group of tensors of one dtype; integer buffers (BatchNorm's counter) take the latest."""
        if averaged[0].is_floating_point():
            torch._foreach_lerp_(averaged, current, 1.0 - warmup_decay(self.decay, int(n), self.power))
        else:
            for a, c in zip(averaged, current, strict=True):
                a.copy_(c)

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        """Fold ``module``'s weights after an optimizer step into the average (the first call copies them)."""
        self.average.update_parameters(module)

    @property
    def updates(self) -> int:
        return int(self.average.n_averaged)

    def weights(self) -> dict[str, torch.Tensor]:
        """The averaged weights under ``module``'s own state-dict keys."""
        return self.average.module.state_dict()

    @contextmanager
    def swapped_in(self, module: nn.Module) -> Iterator[None]:
        """``module`` holds the averaged weights inside the block and its own ones again after it."""
        if self.updates == 0:  # nothing averaged yet: the module's weights are the average
            yield
            return
        own = {k: v.detach().clone() for k, v in module.state_dict().items()}
        module.load_state_dict(self.weights())
        try:
            yield
        finally:
            module.load_state_dict(own)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "power": self.power, "average": self.average.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.average.load_state_dict(state["average"])
