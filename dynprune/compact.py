"""Per-frame channel skipping for real: a gated detector executed on compact activations.

Each gated bottleneck computes its gates first (from the pooled block input), builds the
kept-channel index lists, and then runs

    cv1: rows keep1 of W1                       -> (keep1, H, W)   compact
    cv2: rows keep2, columns keep1 of W2        -> (keep2, H, W)   compact
    cv3: columns keep2 of W3, + residual        -> (C, H, W)       full width

with BatchNorm folded, the activation and the saliency scale fused after each conv. No
activation is ever scattered back to full width inside a block (docs/DESIGN.md, "Compact
activations"). The result equals the masked dense model (``mask = saliency * [saliency >= threshold]``) up to float
rounding; the tests check it.
"""

from __future__ import annotations

import copy
import math
import time
from typing import Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dynprune.fusion import (
    bottleneck_pixels,
    compiled_forward,
    fold_bottlenecks,
    fuse_conv_bn,
    image_pixels,
    pointwise_as_matmul,
    prepack_convolutions,
)
from dynprune.gates import Gate
from dynprune.layers import Bottleneck
from dynprune.model import Detector


class CompactBottleneck(nn.Module):
    """Inference-only replacement of a gated :class:`Bottleneck` that skips dropped channels.

    CPU path. On two cores a PyTorch op costs 5-15 us of overhead before any arithmetic (a
    slice or a view 3-8 us), and a block made of two dozen tiny ops cost as much as the
    convolutions it saved (measured: 0.8 ms for a 10x10 block whose dense form takes 0.6 ms).
    So everything small runs outside PyTorch, on NumPy views of the tensors: the pool, the
    gates' MLP (both gates as one: fc1 side by side, fc2 block-diagonal), the keep decision,
    the kept-index lists and the weight gathers, with each kept channel's saliency scale
    folded into the *next* layer's gathered weights instead of multiplying an activation map.
    For threshold gates that is one call of the compiled step
    (:mod:`dynprune.kernels.cpu_gate`); FBS's top-k, and any block where no compiler works,
    take the NumPy path (about 1 us a call), which is also the C step's reference in the
    tests. For one float32 image with the compiled step (every CPU serving and benchmark frame)
    the whole block is one compiled call (``fused``, :meth:`BlockPlan.forward
    <dynprune.kernels.cpu_gate.BlockPlan.forward>`): the step, then the three products on the kept
    channels with bias, SiLU and shortcut fused, 17% faster for the dynamic nano network than
    PyTorch's products (two cores, 320 px; BENCHMARKS.md). There the saliencies
    scale the activations inside the products, not the gathered weights, so a frame that keeps
    the last frame's channels reuses the last gather (on a video stream most blocks do, most
    frames: 5.6% off the demo's dynamic network on its video). Otherwise PyTorch runs
    the products: the 1x1 convolutions as matrix products on the channels-last pixels
    (``(H*W, C) @ (C, keep)``, bias inside ``addmm``, no oneDNN primitive to build for each new
    kept width), the 3x3 convolution, the two SiLUs and the residual add.

    ``pad_to = (pad1, pad2)``: gate 1's and gate 2's kept lists are padded to a multiple of
    that many slots with *zero-scaled* copies of a kept channel, because the libraries run some
    widths slower than a larger one. Gate 2's list is the 3x3's output width, and oneDNN runs
    one that is not a multiple of 8 slower than the next multiple of 8 (measured 80x80, 21
    input channels: 21 outputs 0.45 ms, 24 outputs 0.35 ms). Gate 1's list is the width of
    cv1's matrix product, which MKL runs slower when it leaves 3, 5, 6 or 7 over a multiple of 8
    (6400x32 @ 32xN: 23 columns 0.21 ms, 24 columns 0.13 ms), and the 3x3's input width, where
    no step shows (its time grows with the input channels, odd or not): so 4 there, not 8,
    which only added work to cv1, its SiLU and the 3x3 (the whole network 3% faster at a keep of
    0.50). A padded slot is computed but its scale is exactly 0, so the next layer adds exactly
    0 from it: the result is unchanged, and the per-frame accounting counts only real channels.
    """

    def __init__(self, block: Bottleneck, pad_to: int | Tuple[int, int] = (4, 8)) -> None:
        super().__init__()
        if not block.gated:
            raise ValueError("CompactBottleneck needs a gated block")
        pad_to = (pad_to, pad_to) if isinstance(pad_to, int) else tuple(pad_to)
        if len(pad_to) != 2 or min(pad_to) < 1:
            raise ValueError(f"pad_to must be one or two integers >= 1 (gate 1, gate 2), got {pad_to}")
        self.c, self.h1, self.h2 = block.c, block.h1, block.h2
        self.pad_to: Tuple[int, int] = pad_to
        self.gate1: Gate = copy.deepcopy(block.gate1)
        self.gate2: Gate = copy.deepcopy(block.gate2)
        for name, conv in (("1", block.cv1), ("2", block.cv2), ("3", block.cv3)):
            w, b = conv.fold()
            self.register_buffer(f"w{name}", w)
            self.register_buffer(f"b{name}", b)
        self.n_groups1 = self.gate1.groups
        self.lean = self.gate1.mode == self.gate2.mode == "threshold"
        self._np: Optional[Dict[str, np.ndarray | torch.Tensor]] = None
        # The compiled gate step (threshold gates only; FBS's top-k stays in NumPy). Set
        # use_native = False before the first call to run the NumPy reference path instead.
        self.use_native = True
        self._native = None
        self._pool_rows: Dict[int, np.ndarray] = {}
        # Per-frame state lives in one-slot lists that the forward pass writes into, not in
        # attributes it sets: nn.Module.__setattr__ costs a microsecond on a quiet core and several
        # inside the running network (see forward). Read them as ``last_kept`` and ``gate_ms``.
        self._kept: list = [None]
        self._gate_ms = [0.0]
        self.profile = False  # time the gates (serving reports them apart from the network)
        # Views of the compiled step's output buffers for one count of kept channels and slots
        # (the key: the step's four counts as bytes), made on the first frame with those counts.
        # Bounded by the counts a block can have; a few hundred bytes of views each.
        self._views: Dict[bytes, tuple] = {}
        # The whole block as one compiled call (``BlockPlan.forward``) where the step is compiled;
        # False runs the step, then PyTorch's products (the path the tests compare it with).
        self.fused = True
        self._counts: Dict[bytes, np.ndarray] = {}  # the kept-count array for each key of counts

    @property
    def last_kept(self) -> Optional[np.ndarray | torch.Tensor]:
        """``(B, 2)`` kept channels of both gates in the last forward pass, for per-frame
        accounting: a NumPy array on the CPU (``torch.tensor`` costs 10 us a call; one conversion
        per frame in ``CompactDetector.kept_counts`` serves all blocks), a device tensor for
        Triton. On the CPU with batch 1 the same array is returned for every frame that keeps the
        same counts: read it, do not write to it."""
        return self._kept[0]

    @last_kept.setter
    def last_kept(self, value: Optional[np.ndarray | torch.Tensor]) -> None:
        self._kept[0] = value

    @property
    def gate_ms(self) -> float:
        """Milliseconds spent in the gate step since last reset (with ``profile`` on)."""
        return self._gate_ms[0]

    @gate_ms.setter
    def gate_ms(self, value: float) -> None:
        self._gate_ms[0] = float(value)

    @property
    def np(self) -> Dict[str, np.ndarray | torch.Tensor]:
        """NumPy copies of the gates' MLP and the folded weights (W2 stays a torch tensor, for
        ``index_select``), built on the first CPU call (a Triton instance lives on the GPU and
        never needs them)."""
        if self._np is None:
            g1, g2 = self.gate1, self.gate2
            hid1 = g1.fc1.out_features
            fc2 = torch.zeros(g1.groups + g2.groups, hid1 + g2.fc1.out_features)
            fc2[: g1.groups, :hid1] = g1.fc2.weight.detach().cpu()
            fc2[g1.groups :, hid1:] = g2.fc2.weight.detach().cpu()

            def arr(t: torch.Tensor) -> np.ndarray:
                return t.detach().cpu().float().contiguous().numpy().copy()

            # Both gates as one MLP: fc1 side by side, fc2 block-diagonal. The 1x1 weights as
            # rows: kept outputs of cv1 are rows of W1 (C_out, C_in), kept inputs of cv3 rows of
            # W3^T (C_in, C_out). A row gather copies contiguous memory (a column gather strides
            # through all of it).
            self._np = {
                "fc1_t": arr(torch.cat([g1.fc1.weight, g2.fc1.weight]).t()),
                "fc2_t": arr(fc2.t()),
                "fc2_b": arr(torch.cat([g1.fc2.bias, g2.fc2.bias])),
                # One (h1 + h2, C + 1) table, so that one ``take`` per frame gathers everything
                # the 1x1 layers need: rows of W1 with b1 beside them, then rows of W3^T with b2
                # beside them (b2 belongs to the 3x3, whose output channels are W3's inputs).
                "rows": arr(torch.cat([torch.cat([self.w1.flatten(1), self.b1[:, None]], 1),
                                       torch.cat([self.w3.flatten(1).t(), self.b2[:, None]], 1)])),
                # (torch: index_select on it runs 2-3x faster than NumPy's fancy indexing over
                # two axes; measured 0.15 vs 0.41 ms for 256x256x3x3 keeping 121x98)
                "w2": self.w2.detach().cpu().float().contiguous(),
                "w2_ohwi": arr(self.w2.permute(0, 2, 3, 1)),
            }
            if self.lean:
                # saliency >= threshold and > 0 as one comparison: a zero threshold becomes the
                # smallest positive float
                thresholds = torch.cat([g1.threshold.expand(g1.groups), g2.threshold.expand(g2.groups)])
                self._np["thresholds"] = np.maximum(arr(thresholds), np.finfo(np.float32).tiny)
            self._native = self._native_plan(arr(g1.fc2.weight.t()), arr(g2.fc2.weight.t())) if self.lean else None
        return self._np

    def _apply(self, fn, recurse: bool = True):
        # .to(), .float(), ...: the NumPy copies, the compiled step and its views hold the old
        # weights; they are remade on the next call.
        self._np, self._native = None, None
        self._views, self._counts = {}, {}
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict:
        # The NumPy copies and the compiled step's buffers are caches, rebuilt on the next call
        # (and ctypes pointers cannot be copied or pickled).
        state = dict(self.__dict__)
        state["_np"], state["_native"], state["_views"], state["_counts"] = None, None, {}, {}
        return state

    def _native_plan(self, fc2a_t: np.ndarray, fc2b_t: np.ndarray):
        """The compiled gate step (:mod:`dynprune.kernels.cpu_gate`) for this block, or ``None``
        where it cannot be built or ``use_native`` is off (then the NumPy path runs)."""
        if not self.use_native:
            return None
        from dynprune.kernels.cpu_gate import BlockPlan, native_library

        lib = native_library()
        if lib is None:
            return None
        p = self._np
        return BlockPlan(lib, fc1_t=p["fc1_t"], fc2a_t=fc2a_t, fc2b_t=fc2b_t, fc2_b=p["fc2_b"],
                         thresholds=p["thresholds"], rows=p["rows"], w2_ohwi=p["w2_ohwi"],
                         groups=(self.gate1.groups, self.gate2.groups),
                         group_sizes=(self.gate1.group, self.gate2.group), pad_to=self.pad_to,
                         b3=self.b3.detach().cpu().float().numpy())

    def pool_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """Global average pool ``(B, C)`` of the block input's ``(B, H*W, C)`` pixels, as a NumPy
        vector-matrix product with a cached ``1/HW`` row (measured 29 us against 36 us for
        ``Tensor.mean`` at 80x80x32; the pool runs once per block and frame)."""
        hw = pixels.shape[1]
        row = self._pool_rows.get(hw)
        if row is None:
            row = self._pool_rows[hw] = np.full(hw, 1.0 / hw, dtype=np.float32)
        if pixels.shape[0] == 1:  # a 2-D product: BLAS's vector-matrix kernel
            return (row @ pixels[0])[None]
        return row @ pixels

    def gather_w2(self, idx2: np.ndarray, idx1: np.ndarray, scale1: np.ndarray) -> torch.Tensor:
        """Rows ``idx2``, columns ``idx1`` of the folded 3x3 weight, each column scaled by its
        channel's saliency ``scale1``: ``(keep2, keep1, 3, 3)``.

        Small layers gather in NumPy (two ``take`` and an in-place multiply, about a
        microsecond of overhead each, where each torch call costs 5-8 us) from an OHWI copy. Large ones use one
        torch ``index_select`` over the flattened ``(C_out * C_in, 9)`` view with the outer-sum
        index, which reads only the kept taps (256x256 keeping 128x104: 185 us against 423 us
        for two selects and 442 us for NumPy)."""
        w2 = self.np["w2"]
        if w2.shape[0] * w2.shape[1] < 1 << 15:
            # From an OHWI copy: the result is a channels-last weight, which oneDNN convolves
            # NHWC input with 2-5% faster than OIHW (measured 10x10 to 80x80, 16-104 channels).
            out = self.np["w2_ohwi"].take(idx2, axis=0).take(idx1, axis=3)
            out *= scale1
            return torch.from_numpy(out).permute(0, 3, 1, 2)
        flat = (idx2[:, None] * w2.shape[1] + idx1[None, :]).ravel()
        out = w2.view(-1, w2.shape[2] * w2.shape[3]).index_select(0, torch.from_numpy(flat))
        return out.view(idx2.size, idx1.size, w2.shape[2], w2.shape[3]).mul_(torch.from_numpy(scale1[:, None, None]))

    def saliency(self, pooled: np.ndarray):
        """Per-group saliency and keep decision of both gates from the pooled block input
        ``(B, C)``: ``(saliency, keep)``, NumPy arrays ``(B, groups1 + groups2)``, gate 1 first."""
        p = self.np
        s = np.maximum(pooled @ p["fc1_t"], 0) @ p["fc2_t"]
        s += p["fc2_b"]
        np.maximum(s, 0, out=s)
        if self.lean:  # ManiDP: saliency >= threshold (and > 0), both gates in one comparison
            return s, s >= p["thresholds"]
        g1 = self.n_groups1
        return s, np.concatenate([_group_keep(self.gate1, s[:, :g1]), _group_keep(self.gate2, s[:, g1:])], 1)

    def _plan(self, keep: np.ndarray, saliency: np.ndarray):
        """One image's gathers for both gates: ``(rows, scale, slots1, kept1, kept2)``.

        ``rows`` indexes the ``rows`` table: gate 1's kept channels padded to ``slots1``, then
        ``h1 +`` gate 2's kept channels, padded too; ``scale`` is each slot's saliency (0 for
        padding). With per-channel gates the keep vector already numbers gate 2's channel ``j``
        as ``h1 + j``, so one ``nonzero`` serves both gates (this runs for every block of every
        frame, and each NumPy call costs a microsecond or more)."""
        g1, (pad1, pad2) = self.n_groups1, self.pad_to
        if self.gate1.group == self.gate2.group == 1:
            kept_all = keep.nonzero()[0]
            kept1 = int(np.count_nonzero(keep[:g1]))
            kept2 = kept_all.size - kept1
            slots1 = kept1 + (-kept1 % pad1)
            end2 = slots1 + kept2
            rows = np.empty(end2 + (-kept2 % pad2), dtype=np.int64)
            scale = np.zeros(rows.size, dtype=np.float32)
            kept_scale = saliency.take(kept_all)
            rows[:kept1], scale[:kept1] = kept_all[:kept1], kept_scale[:kept1]
            rows[slots1:end2], scale[slots1:end2] = kept_all[kept1:], kept_scale[kept1:]
            if kept1:  # zero-scaled copies of a kept channel (see the class docstring)
                rows[kept1:slots1] = kept_all[0]
            if kept2:
                rows[end2:] = kept_all[kept1]
            return rows, scale, slots1, kept1, kept2
        idx1, scale1, kept1 = self._slots(keep[:g1], saliency[:g1], self.gate1.group, self.h1, pad1)
        idx2, scale2, kept2 = self._slots(keep[g1:], saliency[g1:], self.gate2.group, self.h2, pad2)
        return np.concatenate((idx1, idx2 + self.h1)), np.concatenate((scale1, scale2)), idx1.size, kept1, kept2

    def _slots(self, keep: np.ndarray, saliency: np.ndarray, group: int, width: int, pad_to: int):
        """``(index, scale, kept)`` of one image's kept channels, padded to ``pad_to`` slots."""
        groups = np.flatnonzero(keep)
        if group == 1:
            index = groups
        else:
            index = (groups[:, None] * group + np.arange(group)).ravel()
            index = index[index < width]
        kept = index.size
        pad = -kept % pad_to
        scale = saliency.take(index // group if group > 1 else index)
        if pad:  # zero-scaled copies of the first kept channel (see the class docstring)
            index = np.concatenate((index, np.full(pad, index[0])))
            scale = np.concatenate((scale, np.zeros(pad, dtype=scale.dtype)))
        return index, scale, kept

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One float32 image with the compiled step (every CPU serving and benchmark frame): the lean
        # path. It makes no check that the NumPy conversion does not make for free, builds nothing
        # that an earlier frame with the same kept counts built (the views of the step's buffers),
        # and sets no attribute: inside the running network each Python operation costs several
        # times its cost on its own (see :func:`~dynprune.fusion.bottleneck_pixels`). Measured on
        # two cores, nano at 320 (BENCHMARKS.md): the dynamic network 5% faster than
        # with the per-image loop below, the same output bit for bit.
        if self._np is None:
            self.np  # noqa: B018 (builds the NumPy copies and the compiled step)
        native = self._native
        nhwc = image_pixels(x) if native is not None else None
        if nhwc is None:
            return self._forward_each(x)
        h, w, c = nhwc.shape
        if self.fused and native.fused:  # the whole block in one compiled call
            out, key = compiled_forward(native, x, h, w, c)
            kept = self._counts.get(key)
            if kept is None:
                kept = self._counts[key] = np.frombuffer(key, dtype=np.int64)[None, :2].copy()
            self._kept[0] = kept
            if self.profile:
                self._gate_ms[0] += native.gate_seconds[0] * 1e3
            return out
        hw = h * w
        xi = torch.from_numpy(nhwc.reshape(hw, c))  # (H*W, C), the block input's pixels
        if self.profile:
            t0 = time.perf_counter()
            key = native.step(xi.data_ptr(), hw)
            self._gate_ms[0] += (time.perf_counter() - t0) * 1e3
        else:
            key = native.step(xi.data_ptr(), hw)
        views = self._views.get(key)
        if views is None:
            views = self._views[key] = self._step_views(key, c)
        kept, n1, n2, b1, w1_t, w2, b2, w3_t, b3 = views
        self._kept[0] = kept
        if n1 and n2:
            return bottleneck_pixels(xi, h, w, b1, w1_t, w2, b2, w3_t, b3)
        return _block_without_3x3(xi, h, w, n2, b2, w3_t, b3)

    def _step_views(self, key: bytes, c: int) -> tuple:
        """What the lean path reads from the compiled step's buffers for one set of counts
        ``key``: the kept-count array, the counts, and torch views of the gathered weights. The
        buffers are rewritten by every call, so the views read that call's weights."""
        native = self._native
        n1, n2, slots1, slots2 = np.frombuffer(key, dtype=np.int64).tolist()
        rows = native.rows_out[: slots1 + slots2]
        w2 = native.w2(slots1, slots2).transpose(0, 3, 1, 2) if n1 and n2 else np.zeros((0, 0, 1, 1), np.float32)
        return (np.array([[n1, n2]], dtype=np.int64), n1, n2,
                torch.from_numpy(rows[:slots1, c]), torch.from_numpy(rows[:slots1, :c].T), torch.from_numpy(w2),
                torch.from_numpy(rows[slots1:, c]),  # b2: a strided view; conv2d takes it as it is
                torch.from_numpy(rows[slots1:, :c]), self.b3)

    def _forward_each(self, x: torch.Tensor) -> torch.Tensor:
        """Any batch, image by image, with the compiled step or the NumPy one."""
        if x.device.type != "cpu" or x.dtype != torch.float32:
            raise ValueError(f"CompactBottleneck runs float32 on the CPU (got {x.dtype} on {x.device}); "
                             "use the Triton backend on a GPU")
        t0 = time.perf_counter() if self.profile else 0.0
        b, c, h, w = x.shape
        hw = h * w
        # Small array work goes through NumPy views: a torch slice or view costs 3-8 us of
        # dispatch on two cores, a NumPy one under 1 us, and a block makes dozens of them.
        if not x.is_contiguous(memory_format=torch.channels_last):
            x = x.contiguous(memory_format=torch.channels_last)
        pixels = (x.detach() if x.requires_grad else x).numpy().transpose(0, 2, 3, 1).reshape(b, hw, c)
        p = self.np
        native = self._native
        if native is None:
            saliency, keep = self.saliency(self.pool_pixels(pixels))
            table = p["rows"]
        if self.profile:
            self.gate_ms += (time.perf_counter() - t0) * 1e3
        out = np.empty((b, h, w, c), dtype=np.float32) if b > 1 else None
        kept = np.empty((b, 2), dtype=np.int64)
        for i in range(b):  # each image keeps its own channel set
            xi = torch.from_numpy(pixels[i])  # (H*W, C), the block input's pixels
            if native is not None:  # pool, gates, kept lists and gathers in one compiled call
                t0 = time.perf_counter() if self.profile else 0.0
                n1, n2, slots1, slots2 = native(xi.data_ptr(), hw)
                rows = native.rows_out[: slots1 + slots2]
                if self.profile:
                    self.gate_ms += (time.perf_counter() - t0) * 1e3
            else:
                index, scale, slots1, n1, n2 = self._plan(keep[i], saliency[i])
                rows = table.take(index, axis=0)  # W1 | b1 rows, then W3^T | b2 rows: one gather
                rows[slots1:, :c] *= scale[slots1:, None]  # scale 2 folded into W3's rows (not into b2)
            kept[i] = n1, n2
            w3_t = torch.from_numpy(rows[slots1:, :c])  # a strided view: BLAS reads it in place
            b2 = torch.from_numpy(rows[slots1:, c])  # strided too; conv2d takes it as it is
            if n1 and n2:
                if native is not None:  # OHWI, scale 1 folded in
                    w2 = torch.from_numpy(native.w2(slots1, slots2).transpose(0, 3, 1, 2))
                else:
                    w2 = self.gather_w2(index[slots1:] - self.h1, index[:slots1], scale[:slots1])  # scale 1 in
                yi = bottleneck_pixels(xi, h, w, torch.from_numpy(rows[:slots1, c]),
                                       torch.from_numpy(rows[:slots1, :c].T), w2, b2, w3_t, self.b3)
            else:
                yi = _block_without_3x3(xi, h, w, n2, b2, w3_t, self.b3)
            if b == 1:
                out = yi
            else:  # (1, C, H, W) in channels-last memory: its NumPy pixels are (H, W, C)
                out[i] = yi.numpy()[0].transpose(1, 2, 0)
        self.last_kept = kept
        # NCHW shape, channels-last memory, made in NumPy (one torch call instead of two views)
        return out if b == 1 else torch.from_numpy(out.transpose(0, 3, 1, 2))


def _block_without_3x3(xi: torch.Tensor, h: int, w: int, n2: int, b2: torch.Tensor, w3_t: torch.Tensor,
                       b3: torch.Tensor) -> torch.Tensor:
    """A compact block whose gate 1 or gate 2 keeps nothing, on one image's ``(H*W, C)`` pixels:
    NCHW-shaped, channels-last, as :func:`~dynprune.fusion.bottleneck_pixels` returns."""
    if n2:  # a 3x3 over zeros is its bias at every pixel: the block adds a constant
        y = xi + torch.addmm(b3, F.silu(b2)[None], w3_t)
    else:  # nothing reaches the output projection: shortcut plus bias
        y = xi + b3
    return torch.from_numpy(y.numpy().reshape(1, h, w, -1).transpose(0, 3, 1, 2))


def _group_keep(gate: Gate, saliency: np.ndarray) -> np.ndarray:
    """NumPy twin of :meth:`Gate.group_keep` (same decisions, for the CPU path)."""
    if gate.mode == "threshold":
        return (saliency >= float(gate.threshold)) & (saliency > 0)
    if gate.mode == "topk":
        k = max(1, math.ceil(gate.keep_ratio * gate.groups))
        kth = np.partition(saliency, gate.groups - k, axis=1)[:, gate.groups - k : gate.groups - k + 1]
        return (saliency >= kth) & (saliency > 0)
    return np.ones(saliency.shape, dtype=bool)


class TritonCompactBottleneck(CompactBottleneck):
    """The same block on the GPU with no host synchronisation: index lists and kept counts are
    built and consumed on the device, buffers are full width, and each convolution is one Triton
    launch with BN bias, SiLU, the saliency scale and (last) the residual add fused in."""

    #: averaging rows by (pixels, dtype, device), shared by every block of every engine
    _averaging: Dict[tuple, torch.Tensor] = {}
    #: let the 3x3 and the output 1x1 read group gates' kept lists a run at a time (``in_run``);
    #: the GPU benchmark turns it off to measure what it gains
    use_runs: bool = True
    #: pool the block input inside the gates' kernel (one launch) instead of a matrix-vector
    #: product before it; the GPU benchmark turns it off to measure what it gains
    fuse_pool: bool = True

    def __init__(self, block: Bottleneck, pad_to: int | Tuple[int, int] = (4, 8)) -> None:
        super().__init__(block, pad_to)
        self._pool_workspace: Dict[tuple, Tuple[torch.Tensor, torch.Tensor]] = {}

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_pool_workspace"] = {}  # device buffers, remade on the next call
        return state

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
        if self.backend == "torch":  # the CPU blocks: compiled C where a compiler works
            from dynprune.kernels.cpu_gate import native_library

            lib = native_library()
            if lib is None:
                self.gate_step = "NumPy (products in PyTorch)"
            else:  # what the serving log and bench say ran
                built = "for this CPU" if lib.native else "for the baseline"
                self.gate_step = f"compiled C, whole blocks in {int(lib.dp_vector_floats())}-float vectors, {built}"
        else:
            self.gate_step = "Triton"
        block_cls = TritonCompactBottleneck if self.backend == "triton" else CompactBottleneck
        net = copy.deepcopy(model).eval()
        # Swap every gated bottleneck for its compact twin, then fold the remaining BNs.
        for _, module in list(net.named_modules()):
            for child_name, child in list(module.named_children()):
                if isinstance(child, Bottleneck) and child.gated:
                    setattr(module, child_name, block_cls(child))
        # The un-gated layers (stem, stride-2 convolutions, laterals, predictions) as in
        # DenseInference: the same code runs in both, so the comparison measures the gated blocks.
        self.net = prepack_convolutions(pointwise_as_matmul(fold_bottlenecks(fuse_conv_bn(net))))
        self.blocks = [m for m in self.net.modules() if isinstance(m, CompactBottleneck)]
        # channels_last on both backends. CPU: oneDNN runs odd channel counts far better in NHWC
        # (measured 3x3 at 40x40, 31->33 channels: 1.02 ms NCHW, 0.66 ms NHWC), and compact widths
        # are odd more often than not. GPU: cuDNN's fp16 convolutions of the un-gated layers are
        # NHWC-native (dense nano at 640 in a CUDA graph on the H100: 0.488 ms NCHW, 0.387 ms
        # NHWC), and the Triton kernels read and write either layout through strides.
        self.net.to(memory_format=torch.channels_last)
        if self.backend == "triton":
            from dynprune.kernels.gather_conv import weight_layout_for, with_layout

            for blk in self.blocks:
                blk.w1 = with_layout(blk.w1, weight_layout_for(1))
                blk.w2 = with_layout(blk.w2, weight_layout_for(3))
                blk.w3 = with_layout(blk.w3, weight_layout_for(1))

    def forward(self, x: torch.Tensor):
        return self.net(x.contiguous(memory_format=torch.channels_last))

    def kept_counts(self) -> torch.Tensor:
        """``(B, blocks, 2)`` kept hidden channels of the last call (on the device for Triton)."""
        return torch.stack([torch.as_tensor(b.last_kept) for b in self.blocks], 1)


class DenseInference(nn.Module):
    """The fastest PyTorch form of a dense (or statically pruned) model: BN folded into one
    :class:`~dynprune.fusion.FoldedConv` per layer, channels_last (on the CPU as fast or faster for
    every layer shape measured; on the H100 in fp16 the nano detector takes 0.387 ms in a CUDA graph
    NHWC against 0.489 ms NCHW), and on the CPU the 1x1 convolutions as matrix products, the other
    convolutions on oneDNN weights made once with the SiLU fused
    (:func:`~dynprune.fusion.prepack_convolutions`: 8-10% off the dense nano network at 320 px on two
    cores), and each bottleneck as one :class:`~dynprune.fusion.FoldedBottleneck` call, as the
    compact blocks run theirs (the same code, :func:`~dynprune.fusion.bottleneck_pixels`). So a
    dense-against-dynamic comparison measures the skipped channels against the fastest dense form
    found, not against a slower wrapper."""

    def __init__(self, model: Detector) -> None:
        super().__init__()
        net = fold_bottlenecks(fuse_conv_bn(copy.deepcopy(model).eval()))
        self.net = prepack_convolutions(pointwise_as_matmul(net))
        self.net.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor):
        return self.net(x.contiguous(memory_format=torch.channels_last))


def dense_inference_model(model: Detector) -> DenseInference:
    return DenseInference(model)
