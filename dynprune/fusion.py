"""Inference forms of the detector's layers: BatchNorm folded, one module per layer."""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dynprune.layers import Bottleneck, ConvBNAct

_silu_ = torch._C._nn.silu_  # F.silu(inplace=True) without its Python wrapper


def _pointwise(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """A biased 1x1 stride-1 convolution: one ``addmm`` over the pixels of channels-last CPU input,
    the convolution itself elsewhere (a GPU, NCHW memory)."""
    if x.device.type != "cpu" or not x.is_contiguous(memory_format=torch.channels_last):
        return F.conv2d(x, weight, bias)
    b, c, h, w = x.shape
    pixels = x.permute(0, 2, 3, 1).reshape(b * h * w, c)  # a view of NHWC memory
    out = torch.addmm(bias, pixels, weight.view(-1, c).t())
    return out.view(b, h, w, -1).permute(0, 3, 1, 2)  # NCHW shape, channels-last memory


class FoldedConv(nn.Module):
    """A :class:`~dynprune.layers.ConvBNAct` for inference: BatchNorm folded into the convolution's
    weight and bias, the SiLU applied in place, all in one module.

    Why one module: a PyTorch module call costs a few microseconds on a small CPU, and a
    ``ConvBNAct`` makes three (convolution, identity BN, SiLU) for each of the nano detector's 35
    layers. Measured on the raccoon nano models at 320 px on two cores, the old and new forms
    interleaved in one process, in both orders (BENCHMARKS.md, session 13): the dense model 3.5-7.6%
    faster a frame, the dynamic one 0-2% (its compact blocks do not use this class), the same
    outputs bit for bit.

    ``matmul=True`` (set by :func:`pointwise_as_matmul`) runs a 1x1 stride-1 layer as an
    ``addmm`` on channels-last CPU input, as :class:`PointwiseConv` does.
    """

    def __init__(self, layer: ConvBNAct) -> None:
        super().__init__()
        conv = layer.conv
        weight, bias = layer.fold()  # new tensors, outside autograd
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = nn.Parameter(bias, requires_grad=False)
        self.stride, self.padding, self.groups = conv.stride, conv.padding, conv.groups
        self.act = isinstance(layer.act, nn.SiLU)
        self.pointwise = conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.groups == 1
        self.matmul = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.matmul:
            y = _pointwise(x, self.weight, self.bias)
        else:
            y = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, 1, self.groups)
        return F.silu(y, inplace=True) if self.act else y

    def extra_repr(self) -> str:
        o, i, kh, kw = self.weight.shape
        return f"{i}, {o}, kernel_size=({kh}, {kw}), stride={self.stride}, act={self.act}, matmul={self.matmul}"


@torch.no_grad()
def fuse_conv_bn(model: nn.Module) -> nn.Module:
    """In place: each :class:`ConvBNAct` becomes a :class:`FoldedConv` (no change in output)."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, ConvBNAct):
                setattr(module, name, FoldedConv(child))
    return model


class PointwiseConv(nn.Module):
    """A biased 1x1 convolution that runs as one ``addmm`` over channels-last pixels on the CPU.

    oneDNN's 1x1 convolution is slower than a plain matrix product at the detector's shapes on
    two AVX2 cores (measured at 80x80, 32->32: 307 us against 222 us; the dense nano network at
    320: 27.5 ms against 26.8 ms). Elsewhere (a GPU, NCHW memory, a stride) it is the
    convolution it replaces, so the CUDA path keeps cuDNN and its measured timings.
    """

    @staticmethod
    def replaces(module: nn.Module) -> bool:
        """Whether ``module`` is a convolution this class stands in for."""
        return (isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and module.stride == (1, 1)
                and module.groups == 1 and module.bias is not None)

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        if not self.replaces(conv):
            raise ValueError(f"PointwiseConv replaces a biased 1x1, stride-1, ungrouped convolution, got {conv}")
        self.weight = nn.Parameter(conv.weight.detach().clone(), requires_grad=False)
        self.bias = nn.Parameter(conv.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _pointwise(x, self.weight, self.bias)


def pointwise_as_matmul(model: nn.Module) -> nn.Module:
    """In place: every biased 1x1 stride-1 convolution becomes a :class:`PointwiseConv`, and every
    1x1 stride-1 :class:`FoldedConv` runs as a matrix product on the CPU."""
    for module in list(model.modules()):
        if isinstance(module, FoldedConv):
            module.matmul = module.pointwise
        for name, child in list(module.named_children()):
            if PointwiseConv.replaces(child):
                setattr(module, name, PointwiseConv(child))
    return model


def image_pixels(x: torch.Tensor) -> Optional[np.ndarray]:
    """One float32 CPU image in channels-last memory as its ``(H, W, C)`` NumPy pixels (a view),
    or ``None`` for anything else: a batch, another dtype or device, NCHW memory, a tensor that
    needs grad. The checks are the NumPy conversion's own and its array's flags, which cost far
    less inside a running network than asking the tensor (see :func:`bottleneck_pixels`)."""
    try:
        nhwc = x.numpy().transpose(0, 2, 3, 1)  # raises for a GPU tensor or one that needs grad
    except (TypeError, RuntimeError):
        return None
    if nhwc.shape[0] != 1 or nhwc.dtype != np.float32 or not nhwc.flags.c_contiguous:
        return None
    return nhwc[0]


def bottleneck_pixels(xi: torch.Tensor, h: int, w: int, b1: torch.Tensor, w1_t: torch.Tensor, w2: torch.Tensor,
                      b2: torch.Tensor, w3_t: torch.Tensor, b3: torch.Tensor) -> torch.Tensor:
    """A residual bottleneck on one image's channels-last pixels ``xi`` ``(H*W, C)``, BN folded:
    ``xi + silu(conv3x3(silu(xi @ w1_t + b1), w2) + b2) @ w3_t + b3``, returned NCHW-shaped in
    channels-last memory. The dense blocks (:class:`FoldedBottleneck`) and the compact ones
    (gathered weights, :class:`~dynprune.compact.CompactBottleneck`) both run it.

    Why so few calls, each a plain op or a NumPy view: inside the running network every Python
    statement costs several times what it costs in a loop on its own (most likely cold caches after
    each convolution). Measured on two cores with real block inputs (BENCHMARKS.md, session 14):
    ``x.device``/``x.dtype`` checks add 7 us to a block, a fresh kept-count array and a module
    attribute set 14 us, where timeit gives 0.5 and 2.3 us.
    """
    hw = h * w
    y = _silu_(torch.addmm(b1, xi, w1_t)).numpy().reshape(1, h, w, -1).transpose(0, 3, 1, 2)
    y = _silu_(torch.conv2d(torch.from_numpy(y), w2, b2, 1, 1))  # channels-last map
    y = torch.addmm(b3, torch.from_numpy(y.numpy().transpose(0, 2, 3, 1).reshape(hw, -1)), w3_t).add_(xi)
    # NCHW shape, channels-last memory, made in NumPy (one torch call instead of two views)
    return torch.from_numpy(y.numpy().reshape(1, h, w, xi.shape[1]).transpose(0, 3, 1, 2))


class FoldedBottleneck(nn.Module):
    """An un-gated :class:`~dynprune.layers.Bottleneck` for inference: its three layers as
    :class:`FoldedConv` and, for one float32 image in channels-last memory on the CPU, the block as
    one :func:`bottleneck_pixels` call on cached weight views (2-3% off the dense nano network at
    320 px on two cores, BENCHMARKS.md session 14, the same output bit for bit). Anything else (a
    batch, a GPU, half precision) runs the three layers and the add as the block does.
    """

    def __init__(self, block: Bottleneck) -> None:
        super().__init__()
        if block.gated:
            raise ValueError("FoldedBottleneck is the inference form of an un-gated block")
        self.c, self.h1, self.h2 = block.c, block.h1, block.h2
        self.cv1, self.cv2, self.cv3 = (c if isinstance(c, FoldedConv) else FoldedConv(c)
                                        for c in (block.cv1, block.cv2, block.cv3))
        self._weights: Optional[Tuple[torch.Tensor, ...]] = None

    def _apply(self, fn, recurse: bool = True):
        self._weights = None  # views of the old tensors: remade on the next call
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = self._weights
        if weights is None:
            weights = self._weights = self._pixel_weights()
        nhwc = image_pixels(x) if weights else None
        if nhwc is None:
            return x + self.cv3(self.cv2(self.cv1(x)))
        h, w, c = nhwc.shape
        return bottleneck_pixels(torch.from_numpy(nhwc.reshape(h * w, c)), h, w, *weights)

    def _pixel_weights(self) -> Tuple[torch.Tensor, ...]:
        """The arguments of :func:`bottleneck_pixels` after the pixels, as views of the layers'
        weights; empty where the weights are not float32 on the CPU (the layers run as they are)."""
        cv1, cv2, cv3 = self.cv1, self.cv2, self.cv3
        if cv1.weight.device.type != "cpu" or cv1.weight.dtype != torch.float32:
            return ()
        return (cv1.bias, cv1.weight.view(self.h1, self.c).t(), cv2.weight, cv2.bias,
                cv3.weight.view(self.c, self.h2).t(), cv3.bias)


def fold_bottlenecks(model: nn.Module) -> nn.Module:
    """In place: every un-gated :class:`~dynprune.layers.Bottleneck` becomes a
    :class:`FoldedBottleneck` (BatchNorm folded; no change in output)."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, Bottleneck) and not child.gated:
                setattr(module, name, FoldedBottleneck(child))
    return model
