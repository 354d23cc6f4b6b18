"""Exponential moving average of the weights (Polyak averaging, as in YOLOv5's ModelEMA), with an
averaging window that fits the run.

The average ``ema = d * ema + (1 - d) * model`` remembers about ``1 / (1 - d)`` steps. YOLOv5's
decay of 0.9999 (a 10,000-step window) suits runs of hundreds of thousands of steps; a run of a
few hundred images lasts a few hundred steps, and there such a window stops following the weights
early on, so the saved model is the network of the run's first third. :meth:`ModelEMA.for_run`
sets the window to a fixed fraction of the run's steps instead (docs/DESIGN.md, "The dense recipe").
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

#: The EMA window as a fraction of the run's optimiser steps (benchmarks/ema_window.py).
EMA_WINDOW_FRACTION = 0.05
#: The longest window any run gets, YOLOv5's (decay 0.9999).
EMA_MAX_DECAY = 0.9999


class ModelEMA:
    """Keeps ``ema = d * ema + (1 - d) * model`` with ``d`` ramping up as ``decay * (1 - exp(-n / tau))``."""

    def __init__(self, model: nn.Module, decay: float = EMA_MAX_DECAY, tau: float = 2000.0, updates: int = 0,
                 fraction: float = float("nan")) -> None:
        self.ema = copy.deepcopy(model).eval()
        for p in self.ema.parameters():
            p.requires_grad_(False)
        self.decay, self.tau, self.updates, self.fraction = decay, tau, updates, fraction
        self._averaged = {k for k, _ in model.named_parameters()} | {
            k for k in model.state_dict() if k.endswith(("running_mean", "running_var"))
        }

    @classmethod
    def for_run(cls, model: nn.Module, total_steps: int, fraction: float = EMA_WINDOW_FRACTION) -> ModelEMA:
        """An EMA whose window is ``fraction`` of a run of ``total_steps`` optimiser steps (at least
        10 steps, at most YOLOv5's 10,000), reached after a ramp of about one window."""
        window = min(1.0 / (1.0 - EMA_MAX_DECAY), max(10.0, fraction * total_steps))
        return cls(model, decay=1.0 - 1.0 / window, tau=window, fraction=fraction)

    @property
    def window(self) -> float:
        """Steps the average remembers at full decay, ``1 / (1 - decay)``."""
        return 1.0 / (1.0 - self.decay)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = self.decay * (1 - math.exp(-self.updates / self.tau))
        msd = model.state_dict()
        for k, v in self.ema.state_dict().items():
            # Weights and BatchNorm statistics are averaged; every other buffer (gate
            # thresholds, counters) is a setting, copied as it is.
            if v.dtype.is_floating_point and (k in self._averaged):
                v.mul_(d).add_(msd[k].detach(), alpha=1 - d)
            else:
                v.copy_(msd[k])

    @torch.no_grad()
    def restart(self, model: nn.Module) -> None:
        """Start averaging again from ``model``'s weights (after its structure changed).

        An average over steps in which different filters were alive is no network at all:
        EFFP's pruning steps restart it so that it only ever averages one sub-network.
        """
        self.ema.load_state_dict(model.state_dict())
        self.updates = 0
