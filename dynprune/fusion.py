"""Fold every BatchNorm into its convolution for inference (no change in output)."""

from __future__ import annotations

import torch
from torch import nn

from dynprune.layers import ConvBNAct


@torch.no_grad()
def fuse_conv_bn(model: nn.Module) -> nn.Module:
    """In place: each :class:`ConvBNAct` becomes a biased convolution and an identity BN."""
    for m in model.modules():
        if isinstance(m, ConvBNAct) and isinstance(m.bn, nn.BatchNorm2d):
            w, b = m.fold()
            conv = nn.Conv2d(m.conv.in_channels, m.conv.out_channels, m.conv.kernel_size, m.conv.stride,
                             m.conv.padding, bias=True).to(w.device, w.dtype)
            conv.weight.copy_(w)
            conv.bias.copy_(b)
            m.conv, m.bn = conv, nn.Identity()
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
        if x.device.type != "cpu" or not x.is_contiguous(memory_format=torch.channels_last):
            return nn.functional.conv2d(x, self.weight, self.bias)
        b, c, h, w = x.shape
        pixels = x.permute(0, 2, 3, 1).reshape(b * h * w, c)  # a view of NHWC memory
        out = torch.addmm(self.bias, pixels, self.weight.view(-1, c).t())
        return out.view(b, h, w, -1).permute(0, 3, 1, 2)  # NCHW shape, channels-last memory


def pointwise_as_matmul(model: nn.Module) -> nn.Module:
    """In place: every biased 1x1 stride-1 convolution becomes a :class:`PointwiseConv`."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if PointwiseConv.replaces(child):
                setattr(module, name, PointwiseConv(child))
    return model
