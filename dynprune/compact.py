"""A gated detector executed on compact activations, and the fastest dense form to compare it with.

:class:`CompactDetector` swaps every gated bottleneck for a :class:`~dynprune.kernels.block.CompactBlock`
of one backend (chosen by :func:`~dynprune.kernels.dispatch.select_backend`), which computes only
the channels its gates keep (docs/DESIGN.md, "Compact activations"); the un-gated layers run as in
:class:`DenseInference`. The result equals the masked dense model (``mask = saliency * [saliency
>= threshold]``) up to float rounding; the tests check it for every backend.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from dynprune.fusion import fold_bottlenecks, fuse_conv_bn, pointwise_as_matmul, prepack_convolutions
from dynprune.kernels.block import CompactBlock
from dynprune.kernels.dispatch import block_class, select_backend
from dynprune.layers import Bottleneck
from dynprune.model import Detector


class CompactDetector(nn.Module):
    """A gated :class:`Detector` whose gated blocks run on compact activations.

    ``forward`` has the detector's contract; :meth:`kept_counts` gives the ``(B, blocks, 2)``
    kept channels of the last call. ``backend`` (``auto``, ``triton``, ``cpu``, ``reference``)
    goes to :func:`~dynprune.kernels.dispatch.select_backend`; :attr:`backend_reason` says what
    runs and why, :attr:`device` where.
    """

    def __init__(self, model: Detector, backend: str = "auto", device: torch.device | str | None = None) -> None:
        super().__init__()
        if not model.gated:
            raise ValueError("CompactDetector needs a gated model (dynprune gate)")
        device = torch.device(device) if device is not None else next(model.parameters()).device
        gated = [b for b in model.blocks if b.gated]
        self.backend, self.backend_reason = select_backend(device, backend, gated)
        # Only Triton runs the blocks on a GPU: the other backends run where the compiled blocks
        # do, on the CPU (the caller reads ``device`` to feed it).
        self.device = device if self.backend == "triton" or device.type == "cpu" else torch.device("cpu")
        block_cls = block_class(self.backend)
        net = copy.deepcopy(model).to(self.device).eval()
        # Swap every gated bottleneck for its compact twin, then fold the remaining BNs.
        for _, module in list(net.named_modules()):
            for child_name, child in list(module.named_children()):
                if isinstance(child, Bottleneck) and child.gated:
                    setattr(module, child_name, block_cls(child))
        # The un-gated layers (stem, stride-2 convolutions, laterals, predictions) as in
        # DenseInference: the same code runs in both, so the comparison measures the gated blocks.
        self.net = prepack_convolutions(pointwise_as_matmul(fold_bottlenecks(fuse_conv_bn(net))))
        self.blocks = [m for m in self.net.modules() if isinstance(m, CompactBlock)]
        # channels_last on both backends. CPU: oneDNN runs odd channel counts far better in NHWC
        # (measured 3x3 at 40x40, 31->33 channels: 1.02 ms NCHW, 0.66 ms NHWC), and compact widths
        # are odd more often than not. GPU: cuDNN's fp16 convolutions of the un-gated layers are
        # NHWC-native (dense nano at 640 in a CUDA graph on the H100: 0.488 ms NCHW, 0.387 ms
        # NHWC), and the Triton kernels read and write either layout through strides.
        if self.backend == "triton":
            # The un-gated layers too go through the gather convolution's entry point, so the tuned
            # tiles decide per layer whether cuDNN or a launch with the SiLU fused runs them
            # (kernels/triton_layers.py); cuDNN, as in DenseInference, until tuning says otherwise.
            from dynprune.kernels.triton_layers import triton_layers

            triton_layers(self.net)
        self.net.to(memory_format=torch.channels_last)
        for blk in self.blocks:
            blk.prepare()

    def forward(self, x: torch.Tensor):
        return self.net(x.contiguous(memory_format=torch.channels_last))

    def kept_counts(self) -> torch.Tensor:
        """``(B, blocks, 2)`` kept hidden channels of the last call (on the device for Triton)."""
        return torch.stack([torch.as_tensor(b.last_kept) for b in self.blocks], 1)


class DenseInference(nn.Module):
    """The fastest PyTorch form of a dense (or statically pruned) model: BN folded into one
    :class:`~dynprune.fusion.FoldedConv` per layer, channels_last (faster on the CPU and for cuDNN's
    fp16 convolutions), and on the CPU the 1x1 convolutions as matrix products, the other
    convolutions on oneDNN weights made once with the SiLU fused
    (:func:`~dynprune.fusion.prepack_convolutions`), and each bottleneck as one
    :class:`~dynprune.fusion.FoldedBottleneck` call. So a dense-against-dynamic comparison measures
    the skipped channels against the fastest dense form found, not against a slower wrapper
    (docs/DESIGN.md, "The CPU path")."""

    def __init__(self, model: Detector) -> None:
        super().__init__()
        net = fold_bottlenecks(fuse_conv_bn(copy.deepcopy(model).eval()))
        self.net = prepack_convolutions(pointwise_as_matmul(net))
        self.net.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor):
        return self.net(x.contiguous(memory_format=torch.channels_last))


def dense_inference_model(model: Detector) -> DenseInference:
    return DenseInference(model)
