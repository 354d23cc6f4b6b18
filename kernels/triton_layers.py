"""The un-gated layers of the Triton backend: each convolution with its SiLU in one launch where
that is measured faster on this GPU, else as PyTorch runs it.

The stem, the stride-2 convolutions, the laterals and the predictions are not gated, and on a GPU
PyTorch runs each as a cuDNN convolution and then a separate SiLU kernel: one more pass over the
layer's output. On 132 SMs that pass is noise; on a Jetson's 8-16 SMs, where a pass over an 80x80
map is no longer free, fusing it into the convolution's epilogue may pay. Which form runs is the
layer's entry in the tuned tiles (:mod:`dynprune.kernels.conv_tiles`): cuDNN by default, the
Triton convolution (all channels in and out, SiLU fused) where ``dynprune tune`` found it faster.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from dynprune.fusion import FoldedBottleneck, FoldedConv, PointwiseConv


class TritonConv(nn.Module):
    """A :class:`~dynprune.fusion.FoldedConv` or :class:`~dynprune.fusion.PointwiseConv` of the
    Triton backend: the same BN-folded convolution (and SiLU), run through
    :func:`~dynprune.kernels.gather_conv.gather_conv2d_triton` with no kept lists, so that the tile
    table decides between cuDNN and a fused Triton launch per layer and GPU."""

    @staticmethod
    def replaces(module: nn.Module) -> bool:
        """Whether ``module`` is an un-gated layer this class runs: ungrouped, square, odd kernel."""
        if isinstance(module, PointwiseConv):
            return True
        if not isinstance(module, FoldedConv) or module.groups != 1:
            return False
        k = module.weight.shape[-1]
        return (module.weight.shape[-2] == k and k % 2 == 1 and module.padding in ((k // 2, k // 2), k // 2)
                and module.stride[0] == module.stride[1])

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        if not self.replaces(layer):
            raise ValueError(f"TritonConv runs an ungrouped square FoldedConv or a PointwiseConv, got {layer}")
        self.weight = nn.Parameter(layer.weight.detach().clone(), requires_grad=False)
        self.bias = nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
        folded = isinstance(layer, FoldedConv)
        self.stride = int(layer.stride[0]) if folded else 1
        self.padding = self.weight.shape[-1] // 2
        self.act: Optional[str] = "silu" if folded and layer.act else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from dynprune.kernels.gather_conv import gather_conv2d_triton

        return gather_conv2d_triton(x, self.weight, self.bias, None, None, None, None, self.stride, self.padding,
                                    self.act)

    def extra_repr(self) -> str:
        k = self.weight.shape[-1]
        return f"{self.weight.shape[1]}->{self.weight.shape[0]}, {k}x{k}/{self.stride}, act={self.act}"


def triton_layers(model: nn.Module) -> nn.Module:
    """In place: every un-gated layer :class:`TritonConv` runs becomes one, except the layers of an
    un-gated bottleneck (a :class:`~dynprune.fusion.FoldedBottleneck` reads its layers' weights
    itself)."""
    for module in list(model.modules()):
        if isinstance(module, FoldedBottleneck):
            continue
        for name, child in list(module.named_children()):
            if TritonConv.replaces(child):
                setattr(module, name, TritonConv(child))
    return model
