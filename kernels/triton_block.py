"""The Triton backend of a gated block: kept lists built and read on the GPU, no host sync.

Index lists and kept counts are made and consumed on the device, buffers are full width, and
each convolution is one Triton launch, so one CUDA graph replays every frame whatever it keeps
(docs/DESIGN.md, "The GPU path"). Triton is imported on the first call, so this module loads
without it.
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch

from dynprune.gates import Gate
from dynprune.kernels.block import CompactBlock
from dynprune.layers import Bottleneck


class TritonBlock(CompactBlock):
    """A gated block in four Triton launches: the pool with both gates and their kept lists
    (:mod:`~dynprune.kernels.gate_index`), then three gather convolutions
    (:mod:`~dynprune.kernels.gather_conv`) with BN bias, SiLU, the saliency scale and (last) the
    residual add fused in. Weights are laid out for the kernels by :class:`CompactDetector
    <dynprune.compact.CompactDetector>`."""

    backend = "triton"

    #: averaging rows by (pixels, dtype, device), shared by every block of every engine
    _averaging: Dict[tuple, torch.Tensor] = {}
    #: let the 3x3 and the output 1x1 read group gates' kept lists a run at a time (``in_run``);
    #: the GPU benchmark turns it off to measure what it gains
    use_runs: bool = True
    #: pool the block input inside the gates' kernel (one launch) instead of a matrix-vector
    #: product before it; the GPU benchmark turns it off to measure what it gains
    fuse_pool: bool = True

    def __init__(self, block: Bottleneck) -> None:
        super().__init__(block)
        self._pool_workspace: Dict[tuple, Tuple[torch.Tensor, torch.Tensor]] = {}

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_pool_workspace"] = {}  # device buffers, remade on the next call
        return state

    def prepare(self) -> TritonBlock:
        from dynprune.kernels.gather_conv import weight_layout_for, with_layout

        self.w1 = with_layout(self.w1, weight_layout_for(1))
        self.w2 = with_layout(self.w2, weight_layout_for(3))
        self.w3 = with_layout(self.w3, weight_layout_for(1))
        return self

    @staticmethod
    def kept_run(gate: Gate, width: int) -> int:
        """The run length a gate's kept lists are made of: its group size where that is 8 or 16
        (one or two 16-byte vectors in fp16; every tile size divides it) and divides the width,
        else 1."""
        g = gate.group
        return g if g in (8, 16) and width % g == 0 else 1

    @classmethod
    def pool(cls, x: torch.Tensor) -> torch.Tensor:
        """Global average pool ``(B, C)`` of a block input.

        For NHWC input it is one batched matrix-vector product ``(1/HW, ..., 1/HW) @ (HW, C)``,
        which on the H100 runs faster than PyTorch's reduction kernel. The averaging row is made on the first call
        (the warm-up before a CUDA-graph capture) and reused, so the captured graph makes none.
        """
        b, c, h, w = x.shape
        if not x.is_contiguous(memory_format=torch.channels_last):
            return x.mean((2, 3))
        key = (h * w, x.dtype, x.device)
        row = cls._averaging.get(key)
        if row is None:
            row = cls._averaging[key] = torch.full((1, 1, h * w), 1.0 / (h * w), dtype=x.dtype, device=x.device)
        pixels = x.permute(0, 2, 3, 1).reshape(b, h * w, c)  # a view of NHWC memory
        return torch.matmul(row.expand(b, 1, h * w), pixels).view(b, c)

    def gates(self, x: torch.Tensor):
        """Both gates of the block for input ``x``: ``(index1, scale1, index2, scale2, counts)``
        on the device (:mod:`dynprune.kernels.gate_index`)."""
        from dynprune.kernels.gate_index import block_gates_triton, pool_workspace, pooled_block_gates_triton

        if not self.fuse_pool:
            return block_gates_triton(self.pool(x), self.gate1, self.gate2, x.dtype)
        # The pooling sums and counters persist between calls (the kernel leaves them zeroed):
        # made on the first call for a batch size, which is a warm-up before any graph capture.
        key = (x.shape[0], x.device)
        workspace = self._pool_workspace.get(key)
        if workspace is None:
            workspace = self._pool_workspace[key] = pool_workspace(x.shape[0], self.c, x.device)
        return pooled_block_gates_triton(x, self.gate1, self.gate2, x.dtype, workspace)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from dynprune.kernels.gather_conv import gather_conv2d_triton

        # Four launches a block: the pool with both gates and their index lists, three convolutions.
        i1, s1, i2, s2, counts = self.gates(x)
        c1, c2 = counts[0], counts[1]
        run1 = self.kept_run(self.gate1, self.h1) if self.use_runs else 1
        run2 = self.kept_run(self.gate2, self.h2) if self.use_runs else 1
        y = gather_conv2d_triton(x, self.w1, self.b1, None, None, i1, c1, act="silu", scale=s1, out_run=run1)
        y = gather_conv2d_triton(y, self.w2, self.b2, i1, c1, i2, c2, padding=1, act="silu", scale=s2, in_run=run1,
                                 out_run=run2)
        out = gather_conv2d_triton(y, self.w3, self.b3, i2, c2, None, None, residual=x, in_run=run2)
        self.last_kept = counts.t()  # (B, 2), a view: stays on the device, no launch
        return out
