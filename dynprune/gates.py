"""Channel gates: a saliency per hidden channel, predicted from the frame itself.

ManiDP (Tang et al., "Manifold Regularized Dynamic Network Pruning", CVPR 2021, Sec. 3.1;
official code huawei-noah/Efficient-Computing, Pruning/ManiDP): the gate is
``AvgPool -> Linear(C_in, C_out/s, no bias) -> ReLU -> Linear(C_out/s, C_out, bias=1) -> ReLU``
and the mask is ``saliency * [saliency >= threshold]``.

FBS (Gao et al., "Dynamic Channel Pruning: Feature Boosting and Suppression", ICLR 2019,
Sec. 3.2): the same saliency, kept by a k-winners-take-all per frame instead of a threshold.
"""

from __future__ import annotations

import math
from typing import Tuple

import torch
from torch import nn

#: Gate modes. ``open`` keeps every channel with mask 1 (the dense model, exactly);
#: ``threshold`` is ManiDP; ``topk`` is FBS.
MODES = ("open", "threshold", "topk")

#: Channels per gate decision when gates are trained (``dynprune gate --group``). Whole groups of
#: 8 let the GPU kernels read kept channels as 16-byte vectors (docs/DESIGN.md, "The GPU path"),
#: run as fast on the CPU, and hold AP as well as single channels.
DEFAULT_GATE_GROUP = 8


class Gate(nn.Module):
    """Predicts a non-negative saliency for each of ``channels`` hidden channels.

    With ``group > 1`` one saliency is predicted per group of ``group`` consecutive
    channels, so the kept widths stay multiples of the GPU tile size.
    """

    def __init__(self, c_in: int, channels: int, reduction: int = 2, group: int = 1) -> None:
        super().__init__()
        if group < 1:
            raise ValueError(f"gate group size must be >= 1, got {group}")
        self.channels = channels
        self.group = group
        self.groups = math.ceil(channels / group)
        hidden = max(self.groups // reduction, 8)
        self.fc1 = nn.Linear(c_in, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, self.groups)
        nn.init.constant_(self.fc2.bias, 1.0)  # ManiDP: every gate starts open at saliency ~1
        nn.init.normal_(self.fc2.weight, std=0.01)
        self.register_buffer("threshold", torch.zeros(()))
        self.mode = "open"
        self.keep_ratio = 1.0  # for mode "topk"

    def group_saliency(self, pooled: torch.Tensor) -> torch.Tensor:
        """Saliency per group, shape ``(B, groups)``."""
        return torch.relu(self.fc2(torch.relu(self.fc1(pooled))))

    def group_keep(self, saliency: torch.Tensor) -> torch.Tensor:
        """Boolean keep decision per group for the current mode, shape ``(B, groups)``."""
        if self.mode == "threshold":
            # ">= threshold" with a strictly positive floor: a saliency of exactly 0
            # (ReLU'd) contributes nothing and is never worth computing.
            return (saliency >= self.threshold) & (saliency > 0)
        if self.mode == "topk":
            k = max(1, math.ceil(self.keep_ratio * self.groups))
            kth = torch.topk(saliency, k, dim=1).values[:, -1:]
            return (saliency >= kth) & (saliency > 0)
        return torch.ones_like(saliency, dtype=torch.bool)

    def expand(self, per_group: torch.Tensor) -> torch.Tensor:
        """Per-group values -> per-channel values, shape ``(B, channels)``."""
        if self.group == 1:
            return per_group
        return per_group.repeat_interleave(self.group, dim=1)[:, : self.channels]

    def forward(self, pooled: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Return ``(saliency, mask)`` per channel; ``mask`` is what multiplies the activations."""
        saliency = self.group_saliency(pooled)
        if self.mode == "open":
            mask = torch.ones_like(saliency)
        else:
            mask = saliency * self.group_keep(saliency).to(saliency.dtype)
        return self.expand(saliency), self.expand(mask)


def set_gate_mode(model: nn.Module, mode: str, keep_ratio: float = 1.0) -> None:
    """Set every gate of ``model`` to ``mode`` (one of :data:`MODES`)."""
    if mode not in MODES:
        raise ValueError(f"unknown gate mode {mode!r}; choose one of {MODES}")
    for m in model.modules():
        if isinstance(m, Gate):
            m.mode = mode
            m.keep_ratio = keep_ratio


@torch.no_grad()
def init_from_importance(gate: Gate, importance: torch.Tensor, scale: float = 0.02) -> None:
    """Start the gate's saliency at ``1 + scale * z`` with ``z`` the standardised importance of each
    channel (e.g. BN |gamma|): still ~1 everywhere, so the network is unchanged, but ordered so that
    the first thresholds drop the statically least important channels, not random ones. (A choice
    of ours for short schedules: ManiDP starts every bias at exactly 1 and trains for hundreds of
    epochs; after one epoch of a short run its saliencies were measured at 1.00 +/- 0.03.)"""
    imp = importance.float()
    if gate.group > 1:
        pad = gate.groups * gate.group - imp.numel()
        imp = torch.cat([imp, imp.new_full((pad,), float(imp.mean()))]).view(gate.groups, gate.group).mean(1)
    if imp.numel() < 2:  # one group (a layer as wide as the group): nothing to order, and std() is NaN
        gate.fc2.bias.fill_(1.0)
        return
    z = (imp - imp.mean()) / (imp.std() + 1e-12)
    gate.fc2.bias.copy_(1.0 + scale * z.clamp(-3, 3))
