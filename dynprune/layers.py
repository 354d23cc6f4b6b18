"""Building blocks of the detector: Conv-BN-SiLU and the gateable bottleneck."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from dynprune.gates import Gate


class ConvBNAct(nn.Module):
    """Convolution (no bias) -> BatchNorm -> SiLU (or identity when ``act=False``)."""

    def __init__(self, c_in: int, c_out: int, k: int = 1, stride: int = 1, act: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, k, stride, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(c_out)
        self.act = nn.SiLU(inplace=True) if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))

    @torch.no_grad()
    def fold(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Return ``(weight, bias)`` with the BatchNorm folded in (inference only)."""
        bn = self.bn
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        weight = self.conv.weight * scale[:, None, None, None]
        bias = bn.bias - bn.running_mean * scale
        return weight.contiguous(), bias.contiguous()


class Bottleneck(nn.Module):
    """Residual bottleneck whose two hidden layers can be gated per input.

    ``x -> cv1 (1x1, c->h1) -> cv2 (3x3, h1->h2) -> cv3 (1x1, h2->c, no act) -> + x``.
    Only the outputs of ``cv1`` and ``cv2`` are "hidden": produced and consumed inside the
    block. The residual stream ``x`` is never gated (docs/DESIGN.md, "Compact activations").

    With gates, the hidden activations are multiplied by ``mask = saliency * [saliency >=
    threshold]`` (ManiDP, Tang et al. CVPR 2021, Sec. 3.1 and the official code). Both gates
    read the global-average-pooled block input, so every kept set of a block is known
    before its first convolution runs.
    """

    def __init__(self, c: int, h1: int, h2: int) -> None:
        super().__init__()
        self.c, self.h1, self.h2 = c, h1, h2
        self.cv1 = ConvBNAct(c, h1, 1)
        self.cv2 = ConvBNAct(h1, h2, 3)
        self.cv3 = ConvBNAct(h2, c, 1, act=False)
        self.gate1: Optional[Gate] = None
        self.gate2: Optional[Gate] = None
        # Filled by forward() when gated, read by the ManiDP losses and the reports.
        self.last: dict = {}

    @property
    def gated(self) -> bool:
        return self.gate1 is not None

    def add_gates(self, reduction: int = 2, group: int = 1) -> None:
        self.gate1 = Gate(self.c, self.h1, reduction, group)
        self.gate2 = Gate(self.c, self.h2, reduction, group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate1 is None:
            return x + self.cv3(self.cv2(self.cv1(x)))
        pooled = F.adaptive_avg_pool2d(x, 1).flatten(1)
        s1, m1 = self.gate1(pooled)
        s2, m2 = self.gate2(pooled)
        self.last = {"pooled": pooled, "saliency": (s1, s2), "mask": (m1, m2)}
        y = self.cv1(x) * m1[:, :, None, None]
        y = self.cv2(y) * m2[:, :, None, None]
        return x + self.cv3(y)
