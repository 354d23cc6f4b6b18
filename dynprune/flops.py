"""Parameter and FLOP counts: dense totals and the per-frame cost of a gated network.

FLOPs are counted as torch.utils.flop_counter counts them (2 per multiply-add of
convolutions and matrix products). A bottleneck with ``n1`` and ``n2`` kept hidden
channels at ``hw`` output pixels costs ``2 * hw * (c*n1 + 9*n1*n2 + n2*c)``; the rest of
the network does not depend on the gates.
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
from torch.utils.flop_counter import FlopCounterMode

from dynprune.gates import Gate, set_gate_mode
from dynprune.layers import Bottleneck
from dynprune.model import Detector


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(model: torch.nn.Module, imgsz: int, batch: int = 1) -> int:
    """Total FLOPs of one forward pass, by torch.utils.flop_counter."""
    p = next(model.parameters())
    x = torch.zeros(batch, 3, imgsz, imgsz, device=p.device, dtype=p.dtype)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(x)
    return int(fc.get_total_flops())


def block_flops(block: Bottleneck, hw: int, n1: int, n2: int) -> int:
    """FLOPs of a bottleneck's three convolutions with ``n1``/``n2`` hidden channels kept."""
    return 2 * hw * (block.c * n1 + 9 * n1 * n2 + n2 * block.c)


def block_params(block: Bottleneck, n1: int, n2: int) -> int:
    """Parameters of a bottleneck's convolutions and BatchNorms with ``n1``/``n2`` hidden channels."""
    c = block.c
    return c * n1 + 2 * n1 + 9 * n1 * n2 + 2 * n2 + n2 * c + 2 * c


def gate_flops(block: Bottleneck) -> int:
    total = 0
    for g in (block.gate1, block.gate2):
        if g is not None:
            total += 2 * (g.fc1.in_features * g.fc1.out_features + g.fc2.in_features * g.fc2.out_features)
    return total


class CostModel:
    """The FLOPs of any per-frame choice of kept channels, for one model at one input size."""

    def __init__(self, model: Detector, imgsz: int) -> None:
        self.imgsz = imgsz
        self.blocks = model.blocks
        self.hw: List[int] = []
        hooks = [b.register_forward_hook(self._record) for b in self.blocks]
        # Counted with every gate open; each gate's mode and FBS top-k ratio are put back after.
        modes = {id(m): (m.mode, m.keep_ratio) for m in model.modules() if isinstance(m, Gate)}
        set_gate_mode(model, "open")
        try:
            self.dense = count_flops(model, imgsz)
        finally:
            for h in hooks:
                h.remove()
            for m in model.modules():
                if id(m) in modes:
                    m.mode, m.keep_ratio = modes[id(m)]
        self.hw = self.hw[: len(self.blocks)]
        self.gates = sum(gate_flops(b) for b in self.blocks)
        self.params = count_parameters(model)
        self.gate_params = sum(p.numel() for b in self.blocks for g in (b.gate1, b.gate2) if g is not None
                               for p in g.parameters())
        self.block_dense = [block_flops(b, hw, b.h1, b.h2) for b, hw in zip(self.blocks, self.hw)]
        # Everything that the gates cannot touch (stem, down-sampling, neck, head, and the
        # gates themselves when present).
        self.fixed = self.dense - sum(self.block_dense)

    def _record(self, module, inputs, output) -> None:
        self.hw.append(output.shape[-2] * output.shape[-1])

    @property
    def gated_fraction(self) -> float:
        """Share of the dense network's FLOPs that runs on gateable (hidden) channels."""
        return sum(self.block_dense) / (self.dense - self.gates)

    def frame_flops(self, kept: Sequence[Tuple[int, int]]) -> int:
        """FLOPs of one frame given ``(n1, n2)`` kept hidden channels per block."""
        return self.fixed + sum(block_flops(b, hw, n1, n2) for b, hw, (n1, n2) in zip(self.blocks, self.hw, kept))

    def widths_flops(self, hidden: Sequence[Sequence[int]]) -> int:
        """FLOPs of a statically pruned model with these hidden widths (no gates)."""
        return self.dense - self.gates - sum(self.block_dense) + sum(
            block_flops(b, hw, h1, h2) for b, hw, (h1, h2) in zip(self.blocks, self.hw, hidden)
        )

    def widths_params(self, hidden: Sequence[Sequence[int]]) -> int:
        """Parameters of a statically pruned model with these hidden widths (no gates)."""
        return self.params - self.gate_params - sum(block_params(b, b.h1, b.h2) for b in self.blocks) + sum(
            block_params(b, h1, h2) for b, (h1, h2) in zip(self.blocks, hidden)
        )

    def summary(self) -> Dict[str, float]:
        return {"dense_gflops": self.dense / 1e9, "gated_fraction": self.gated_fraction}
