"""Per-frame channel skipping for real: a gated detector executed on compact activations.

Each gated bottleneck computes its gates first (from the pooled block input), builds the
kept-channel index lists, and then runs

    cv1: rows keep1 of W1                       -> (keep1, H, W)   compact
    cv2: rows keep2, columns keep1 of W2        -> (keep2, H, W)   compact
    cv3: columns keep2 of W3, + residual        -> (C, H, W)       full width

with BatchNorm folded, the activation and the saliency scale fused after each conv. No
activation is ever scattered back to full width inside a block (DESIGN.md). The result
equals the masked dense model (``mask = saliency * [saliency >= threshold]``) up to float
rounding; the tests check it.
"""

from __future__ import annotations

import copy
import time
from typing import List, Optional

import torch
from torch import nn

from dynprune.fusion import fuse_conv_bn
from dynprune.gates import Gate
from dynprune.kernels.reference import gather_conv2d
from dynprune.layers import Bottleneck
from dynprune.model import Detector


class CompactBottleneck(nn.Module):
    """Inference-only replacement of a gated :class:`Bottleneck` that skips dropped channels."""

    def __init__(self, block: Bottleneck) -> None:
        super().__init__()
        if not block.gated:
            raise ValueError("CompactBottleneck needs a gated block")
        self.c, self.h1, self.h2 = block.c, block.h1, block.h2
        self.gate1: Gate = copy.deepcopy(block.gate1)
        self.gate2: Gate = copy.deepcopy(block.gate2)
        for name, conv in (("1", block.cv1), ("2", block.cv2), ("3", block.cv3)):
            w, b = conv.fold()
            self.register_buffer(f"w{name}", w)
            self.register_buffer(f"b{name}", b)
        # (B, 2) kept counts of the last forward pass, for per-frame accounting.
        self.last_kept: Optional[torch.Tensor] = None
        self.profile = False  # time the gates (serving reports them apart from the network)
        self.gate_ms = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter() if self.profile else 0.0
        pooled = x.mean((2, 3))
        _, m1 = self.gate1(pooled)
        _, m2 = self.gate2(pooled)
        if self.profile:
            self.gate_ms += (time.perf_counter() - t0) * 1e3
        outs: List[torch.Tensor] = []
        kept = []
        for i in range(x.shape[0]):  # each image keeps its own channel set
            keep1 = torch.nonzero(m1[i] > 0).flatten()
            keep2 = torch.nonzero(m2[i] > 0).flatten()
            kept.append((keep1.numel(), keep2.numel()))
            xi = x[i : i + 1]
            y = gather_conv2d(xi, self.w1, self.b1, None, keep1, 1, 0, "silu", m1[i : i + 1, keep1])
            y = gather_conv2d(y, self.w2, self.b2, keep1, keep2, 1, 1, "silu", m2[i : i + 1, keep2])
            y = gather_conv2d(y, self.w3, self.b3, keep2, None, 1, 0, None, None)
            outs.append(xi + y)
        self.last_kept = torch.tensor(kept)
        return torch.cat(outs) if len(outs) > 1 else outs[0]


class TritonCompactBottleneck(CompactBottleneck):
    """The same block on the GPU with no host synchronisation: index lists and kept counts are
    built and consumed on the device, buffers are full width, and each convolution is one Triton
    launch with BN bias, SiLU, the saliency scale and (last) the residual add fused in."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from dynprune.kernels.gather_conv import gather_conv2d_triton
        from dynprune.kernels.reference import build_keep_index

        pooled = x.mean((2, 3))
        _, m1 = self.gate1(pooled)
        _, m2 = self.gate2(pooled)
        i1, c1 = build_keep_index(m1)
        i2, c2 = build_keep_index(m2)
        s1 = torch.gather(m1, 1, i1.long()).to(x.dtype)  # saliency scale in slot order
        s2 = torch.gather(m2, 1, i2.long()).to(x.dtype)
        y = gather_conv2d_triton(x, self.w1, self.b1, None, None, i1, c1, act="silu", scale=s1)
        y = gather_conv2d_triton(y, self.w2, self.b2, i1, c1, i2, c2, padding=1, act="silu", scale=s2)
        out = gather_conv2d_triton(y, self.w3, self.b3, i2, c2, None, None, residual=x)
        self.last_kept = torch.stack((c1, c2), 1)  # stays on the device
        return out


class CompactDetector(nn.Module):
    """A gated :class:`Detector` whose gated blocks run on compact activations.

    ``forward`` has the detector's contract; :meth:`kept_counts` gives the ``(B, blocks, 2)``
    kept channels of the last call.
    """

    def __init__(self, model: Detector, backend: str = "auto", device: torch.device | str | None = None) -> None:
        super().__init__()
        from dynprune.kernels.dispatch import select_backend

        if not model.gated:
            raise ValueError("CompactDetector needs a gated model (dynprune gate)")
        device = torch.device(device) if device is not None else next(model.parameters()).device
        self.backend, self.backend_reason = select_backend(device, backend)
        block_cls = TritonCompactBottleneck if self.backend == "triton" else CompactBottleneck
        net = copy.deepcopy(model).eval()
        # Swap every gated bottleneck for its compact twin, then fold the remaining BNs.
        for _, module in list(net.named_modules()):
            for child_name, child in list(module.named_children()):
                if isinstance(child, Bottleneck) and child.gated:
                    setattr(module, child_name, block_cls(child))
        self.net = fuse_conv_bn(net)
        self.blocks = [m for m in self.net.modules() if isinstance(m, CompactBottleneck)]

    def forward(self, x: torch.Tensor):
        return self.net(x)

    def kept_counts(self) -> torch.Tensor:
        """``(B, blocks, 2)`` kept hidden channels of the last call (on the device for Triton)."""
        return torch.stack([b.last_kept for b in self.blocks], 1)


def dense_inference_model(model: Detector) -> Detector:
    """The fastest PyTorch form of a dense (or statically pruned) model: BN folded."""
    return fuse_conv_bn(copy.deepcopy(model).eval())
