"""Inference forms of the detector's layers: BatchNorm folded, one module per layer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dynprune.layers import ConvBNAct


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
