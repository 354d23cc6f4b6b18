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
