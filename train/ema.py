"""Exponential moving average of the weights (Polyak averaging, as in YOLOv5's ModelEMA)."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


class ModelEMA:
    """Keeps ``ema = d * ema + (1 - d) * model`` with ``d`` ramping up as ``1 - exp(-n / tau)``."""

    def __init__(self, model: nn.Module, decay: float = 0.9998, tau: float = 2000.0, updates: int = 0) -> None:
        self.ema = copy.deepcopy(model).eval()
        for p in self.ema.parameters():
            p.requires_grad_(False)
        self.decay, self.tau, self.updates = decay, tau, updates
        self._averaged = {k for k, _ in model.named_parameters()} | {
            k for k in model.state_dict() if k.endswith(("running_mean", "running_var"))
        }

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
