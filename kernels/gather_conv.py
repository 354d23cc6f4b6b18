"""Triton gather convolutions: implicit GEMM over the kept channels only.

Structure after PyTorch Inductor's Triton convolution template (torch/_inductor/kernel/
conv.py): one program computes a BLOCK_M (output pixels) x BLOCK_N (output channels) tile,
looping over the kernel window and the input channels. Here the input-channel range is a
*loaded index list*: the loop runs over the ``in_count[b]`` kept channels of image ``b``
only, reading their compact planes and the matching columns of the full weight tensor
(never copied per frame). Output tiles past ``out_count[b]`` return at once, so the grid
is sized for the full width and no count ever travels to the host: the whole dynamic
forward captures into one CUDA graph.

Epilogue: folded-BN bias, SiLU, the gate's saliency scale, and (for a block's output
projection) the residual add into the full-width stream.

Group gates keep whole aligned groups of 8 or 16 channels. Told so (``in_run``/``out_run``),
the kernel compares masks run by run and marks the index lists contiguous in runs, and its
activation and weight loads and compact stores become 16-byte vectors instead of 2-byte
gathers (docs/DESIGN.md, "The GPU path").
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from dynprune.kernels import conv_tiles
from dynprune.kernels.reference import conv_output_hw


@triton.jit
def _bias_act_scale(acc, b_ptr, channel, slot, ok, scale_row_ptr,
                    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, HAS_SCALE: tl.constexpr):
    """The epilogue both kernels share: folded-BN bias (by channel), SiLU, saliency scale (by slot)."""
    if HAS_BIAS:
        acc += tl.load(b_ptr + channel, mask=ok, other=0.0).to(tl.float32)[None, :]
    if ACT == 1:
        acc = acc * tl.sigmoid(acc)  # SiLU
    if HAS_SCALE:
        acc *= tl.load(scale_row_ptr + slot, mask=ok, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _input_slots(idx_row_ptr, k0, n_in, IN_DENSE: tl.constexpr, IN_RUN: tl.constexpr, BLOCK_K: tl.constexpr):
    """Input slots ``k0 .. k0 + BLOCK_K`` of one image: the slots (where the compact input holds
    them), the channels they are (the weight's columns) and which are kept."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    k_ok = offs_k < n_in
    if IN_RUN > 1:
        # Group gates keep whole aligned groups, so the kept list is runs of IN_RUN consecutive
        # channels and the count a multiple of IN_RUN. Said to the compiler (the hints, and a
        # mask compared run by run), the activation and weight loads can be 16-byte vectors;
        # with a per-slot mask they are 2-byte loads (docs/DESIGN.md, "The GPU path").
        k_ok = (offs_k // IN_RUN) * IN_RUN < n_in
        ic = tl.load(idx_row_ptr + offs_k, mask=k_ok, other=0)
        ic = tl.max_contiguous(tl.multiple_of(ic, IN_RUN), IN_RUN)
    elif IN_DENSE:
        ic = offs_k
    else:
        ic = tl.load(idx_row_ptr + offs_k, mask=k_ok, other=0)
    return offs_k, ic, k_ok


@triton.jit
def _gather_conv_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr, scale_ptr, res_ptr,
    in_idx_ptr, in_cnt_ptr, out_idx_ptr, out_cnt_ptr,
    C_IN_FULL, C_OUT_FULL, H, W, HO, WO,
    sxb, sxc, sxh, sxw,
    swo, swi, swh, sww,
    sob, soc, soh, sow,
    srb, src, srh, srw,
    STRIDE: tl.constexpr, PAD: tl.constexpr, K: tl.constexpr,
    IN_DENSE: tl.constexpr, OUT_DENSE: tl.constexpr, IN_RUN: tl.constexpr, OUT_RUN: tl.constexpr,
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_RES: tl.constexpr,
    DOT_PRECISION: tl.constexpr, FLAT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = tl.program_id(2)
    if OUT_DENSE:
        n_out = C_OUT_FULL
    else:
        n_out = tl.load(out_cnt_ptr + b)
    if pid_n * BLOCK_N >= n_out:
        return  # a tile past the kept count: nothing to do, no host ever needed to know
    if IN_DENSE:
        n_in = C_IN_FULL
    else:
        n_in = tl.load(in_cnt_ptr + b)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # output pixels
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # output slots
    m_ok = offs_m < HO * WO
    if OUT_RUN > 1:  # whole runs, as IN_RUN below: the epilogue's loads and the stores may vectorize
        n_ok = (offs_n // OUT_RUN) * OUT_RUN < n_out
    else:
        n_ok = offs_n < n_out
    oh = offs_m // WO
    ow = offs_m % WO
    if OUT_DENSE:
        oc = offs_n
    else:
        oc = tl.load(out_idx_ptr + b * C_OUT_FULL + offs_n, mask=n_ok, other=0)
        if OUT_RUN > 1:
            oc = tl.max_contiguous(tl.multiple_of(oc, OUT_RUN), OUT_RUN)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if FLAT:
        # The k x k taps and the input-slot steps in one loop, as an implicit GEMM's reduction
        # (taps x channels) runs in cuDNN: with 32-64 input channels the slot loop alone has one or
        # two steps, too short for software pipelining (num_stages) to overlap the next tiles'
        # loads with this product; this loop has nine times as many. The index slice is reloaded
        # per tap (an L1 hit).
        n_steps = tl.cdiv(n_in, BLOCK_K)
        for t in range(0, K * K * n_steps):
            tap = t // n_steps
            k0 = (t - tap * n_steps) * BLOCK_K
            kh = tap // K
            kw = tap - kh * K
            ih = oh * STRIDE - PAD + kh
            iw = ow * STRIDE - PAD + kw
            pix_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            offs_k, ic, k_ok = _input_slots(in_idx_ptr + b * C_IN_FULL, k0, n_in, IN_DENSE, IN_RUN, BLOCK_K)
            a = tl.load(x_ptr + b * sxb + offs_k[None, :] * sxc + ih[:, None] * sxh + iw[:, None] * sxw,
                        mask=pix_ok[:, None] & k_ok[None, :], other=0.0)
            wt = tl.load(w_ptr + oc[None, :] * swo + ic[:, None] * swi + kh * swh + kw * sww,
                         mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc += tl.dot(a, wt, input_precision=DOT_PRECISION)
    else:
        # Input slots outside, the k x k taps inside: each slice of the index list is loaded once
        # for all taps, not K*K times; the loop body holds K*K products.
        for k0 in range(0, n_in, BLOCK_K):
            offs_k, ic, k_ok = _input_slots(in_idx_ptr + b * C_IN_FULL, k0, n_in, IN_DENSE, IN_RUN, BLOCK_K)
            for kh in tl.static_range(K):
                for kw in tl.static_range(K):
                    ih = oh * STRIDE - PAD + kh
                    iw = ow * STRIDE - PAD + kw
                    pix_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                    a = tl.load(x_ptr + b * sxb + offs_k[None, :] * sxc + ih[:, None] * sxh + iw[:, None] * sxw,
                                mask=pix_ok[:, None] & k_ok[None, :], other=0.0)
                    wt = tl.load(w_ptr + oc[None, :] * swo + ic[:, None] * swi + kh * swh + kw * sww,
                                 mask=k_ok[:, None] & n_ok[None, :], other=0.0)
                    acc += tl.dot(a, wt, input_precision=DOT_PRECISION)

    acc = _bias_act_scale(acc, b_ptr, oc, offs_n, n_ok, scale_ptr + b * C_OUT_FULL, HAS_BIAS, ACT, HAS_SCALE)
    mask = m_ok[:, None] & n_ok[None, :]
    if HAS_RES:
        acc += tl.load(res_ptr + b * srb + oc[None, :] * src + oh[:, None] * srh + ow[:, None] * srw,
                       mask=mask, other=0.0).to(tl.float32)
    if OUT_DENSE:
        out_c = oc
    else:
        out_c = offs_n  # compact output: kept channels packed in slot order
    tl.store(out_ptr + b * sob + out_c[None, :] * soc + oh[:, None] * soh + ow[:, None] * sow,
             acc.to(out_ptr.dtype.element_ty), mask=mask)


_ACTS = {None: 0, "silu": 1}


#: How the runtime stores a k x k layer's weights for the kernel (the kernel reads any strides):
#: "oihw" (PyTorch's), "ohwi" (channels_last: a tile's input channels contiguous) or "hwio"
#: (a tile's output channels contiguous).
WEIGHT_LAYOUTS = ("oihw", "ohwi", "hwio")


def weight_layout_for(k: int) -> str:
    """The layout :func:`with_layout` gives a ``k x k`` layer's weights in the runtime (the sweep:
    "ohwi" won on the 128- and 256-channel 3x3 layers, where the time is; for 1x1 all coincide)."""
    return "ohwi" if k > 1 else "oihw"


def with_layout(weight: torch.Tensor, layout: str) -> torch.Tensor:
    """The same (C_out, C_in, KH, KW) tensor with its elements stored in ``layout`` order."""
    if layout == "oihw":
        return weight.contiguous()
    if layout == "ohwi":
        return weight.contiguous(memory_format=torch.channels_last)
    if layout == "hwio":
        return weight.permute(2, 3, 1, 0).contiguous().permute(3, 2, 0, 1)
    raise ValueError(f"unknown weight layout {layout!r}; choose one of {WEIGHT_LAYOUTS}")


def is_channels_last(x: torch.Tensor) -> bool:
    return x.dim() == 4 and x.shape[1] > 1 and x.stride(1) == 1


def empty_like_layout(x: torch.Tensor, shape: tuple) -> torch.Tensor:
    """An uninitialised activation of ``shape`` in ``x``'s memory layout (NCHW or NHWC): the
    kernels index through strides, so a channels_last network stays channels_last."""
    fmt = torch.channels_last if is_channels_last(x) else torch.contiguous_format
    return torch.empty(shape, device=x.device, dtype=x.dtype, memory_format=fmt)


def _cudnn_form(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: int, padding: int,
                act: Optional[str], scale: Optional[torch.Tensor], residual: Optional[torch.Tensor],
                unlisted: bool) -> torch.Tensor:
    """An un-gated layer as PyTorch runs it: the convolution (cuDNN on a GPU), then the residual
    add and the SiLU in place."""
    if not unlisted or scale is not None:
        raise ValueError("the cuDNN form runs un-gated layers only (no kept lists, no saliency scale)")
    y = torch.nn.functional.conv2d(x, weight, bias, stride, padding)
    if residual is not None:
        y += residual
    if _check_act(act):
        torch.nn.functional.silu(y, inplace=True)
    return y


def _check_act(act: Optional[str]) -> int:
    if act not in _ACTS:
        raise ValueError(f"Triton gather conv supports activations {list(_ACTS)}, got {act!r}")
    return _ACTS[act]


def _check_run(name: str, run: int, listed: bool, side: str, tile_name: str, tile: int, width: int) -> None:
    """A run length promise is only kept by a kept list, in powers of two dividing the tile and the width."""
    if run > 1 and (not listed or run & (run - 1) or tile % run or width % run):
        raise ValueError(f"{name}={run} needs a kept {side} list, a power of two that divides {tile_name} "
                         f"({tile}) and the {side} width ({width})")


def gather_conv2d_triton(
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
    block_m: Optional[int] = None,
    block_n: Optional[int] = None,
    block_k: Optional[int] = None,
    num_warps: Optional[int] = None,
    num_stages: Optional[int] = None,
    in_run: int = 1,
    out_run: int = 1,
    flat: Optional[int] = None,
    tile: Optional[conv_tiles.Tile] = None,
) -> torch.Tensor:
    """Same contract as :func:`dynprune.kernels.reference.gather_conv2d_padded`, in one launch.

    ``x``, ``out``, ``residual`` and ``weight`` may have any strides (NCHW or NHWC activations,
    any of :data:`WEIGHT_LAYOUTS`): the kernel indexes through them. The tile (``block_*``,
    ``num_warps``, ``num_stages``, ``flat``) defaults to the one tuned for this layer on this
    GPU at the SMs in use, else to the shape's default (:mod:`dynprune.kernels.conv_tiles`); a
    whole ``tile`` given replaces it, and any of the single values given overrides that.

    An un-gated layer (no kept lists: ``in_index`` and ``out_index`` ``None``, no ``scale``) runs
    on cuDNN with a separate SiLU unless tuning found a Triton tile faster (its default is
    :data:`~dynprune.kernels.conv_tiles.CUDNN`); that form returns a new tensor and leaves ``out``
    alone.

    ``in_run``: a promise that the kept input list is made of aligned runs of ``in_run``
    consecutive channels (slot ``r * in_run + j`` holds channel ``in_index[r * in_run] + j``,
    and each count is a multiple of it), as group gates of that group size produce. The kernel
    then loads the activations and weights as contiguous vectors. ``out_run``: the same promise
    for the kept output list (the epilogue and the compact stores vectorize).
    """
    b_sz, c_in_full, h, w = x.shape
    c_out, _, k, _ = weight.shape
    ho, wo = conv_output_hw(h, w, k, stride, padding)
    if residual is not None and out_index is not None:
        raise ValueError("the residual epilogue writes full width: pass out_index=None")
    in_dense, out_dense = in_index is None, out_index is None
    key = conv_tiles.LayerKey(c_out, c_in_full, k, stride, ho, wo, b_sz, conv_tiles.dtype_name(x.dtype),
                              not in_dense, not out_dense, in_run, out_run, residual is not None)
    calls = conv_tiles.recorder()
    if calls is not None:  # dynprune tune: this call, to be run again with other tiles
        if out is None:
            out = empty_like_layout(x, (b_sz, c_out, ho, wo))
        same = dict(stride=stride, padding=padding, act=act, scale=scale, residual=residual, in_run=in_run,
                    out_run=out_run)
        calls.append(conv_tiles.RecordedCall(key, lambda tile_, out_: gather_conv2d_triton(
            x, weight, bias, in_index, in_count, out_index, out_count, out=out_, tile=tile_, **same), out))
    tile = tile or conv_tiles.tile_for(key, x.device)
    given = {"block_m": block_m, "block_n": block_n, "block_k": block_k, "num_warps": num_warps,
             "num_stages": num_stages, "flat": flat}
    if any(v is not None for v in given.values()):
        tile = {**tile, **{f: v for f, v in given.items() if v is not None}}
    if conv_tiles.is_cudnn(tile):
        return _cudnn_form(x, weight, bias, stride, padding, act, scale, residual, in_dense and out_dense)
    if out is None:
        out = empty_like_layout(x, (b_sz, c_out, ho, wo))
    block_m, block_n, block_k = tile["block_m"], tile["block_n"], tile["block_k"]
    _check_run("in_run", in_run, not in_dense, "input", "block_k", block_k, c_in_full)
    _check_run("out_run", out_run, not out_dense, "output", "block_n", block_n, c_out)
    dummy = weight  # any tensor, for pointer arguments a constexpr flag disables
    res = residual if residual is not None else out
    grid = (triton.cdiv(ho * wo, block_m), triton.cdiv(c_out, block_n), b_sz)
    _gather_conv_kernel[grid](
        x, weight, bias if bias is not None else dummy, out, scale if scale is not None else dummy, res,
        in_index if not in_dense else dummy, in_count if not in_dense else dummy,
        out_index if not out_dense else dummy, out_count if not out_dense else dummy,
        c_in_full if not in_dense else weight.shape[1], c_out, h, w, ho, wo,
        *x.stride(), *weight.stride(), *out.stride(), *res.stride(),
        STRIDE=stride, PAD=padding, K=k, IN_DENSE=in_dense, OUT_DENSE=out_dense, IN_RUN=in_run, OUT_RUN=out_run,
        HAS_BIAS=bias is not None, ACT=_check_act(act), HAS_SCALE=scale is not None,
        HAS_RES=residual is not None,
        # fp32 in, fp32 arithmetic: Triton's default for an fp32 dot is TF32 (~3e-4 relative
        # error), and the fp32 path promises 1e-5. fp16 operands ignore it.
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        FLAT=bool(tile["flat"]) and k > 1,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=tile["num_warps"],
        num_stages=tile["num_stages"],
    )
    return out
