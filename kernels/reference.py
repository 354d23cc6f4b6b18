"""The reference backend: a gated block on its kept channels in PyTorch, the specification of
the other backends.

It defines what the compiled CPU runtime and the Triton kernels must compute (kernels/block.py):
the keep decision (:meth:`Gate.group_keep <dynprune.gates.Gate.group_keep>`, the only copy in
Python), the slot order of kept channels (:func:`build_keep_index`: kept first, ascending), each
slot's scale (the kept channel's saliency) and the compact computation (:class:`ReferenceBlock`).
The tests run every backend against it on the same cases.

A gated layer reads a *compact* activation (only the kept input channels, densely packed,
in the order of ``in_index``) and writes a compact activation (only the channels in
``out_index``). The weights are never copied to a smaller layer ahead of time: each frame
gathers the rows (kept output filters) and columns (kept input channels) it needs with
``index_select``, which on the CPU costs far less than the convolutions it removes
(docs/DESIGN.md, "Numbers to know").
"""

from __future__ import annotations

import time
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from dynprune.kernels.block import CompactBlock

ACTIVATIONS = (None, "silu", "relu")


def conv_output_hw(h: int, w: int, k: int, stride: int, padding: int) -> tuple[int, int]:
    """Output height and width of a ``k x k`` convolution with zero padding (as ``F.conv2d``)."""
    return (h + 2 * padding - k) // stride + 1, (w + 2 * padding - k) // stride + 1


def _act(y: torch.Tensor, act: Optional[str]) -> torch.Tensor:
    if act is None:
        return y
    if act == "silu":
        return F.silu(y)
    if act == "relu":
        return F.relu(y)
    raise ValueError(f"unknown activation {act!r}; choose one of {ACTIVATIONS}")


def gather_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    in_index: Optional[torch.Tensor],
    out_index: Optional[torch.Tensor],
    stride: int = 1,
    padding: int = 0,
    act: Optional[str] = None,
    scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``act(conv(x, W[out_index][:, in_index]) + b[out_index]) * scale`` on compact tensors.

    ``x``: ``(N, len(in_index), H, W)`` (or the full width when ``in_index`` is None);
    ``weight``: the full ``(C_out, C_in, k, k)``; ``scale``: per kept output channel
    ``(N, len(out_index))`` or None. Either index may be empty: an empty input reduces the
    layer to its bias (a constant map), an empty output to a zero-channel tensor.
    """
    n, _, h, w = x.shape
    k = weight.shape[-1]
    w_sel = weight if out_index is None else weight.index_select(0, out_index)
    b_sel = None if bias is None else (bias if out_index is None else bias.index_select(0, out_index))
    ho, wo = conv_output_hw(h, w, k, stride, padding)
    if in_index is not None and in_index.numel() == 0:
        # No input channel kept: the convolution of zeros is its bias everywhere.
        base = b_sel if b_sel is not None else w_sel.new_zeros(w_sel.shape[0])
        y = base.view(1, -1, 1, 1).expand(n, -1, ho, wo).to(x.dtype)
    elif w_sel.shape[0] == 0:
        return x.new_zeros(n, 0, ho, wo)
    else:
        if in_index is not None:
            w_sel = w_sel.index_select(1, in_index)
        y = F.conv2d(x, w_sel, b_sel, stride, padding)
    y = _act(y, act)
    if scale is not None:
        y = y * scale.view(n, -1, 1, 1)
    return y.contiguous()


def gather_conv2d_padded(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    in_index: Optional[torch.Tensor],
    in_count: Optional[torch.Tensor],
    out_index: Optional[torch.Tensor],
    out_count: Optional[torch.Tensor],
    stride: int = 1,
    padding: int = 0,
    act: Optional[str] = None,
    scale: Optional[torch.Tensor] = None,
    residual: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The fixed-shape contract of the Triton kernel, computed image by image in PyTorch.

    Buffers are full width: ``x`` ``(B, C_in, H, W)`` holds image ``b``'s kept channels in its
    first ``in_count[b]`` planes; ``in_index`` ``(B, C_in)`` int32 lists them (entries past
    the count are ignored). The output's first ``out_count[b]`` planes are written; the rest
    of ``out`` is left untouched. ``scale`` ``(B, C_out)`` is indexed by output *slot*.
    With ``out_index=None`` every output channel is written (full width) and ``residual`` is
    added: the scatter-add epilogue of a block's output projection.
    """
    b_sz, _, h, w = x.shape
    k = weight.shape[-1]
    ho, wo = conv_output_hw(h, w, k, stride, padding)
    if out is None:
        out = x.new_zeros(b_sz, weight.shape[0], ho, wo)
    for b in range(b_sz):
        n_in = int(in_count[b]) if in_count is not None else x.shape[1]
        idx_in = in_index[b, :n_in].long() if in_index is not None else None
        if out_index is not None:
            n_out = int(out_count[b])
            idx_out = out_index[b, :n_out].long()
        else:
            n_out, idx_out = weight.shape[0], None
        s = scale[b : b + 1, :n_out] if scale is not None else None
        y = gather_conv2d(x[b : b + 1, :n_in], weight, bias, idx_in, idx_out, stride, padding, act, s)
        if residual is not None:
            y = y + residual[b : b + 1]
        out[b, :n_out] = y[0].to(out.dtype)
    return out


def build_keep_index(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image kept-channel lists without a host sync: ``(index (B, C) int32, count (B,) int32)``.

    Kept channels come first, in ascending order; the tail is padding. A stable sort of the
    "dropped" flag does it on the device (no ``nonzero``, no data-dependent shape).
    """
    dropped = (mask <= 0).to(torch.int8)
    order = torch.sort(dropped, dim=1, stable=True).indices
    count = (mask > 0).sum(1)
    return order.to(torch.int32), count.to(torch.int32)


def gate_keep_index(pooled: torch.Tensor, gate: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A gate's decision as a slot order: ``(index (B, C) int32, count (B,) int32, scale (B, C))``.

    ``scale[b, s]`` is the mask value (the kept channel's saliency, or 0) of channel
    ``index[b, s]``. The reference for :func:`dynprune.kernels.gate_index.block_gates_triton`.
    """
    _, mask = gate(pooled)
    index, count = build_keep_index(mask)
    return index, count, torch.gather(mask, 1, index.long())


class ReferenceBlock(CompactBlock):
    """A gated block image by image in PyTorch: pool, both gates (their own modules, so the keep
    decision is :meth:`~dynprune.gates.Gate.group_keep`), kept lists by :func:`build_keep_index`,
    then :func:`gather_conv2d` for cv1 (rows of gate 1's kept channels, SiLU, scale), cv2 (those
    columns, gate 2's rows, SiLU, scale) and cv3 (gate 2's columns) plus the shortcut. Any device,
    dtype and batch; each image keeps its own channels."""

    backend = "reference"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter() if self.profile else 0.0
        pooled = x.mean((2, 3))
        _, mask1 = self.gate1(pooled)
        _, mask2 = self.gate2(pooled)
        index1, count1 = build_keep_index(mask1)
        index2, count2 = build_keep_index(mask2)
        counts = torch.stack([count1, count2], 1).cpu()
        if self.profile:
            self.gate_ms += (time.perf_counter() - t0) * 1e3
        out = torch.empty_like(x)
        for b, (n1, n2) in enumerate(counts.tolist()):
            i1, i2 = index1[b, :n1].long(), index2[b, :n2].long()
            y = gather_conv2d(x[b : b + 1], self.w1, self.b1, None, i1, act="silu", scale=mask1[b : b + 1, i1])
            y = gather_conv2d(y, self.w2, self.b2, i1, i2, padding=1, act="silu", scale=mask2[b : b + 1, i2])
            out[b] = x[b] + gather_conv2d(y, self.w3, self.b3, i2, None)[0]
        self.last_kept = counts.numpy().astype(np.int64)
        return out
