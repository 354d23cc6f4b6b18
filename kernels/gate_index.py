"""The gate of a block in one Triton launch: saliency MLP, keep decision and kept-index lists.

Why (docs/DESIGN.md, "The GPU path"): built from PyTorch ops, a block's two gates and their
index lists are about 25 small kernels (two Linear+ReLU pairs, the compare, a sort per gate,
casts, gathers), and at batch 1 on a GPU the launches cost more than the convolutions skip. This kernel does all of it
for both gates of a block at once, one program per (image, gate):

    hidden   = relu(fc1 @ pooled)                              (ManiDP Sec. 3.1 gate MLP)
    saliency = relu(fc2 @ hidden + b)                          one per group of channels
    keep     = saliency >= threshold and saliency > 0          (ManiDP)  or
               saliency >= k-th largest and saliency > 0       (FBS, Gao et al. 2019, Sec. 3.2)
    slots    = kept channels first (ascending), then the dropped ones (ascending)

and writes, per image: the slot order (``index``), the kept count, and each slot's scale (the
saliency of a kept channel, 0 for a dropped one): exactly what
:func:`dynprune.kernels.reference.gate_keep_index` computes with PyTorch ops.

:func:`pooled_block_gates_triton` does the global average pool of the block input in the same
launch (the engine's default); :func:`block_gates_triton` takes the pooled vector.
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
def _one_gate(pooled, fc1_ptr, fc2_ptr, b2_ptr, thr_ptr, sal_ptr, idx_ptr, cnt_ptr, scale_ptr, b,
              C_IN, HID, GROUPS, CHANNELS, TOPK,
              GROUP: tl.constexpr, MODE: tl.constexpr,
              BLOCK_CIN: tl.constexpr, BLOCK_HID: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr):
    # pooled: (BLOCK_CIN,) float32, the image's pooled block input, zeros past C_IN
    offs_i = tl.arange(0, BLOCK_CIN)
    offs_h = tl.arange(0, BLOCK_HID)
    offs_g = tl.arange(0, BLOCK_G)
    i_ok = offs_i < C_IN
    h_ok = offs_h < HID
    g_ok = offs_g < GROUPS
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
    offs_i = tl.arange(0, BLOCK_CIN)
    pooled = tl.load(pooled_ptr + b * C_IN + offs_i, mask=offs_i < C_IN, other=0.0).to(tl.float32)
    if tl.program_id(1) == 0:
        _one_gate(pooled, fc1a, fc2a, b2a, thra, sala, idxa, cnt_ptr, scla, b, C_IN, HIDA, GROUPSA, CHA, TOPKA,
                  GROUP_A, MODE_A, BLOCK_CIN, BLOCK_HID, BLOCK_G, BLOCK_C)
    else:
        _one_gate(pooled, fc1b, fc2b, b2b, thrb, salb, idxb, cnt_ptr + B, sclb, b, C_IN, HIDB, GROUPSB, CHB,
                  TOPKB, GROUP_B, MODE_B, BLOCK_CIN, BLOCK_HID, BLOCK_G, BLOCK_C)


@triton.jit
def _pool_block_gates_kernel(
    x_ptr, SXB, SXC, SXH, SXW, W, HW, INV_HW, N_TILES, N_PROGS, sum_ptr, done_ptr,
    fc1a, fc2a, b2a, thra, sala, idxa, scla, HIDA, GROUPSA, CHA, TOPKA,
    fc1b, fc2b, b2b, thrb, salb, idxb, sclb, HIDB, GROUPSB, CHB, TOPKB,
    cnt_ptr, B, C_IN,
    GROUP_A: tl.constexpr, MODE_A: tl.constexpr, GROUP_B: tl.constexpr, MODE_B: tl.constexpr,
    CHUNK_P: tl.constexpr, BLOCK_CIN: tl.constexpr, BLOCK_HID: tl.constexpr, BLOCK_G: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # Program (b, k) sums tiles k, k + N_PROGS, ... of CHUNK_P pixels of image b into the float32
    # sums; the image's last program to finish runs both gates (the pattern of CUDA's
    # threadFenceReduction sample). It also leaves the sums and its counter at zero, so that
    # the next call, or the next replay of a CUDA graph, starts clean without a memset.
    b = tl.program_id(0)
    offs_i = tl.arange(0, BLOCK_CIN)
    i_ok = offs_i < C_IN
    acc = tl.zeros((CHUNK_P, BLOCK_CIN), tl.float32)
    for t in range(tl.program_id(1), N_TILES, N_PROGS):
        offs_p = t * CHUNK_P + tl.arange(0, CHUNK_P)
        rows = b * SXB + (offs_p // W) * SXH + (offs_p % W) * SXW
        acc += tl.load(x_ptr + rows[:, None] + offs_i[None, :] * SXC, mask=(offs_p < HW)[:, None] & i_ok[None, :],
                       other=0.0).to(tl.float32)
    tl.atomic_add(sum_ptr + b * C_IN + offs_i, tl.sum(acc, axis=0) * INV_HW, mask=i_ok)
    tl.debug_barrier()  # every thread's share is added before the program counts itself done
    done = tl.atomic_add(done_ptr + b, 1)  # acq_rel: the other programs' sums are visible after it
    if done == N_PROGS - 1:
        # Read the sums where the atomics made them (L2: an add of 0, not a load that could hit
        # a stale L1 line), then zero them; every other program of the image is done with them.
        pooled = tl.atomic_add(sum_ptr + b * C_IN + offs_i, tl.zeros((BLOCK_CIN,), tl.float32), mask=i_ok)
        pooled = tl.where(i_ok, pooled, 0.0)
        tl.store(sum_ptr + b * C_IN + offs_i, tl.zeros((BLOCK_CIN,), tl.float32), mask=i_ok)
        tl.store(done_ptr + b, 0)
        _one_gate(pooled, fc1a, fc2a, b2a, thra, sala, idxa, cnt_ptr, scla, b, C_IN, HIDA, GROUPSA, CHA, TOPKA,
                  GROUP_A, MODE_A, BLOCK_CIN, BLOCK_HID, BLOCK_G, BLOCK_C)
        _one_gate(pooled, fc1b, fc2b, b2b, thrb, salb, idxb, cnt_ptr + B, sclb, b, C_IN, HIDB, GROUPSB, CHB,
                  TOPKB, GROUP_B, MODE_B, BLOCK_CIN, BLOCK_HID, BLOCK_G, BLOCK_C)


def topk_count(gate: Gate) -> int:
    """The number of groups FBS keeps per frame (``Gate.group_keep``'s ``k``)."""
    return max(1, math.ceil(gate.keep_ratio * gate.groups))


def _gate_outputs(b_sz: int, gate1: Gate, gate2: Gate, scale_dtype: torch.dtype, dev: torch.device):
    """Per gate ``(index, scale, saliency)`` buffers and the int32 ``(2, B)`` kept counts."""
    outs = []
    for g in (gate1, gate2):
        if g.mode not in _MODES:
            raise ValueError(f"unknown gate mode {g.mode!r}")
        outs.append((torch.empty(b_sz, g.channels, device=dev, dtype=torch.int32),
                     torch.empty(b_sz, g.channels, device=dev, dtype=scale_dtype),
                     torch.empty(b_sz, g.groups, device=dev, dtype=torch.float32)))
    return outs, torch.empty(2, b_sz, device=dev, dtype=torch.int32)


def _gate_args(gate: Gate, index: torch.Tensor, scale: torch.Tensor, saliency: torch.Tensor) -> tuple:
    """One gate's kernel arguments, in the order ``_block_gates_kernel`` takes them."""
    return (gate.fc1.weight, gate.fc2.weight, gate.fc2.bias, gate.threshold, saliency, index, scale,
            gate.fc1.out_features, gate.groups, gate.channels, topk_count(gate))


def _gate_meta(c_in: int, gate1: Gate, gate2: Gate) -> dict:
    p2 = triton.next_power_of_2
    return dict(GROUP_A=gate1.group, MODE_A=_MODES[gate1.mode], GROUP_B=gate2.group, MODE_B=_MODES[gate2.mode],
                BLOCK_CIN=p2(c_in), BLOCK_HID=p2(max(gate1.fc1.out_features, gate2.fc1.out_features)),
                BLOCK_G=p2(max(gate1.groups, gate2.groups)), BLOCK_C=p2(max(gate1.channels, gate2.channels)))


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
    outs, counts = _gate_outputs(b_sz, gate1, gate2, scale_dtype, pooled.device)
    (i1, s1, sal1), (i2, s2, sal2) = outs
    _block_gates_kernel[(b_sz, 2)](
        pooled, *_gate_args(gate1, i1, s1, sal1), *_gate_args(gate2, i2, s2, sal2), counts, b_sz, c_in,
        **_gate_meta(c_in, gate1, gate2), num_warps=4,
    )
    return i1, s1, i2, s2, counts


def pool_workspace(batch: int, channels: int, device: torch.device | str) -> Tuple[torch.Tensor, torch.Tensor]:
    """Zeroed float32 ``(B, C)`` sums and int32 ``(B,)`` counters for
    :func:`pooled_block_gates_triton`. Make them once per block and batch size, outside any
    CUDA-graph capture; every call leaves them at zero again."""
    return (torch.zeros(batch, channels, device=device, dtype=torch.float32),
            torch.zeros(batch, device=device, dtype=torch.int32))


#: pixels times (power-of-two) channels of one pooling tile, and pooling programs per image at
#: most (each sums every N-th tile). From ``benchmarks/gpu_pool_sweep.py`` on the H100: 8-32
#: programs were slower, tiles of 4096 or 8192 the same.
POOL_TILE = 2048
POOL_PROGRAMS = 128


def pooled_block_gates_triton(
    x: torch.Tensor, gate1: Gate, gate2: Gate, scale_dtype: torch.dtype,
    workspace: Tuple[torch.Tensor, torch.Tensor],
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The global average pool of the block input ``x`` ``(B, C, H, W)`` (any strides;
    channels-last reads coalesced) and both gates, in one launch: what
    ``block_gates_triton(x.mean((2, 3)), ...)`` returns, with the pool summed in float32.

    One kernel a block where the pool as a batched matrix-vector product and the gates take
    two or more (docs/DESIGN.md, "The GPU path"). ``workspace``: :func:`pool_workspace`'s
    buffers for this ``(B, C)``, owned by the caller (one set per block; calls on one stream).
    """
    if x.dim() != 4:
        raise ValueError(f"x must be (B, C, H, W), got shape {tuple(x.shape)}")
    b_sz, c_in, h, w = x.shape
    sums, done = workspace
    if tuple(sums.shape) != (b_sz, c_in) or tuple(done.shape) != (b_sz,):
        raise ValueError(f"workspace is for {tuple(sums.shape)}, the input needs ({b_sz}, {c_in}): "
                         "make it with pool_workspace(B, C, device)")
    outs, counts = _gate_outputs(b_sz, gate1, gate2, scale_dtype, x.device)
    (i1, s1, sal1), (i2, s2, sal2) = outs
    meta = _gate_meta(c_in, gate1, gate2)
    chunk = max(1, min(triton.next_power_of_2(h * w), POOL_TILE // meta["BLOCK_CIN"]))
    n_tiles = triton.cdiv(h * w, chunk)
    n_progs = min(n_tiles, POOL_PROGRAMS)
    _pool_block_gates_kernel[(b_sz, n_progs)](
        x, x.stride(0), x.stride(1), x.stride(2), x.stride(3), w, h * w, 1.0 / (h * w), n_tiles, n_progs, sums, done,
        *_gate_args(gate1, i1, s1, sal1), *_gate_args(gate2, i2, s2, sal2), counts, b_sz, c_in,
        CHUNK_P=chunk, **meta, num_warps=4,
    )
    return i1, s1, i2, s2, counts
