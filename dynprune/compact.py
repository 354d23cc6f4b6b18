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
import torch.nn.functional as F
from torch import nn

from dynprune.fusion import fuse_conv_bn
from dynprune.gates import Gate
from dynprune.layers import Bottleneck
from dynprune.model import Detector


class CompactBottleneck(nn.Module):
    """Inference-only replacement of a gated :class:`Bottleneck` that skips dropped channels.

    CPU path, tuned for small per-op overheads (measured: a dozen tiny ops per block cost as
    much as the convolutions saved): the two gates' first layers run as one matrix product,
    each kept channel's saliency scale is folded into the *next* convolution's gathered
    weight columns (a few KB) instead of multiplying an activation map, and group indices are
    expanded arithmetically.
    """

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
        g1, g2 = self.gate1, self.gate2
        self.hid1 = g1.fc1.out_features
        self.n_groups1 = g1.groups
        # Both gates as one MLP: fc1 side by side, fc2 block-diagonal. Per-op overhead dominates
        # such tiny products on a CPU (measured ~0.4 ms per block for the two separate gates).
        self.register_buffer("fc1_t", torch.cat([g1.fc1.weight, g2.fc1.weight]).t().contiguous().detach())
        fc2 = torch.zeros(g1.groups + g2.groups, self.hid1 + g2.fc1.out_features)
        fc2[: g1.groups, : self.hid1] = g1.fc2.weight.detach()
        fc2[g1.groups :, self.hid1 :] = g2.fc2.weight.detach()
        self.register_buffer("fc2_t", fc2.t().contiguous())
        self.register_buffer("fc2_b", torch.cat([g1.fc2.bias, g2.fc2.bias]).detach())
        self.lean = g1.mode == g2.mode == "threshold"
        if self.lean:
            thr = torch.cat([g1.threshold.expand(g1.groups), g2.threshold.expand(g2.groups)]).detach()
            self.register_buffer("thresholds", thr.clone())
        # (B, 2) kept counts of the last forward pass, for per-frame accounting.
        self.last_kept: Optional[torch.Tensor] = None
        self.profile = False  # time the gates (serving reports them apart from the network)
        self.gate_ms = 0.0

    def saliency(self, x: torch.Tensor):
        """Per-group saliency and keep decision of both gates, ``((s1, keep1), (s2, keep2))``."""
        s = torch.relu(torch.addmm(self.fc2_b, torch.relu(x.mean((2, 3)) @ self.fc1_t), self.fc2_t))
        s1, s2 = s[:, : self.n_groups1], s[:, self.n_groups1 :]
        if self.lean:  # ManiDP: saliency >= threshold (and > 0), both gates in one comparison
            keep = (s >= self.thresholds) & (s > 0)
            return (s1, keep[:, : self.n_groups1]), (s2, keep[:, self.n_groups1 :])
        return (s1, self.gate1.group_keep(s1)), (s2, self.gate2.group_keep(s2))

    @staticmethod
    def _channels(groups: torch.Tensor, group: int, width: int) -> torch.Tensor:
        if group == 1:
            return groups
        ch = (groups[:, None] * group + torch.arange(group, device=groups.device)).flatten()
        return ch[ch < width]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter() if self.profile else 0.0
        (s1, k1), (s2, k2) = self.saliency(x)
        if self.profile:
            self.gate_ms += (time.perf_counter() - t0) * 1e3
        g1, g2 = self.gate1.group, self.gate2.group
        outs: List[torch.Tensor] = []
        kept = []
        for i in range(x.shape[0]):  # each image keeps its own channel set
            grp1 = torch.nonzero(k1[i]).flatten()
            grp2 = torch.nonzero(k2[i]).flatten()
            idx1 = self._channels(grp1, g1, self.h1)
            idx2 = self._channels(grp2, g2, self.h2)
            n1, n2 = idx1.numel(), idx2.numel()
            kept.append((n1, n2))
            xi = x[i : i + 1]
            if n2 == 0:  # nothing reaches the output projection: shortcut plus bias
                outs.append(xi + self.b3.view(1, -1, 1, 1))
                continue
            scale1 = s1[i, idx1 // g1] if g1 > 1 else s1[i, idx1]
            scale2 = s2[i, idx2 // g2] if g2 > 1 else s2[i, idx2]
            w2 = self.w2.index_select(0, idx2)
            b2 = self.b2.index_select(0, idx2)
            if n1 == 0:  # a 3x3 over zeros is its bias everywhere
                y = F.silu(b2).view(1, -1, 1, 1).expand(1, n2, *x.shape[2:])
            else:
                y = F.silu(F.conv2d(xi, self.w1.index_select(0, idx1), self.b1.index_select(0, idx1)))
                w2 = w2.index_select(1, idx1) * scale1.view(1, -1, 1, 1)  # fold scale 1 into W2's columns
                y = F.silu(F.conv2d(y, w2, b2, padding=1))
            w3 = self.w3.index_select(1, idx2) * scale2.view(1, -1, 1, 1)  # fold scale 2 into W3's columns
            out = F.conv2d(y, w3, self.b3)
            outs.append(out.add_(xi))
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
        # oneDNN runs odd channel counts far better in channels_last (measured 3x3 at 40x40,
        # 31->33 channels: 1.02 ms NCHW, 0.66 ms NHWC), and compact widths are odd more often than not.
        self.channels_last = self.backend == "torch"
        if self.channels_last:
            self.net.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor):
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x)

    def kept_counts(self) -> torch.Tensor:
        """``(B, blocks, 2)`` kept hidden channels of the last call (on the device for Triton)."""
        return torch.stack([b.last_kept for b in self.blocks], 1)


class DenseInference(nn.Module):
    """The fastest PyTorch form of a dense (or statically pruned) model: BN folded, and on the
    CPU channels_last (as fast or faster for every layer shape measured)."""

    def __init__(self, model: Detector) -> None:
        super().__init__()
        self.net = fuse_conv_bn(copy.deepcopy(model).eval())
        self.channels_last = next(model.parameters()).device.type == "cpu"
        if self.channels_last:
            self.net.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor):
        if self.channels_last and x.device.type == "cpu":
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x)


def dense_inference_model(model: Detector) -> DenseInference:
    return DenseInference(model)
