"""The gate of a block in one Triton launch: saliency MLP, keep decision and kept-index lists.

Measured on the H100 (benchmarks/GPU_NOTES.md, v1): built from PyTorch ops, a block's two
gates and their index lists cost about 25 small kernels (two Linear+ReLU pairs, the compare,
a sort per gate, casts, gathers), and in a CUDA graph those launches made the dynamic network
2.6x *slower* than dense although its convolutions were cheaper. This kernel does all of it
for both gates of a block at once, one program per (image, gate):

    hidden   = relu(fc1 @ pooled)                              (ManiDP Sec. 3.1 gate MLP)
    saliency = relu(fc2 @ hidden + b)                          one per group of channels
    keep     = saliency >= threshold and saliency > 0          (ManiDP)  or
               saliency >= k-th largest and saliency > 0       (FBS, Gao et al. 2019, Sec. 3.2)
    slots    = kept channels first (ascending), then the dropped ones (ascending)

and writes, per image: the slot order (``index``), the kept count, and each slot's scale (the
saliency of a kept channel, 0 for a dropped one): exactly what
:func:`dynprune.kernels.reference.gate_keep_index` computes with PyTorch ops.
"""

from __future__ import annotations

import math
from typing import Tuple

import torch
import triton
import triton.language as tl

from dynprune.gates import Gate

_MODES = {"open": 0, "threshold": 1, "topk": 2}


@triton.jit
def _one_gate(pooled_ptr, fc1_ptr, fc2_ptr, b2_ptr, thr_ptr, sal_ptr, idx_ptr, cnt_ptr, scale_ptr, b,
              C_IN, HID, GROUPS, CHANNELS, TOPK,
              GROUP: tl.constexpr, MODE: tl.constexpr,
              BLOCK_CIN: tl.constexpr, BLOCK_HID: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr):
    offs_i = tl.arange(0, BLOCK_CIN)
    offs_h = tl.arange(0, BLOCK_HID)
    offs_g = tl.arange(0, BLOCK_G)
    i_ok = offs_i < C_IN
    h_ok = offs_h < HID
    g_ok = offs_g < GROUPS
    pooled = tl.load(pooled_ptr + b * C_IN + offs_i, mask=i_ok, other=0.0).to(tl.float32)
    w1 = tl.load(fc1_ptr + offs_h[:, None] * C_IN + offs_i[None, :], mask=h_ok[:, None] & i_ok[None, :], other=0.0)
    hidden = tl.maximum(tl.sum(w1.to(tl.float32) * pooled[None, :], axis=1), 0.0)
    w2 = tl.load(fc2_ptr + offs_g[:, None] * HID + offs_h[None, :], mask=g_ok[:, None] & h_ok[None, :], other=0.0)
    sal = tl.sum(w2.to(tl.float32) * hidden[None, :], axis=1)
    sal = tl.maximum(sal + tl.load(b2_ptr + offs_g, mask=g_ok, other=0.0).to(tl.float32), 0.0)
    if MODE == 1:
        cut = tl.load(thr_ptr).to(tl.float32)
    elif MODE == 2:
        # k-th largest group saliency: sort descending, pick slot TOPK-1 (padding sorts last).
        ranked = tl.sort(tl.where(g_ok, sal, -1.0), descending=True)
        cut = tl.sum(tl.where(offs_g == TOPK - 1, ranked, 0.0), axis=0)
    else:
        cut = 0.0
    # Per-group saliency goes out (accounting) and comes back per channel: a register vector
    # cannot be indexed by c // GROUP, so the expansion goes through this small buffer.
    tl.store(sal_ptr + b * GROUPS + offs_g, sal, mask=g_ok)
    tl.debug_barrier()
    offs_c = tl.arange(0, BLOCK_C)
    c_ok = offs_c < CHANNELS
    sal_c = tl.load(sal_ptr + b * GROUPS + offs_c // GROUP, mask=c_ok, other=0.0)
    if MODE == 0:
        keep = c_ok
        scale = tl.where(c_ok, 1.0, 0.0)
    else:
        keep = c_ok & (sal_c >= cut) & (sal_c > 0.0)
        scale = tl.where(keep, sal_c, 0.0)
    keep_i = keep.to(tl.int32)
    drop_i = (c_ok & (keep_i == 0)).to(tl.int32)
    count = tl.sum(keep_i, axis=0)
    slot = tl.where(keep_i == 1, tl.cumsum(keep_i, axis=0) - 1, count + tl.cumsum(drop_i, axis=0) - 1)
    tl.store(idx_ptr + b * CHANNELS + slot, offs_c, mask=c_ok)
    tl.store(scale_ptr + b * CHANNELS + slot, scale.to(scale_ptr.dtype.element_ty), mask=c_ok)
    tl.store(cnt_ptr + b, count)


@triton.jit
def _block_gates_kernel(
    pooled_ptr,
    fc1a, fc2a, b2a, thra, sala, idxa, scla, HIDA, GROUPSA, CHA, TOPKA,
    fc1b, fc2b, b2b, thrb, salb, idxb, sclb, HIDB, GROUPSB, CHB, TOPKB,
    cnt_ptr, B, C_IN,
    GROUP_A: tl.constexpr, MODE_A: tl.constexpr, GROUP_B: tl.constexpr, MODE_B: tl.constexpr,
    BLOCK_CIN: tl.constexpr, BLOCK_HID: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr,
):
    b = tl.program_id(0)
    if tl.program_id(1) == 0:
        _one_gate(pooled_ptr, fc1a, fc2a, b2a, thra, sala, idxa, cnt_ptr, scla, b, C_IN, HIDA, GROUPSA, CHA, TOPKA,
                  GROUP_A, MODE_A, BLOCK_CIN, BLOCK_HID, BLOCK_G, BLOCK_C)
    else:
        _one_gate(pooled_ptr, fc1b, fc2b, b2b, thrb, salb, idxb, cnt_ptr + B, sclb, b, C_IN, HIDB, GROUPSB, CHB,
                  TOPKB, GROUP_B, MODE_B, BLOCK_CIN, BLOCK_HID, BLOCK_G, BLOCK_C)


def topk_count(gate: Gate) -> int:
    """The number of groups FBS keeps per frame (``Gate.group_keep``'s ``k``)."""
    return max(1, math.ceil(gate.keep_ratio * gate.groups))


def block_gates_triton(
    pooled: torch.Tensor, gate1: Gate, gate2: Gate, scale_dtype: torch.dtype
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Both gates of a block in one launch.

    ``pooled``: ``(B, C_in)``, the block input's global average. Returns ``(index1, scale1,
    index2, scale2, counts)``: int32 ``(B, channels)`` slot orders, ``(B, channels)`` slot
    scales and int32 ``(2, B)`` kept counts (row 0 for gate 1), all on the device, nothing
    read back by the host.
    """
    if pooled.dim() != 2:
        raise ValueError(f"pooled must be (B, C_in), got shape {tuple(pooled.shape)}")
    b_sz, c_in = pooled.shape
    pooled = pooled.contiguous()
    dev = pooled.device
    counts = torch.empty(2, b_sz, device=dev, dtype=torch.int32)
    outs = []
    for g in (gate1, gate2):
        if g.mode not in _MODES:
            raise ValueError(f"unknown gate mode {g.mode!r}")
        outs.append((torch.empty(b_sz, g.channels, device=dev, dtype=torch.int32),
                     torch.empty(b_sz, g.channels, device=dev, dtype=scale_dtype),
                     torch.empty(b_sz, g.groups, device=dev, dtype=torch.float32)))
    (i1, s1, sal1), (i2, s2, sal2) = outs
    p2 = triton.next_power_of_2
    _block_gates_kernel[(b_sz, 2)](
        pooled,
        gate1.fc1.weight, gate1.fc2.weight, gate1.fc2.bias, gate1.threshold, sal1, i1, s1,
        gate1.fc1.out_features, gate1.groups, gate1.channels, topk_count(gate1),
        gate2.fc1.weight, gate2.fc2.weight, gate2.fc2.bias, gate2.threshold, sal2, i2, s2,
        gate2.fc1.out_features, gate2.groups, gate2.channels, topk_count(gate2),
        counts, b_sz, c_in,
        GROUP_A=gate1.group, MODE_A=_MODES[gate1.mode], GROUP_B=gate2.group, MODE_B=_MODES[gate2.mode],
        BLOCK_CIN=p2(c_in), BLOCK_HID=p2(max(gate1.fc1.out_features, gate2.fc1.out_features)),
        BLOCK_G=p2(max(gate1.groups, gate2.groups)), BLOCK_C=p2(max(gate1.channels, gate2.channels)),
        num_warps=4,
    )
    return i1, s1, i2, s2, counts
