"""Inference forms of the detector's layers: BatchNorm folded, one module per layer."""

from __future__ import annotations

import logging
import time
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dynprune.kernels.cpu_blocks import DenseBlockKernel, compiled_forward, compiled_library, image_pixels
from dynprune.layers import Bottleneck, ConvBNAct

log = logging.getLogger(__name__)

_silu_ = torch._C._nn.silu_  # F.silu(inplace=True) without its Python wrapper
# oneDNN's convolution with a fused activation, on a weight reordered once into its own layout
# (PyTorch's eager conv2d reorders the weight on every call); the op TorchInductor uses on the CPU.
try:
    _conv_pointwise = torch.ops.mkldnn._convolution_pointwise
except (AttributeError, RuntimeError):  # a PyTorch build without it: the convolutions stay conv2d
    _conv_pointwise = None
_UNIT = [1, 1]


def _pointwise(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """A biased 1x1 stride-1 convolution: one ``addmm`` over the pixels of channels-last CPU input,
    the convolution itself elsewhere (a GPU, NCHW memory)."""
    if x.device.type != "cpu" or not x.is_contiguous(memory_format=torch.channels_last):
        return F.conv2d(x, weight, bias)
    b, c, h, w = x.shape
    pixels = x.permute(0, 2, 3, 1).reshape(b * h * w, c)  # a view of NHWC memory
    out = torch.addmm(bias, pixels, weight.view(-1, c).t())
    return out.view(b, h, w, -1).permute(0, 3, 1, 2)  # NCHW shape, channels-last memory


class FormTrials:
    """Which of a layer's one-image forms to run, per input size: each runs in turn on the first
    calls of a size and is timed, ``frames`` times each, then the faster by median is kept in
    ``chosen`` (its index in the forms). The layers read ``chosen`` themselves on every call (a
    dict lookup; see :func:`bottleneck_pixels` on what more costs inside the network) and call
    :meth:`run` only until the choice is made. Timing on the machine itself, like
    ``torch.backends.cudnn.benchmark``: which form wins depends on the CPU and the layer's shape
    (BENCHMARKS.md)."""

    def __init__(self, frames: int = 3) -> None:
        self.frames = frames
        self.trials: Dict[Tuple[int, ...], list] = {}  # per input size: seconds of each form so far
        self.chosen: Dict[Tuple[int, ...], int] = {}

    def run(self, key: Tuple[int, ...], forms: Tuple[Callable[[], torch.Tensor], ...]) -> torch.Tensor:
        """Run the form with the fewest trials for ``key`` so far, timed; with one form, keep it."""
        if len(forms) == 1:
            self.chosen[key] = 0
            return forms[0]()
        times = self.trials.setdefault(key, [[] for _ in forms])
        k = min(range(len(forms)), key=lambda i: len(times[i]))
        start = time.perf_counter()
        out = forms[k]()
        times[k].append(time.perf_counter() - start)
        if min(len(t) for t in times) >= self.frames:
            self.chosen[key] = int(np.argmin([np.median(t) for t in times]))
        return out

    def clear(self) -> None:
        self.trials, self.chosen = {}, {}


class FoldedConv(nn.Module):
    """A :class:`~dynprune.layers.ConvBNAct` for inference: BatchNorm folded into the convolution's
    weight and bias, the SiLU applied in place, all in one module.

    Why one module: a PyTorch module call costs a few microseconds on a small CPU, and a
    ``ConvBNAct`` makes three (convolution, identity BN, SiLU) for each of the nano detector's 35
    layers. Measured on the raccoon nano models at 320 px on two cores, the old and new forms
    interleaved in one process, in both orders (BENCHMARKS.md): the dense model 3.5-7.6%
    faster a frame, the dynamic one 0-2% (its compact blocks do not use this class), the same
    outputs bit for bit.

    ``matmul=True`` (set by :func:`pointwise_as_matmul`) runs a 1x1 stride-1 layer as an
    ``addmm`` on channels-last CPU input, as :class:`PointwiseConv` does.

    ``prepack=True`` (set by :func:`prepack_convolutions`) runs any other layer, on float32 CPU
    input, as oneDNN's convolution with the SiLU fused, on a weight reordered into oneDNN's layout
    on the first call and kept (:func:`packed_conv_weight`). Where that cannot be done (a GPU, half
    precision, a PyTorch without oneDNN) the layer runs as ``conv2d`` + SiLU.
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
        self.prepack = False
        self._packed: Optional[torch.Tensor | bool] = None  # None: not tried yet; False: cannot be had

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.matmul:
            y = _pointwise(x, self.weight, self.bias)
        else:
            packed = self._packed
            if packed is None and self.prepack:
                packed = self.packed_weight(x.shape, x)
            if packed is not None and packed is not False and not x.requires_grad:  # (no autograd kernel)
                return _conv_pointwise(x, packed, self.bias, self.padding, self.stride, _UNIT, self.groups,
                                       "swish" if self.act else "none", [], "")
            y = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, 1, self.groups)
        return F.silu(y, inplace=True) if self.act else y

    def packed_weight(self, input_size: Tuple[int, ...], x: Optional[torch.Tensor] = None) -> torch.Tensor | bool:
        """The weight in oneDNN's layout for inputs like ``input_size`` (made once and kept; it
        serves other sizes too), or ``False`` where it cannot be had for ``x`` (or, without ``x``,
        for float32 CPU input)."""
        if self._packed is None:
            self._packed = packed_conv_weight(self.weight, self.padding, self.stride, self.groups, input_size, x)
        return self._packed

    def _apply(self, fn, recurse: bool = True):
        self._packed = None  # made from the old weight: remade on the next call
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_packed"] = None  # an opaque oneDNN tensor cannot be copied or pickled; remade on use
        return state

    def extra_repr(self) -> str:
        o, i, kh, kw = self.weight.shape
        return f"{i}, {o}, kernel_size=({kh}, {kw}), stride={self.stride}, act={self.act}, matmul={self.matmul}"


_prepack_failure_logged = False


def packed_conv_weight(weight: torch.Tensor, padding, stride, groups: int, input_size: Tuple[int, ...],
                       x: Optional[torch.Tensor] = None) -> torch.Tensor | bool:
    """``weight`` reordered once into oneDNN's layout for a convolution with inputs like
    ``input_size``, or ``False`` where oneDNN cannot run it: a GPU or non-float32 weight or input
    ``x``, or a PyTorch built without oneDNN (said once in the log).

    Why: PyTorch's eager ``conv2d`` on the CPU reorders the weight into oneDNN's layout on every
    call; reordered once, with the SiLU fused into the convolution, the dense network runs faster.
    The compact blocks' gathered weights change every frame and cannot be kept so.
    """
    global _prepack_failure_logged
    for t in (weight,) if x is None else (weight, x):
        if t.device.type != "cpu" or t.dtype != torch.float32:
            return False
    try:
        if _conv_pointwise is None:
            raise RuntimeError("torch.ops.mkldnn._convolution_pointwise is missing")
        return torch._C._nn.mkldnn_reorder_conv2d_weight(weight.detach().to_mkldnn(), list(padding), list(stride),
                                                         _UNIT, groups, list(input_size))
    except (AttributeError, RuntimeError, NotImplementedError) as err:  # no oneDNN in this PyTorch build
        if not _prepack_failure_logged:
            _prepack_failure_logged = True
            log.info("oneDNN weight prepacking unavailable (%s); convolutions run as conv2d", str(err).splitlines()[0])
        return False


def prepack_convolutions(model: nn.Module) -> nn.Module:
    """In place: every :class:`FoldedConv` that is not a matrix product runs on a oneDNN weight
    made once, with its SiLU fused, where its input is float32 on the CPU (see
    :func:`packed_conv_weight`)."""
    for module in model.modules():
        if isinstance(module, FoldedConv):
            module.prepack = not module.matmul
    return model


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
    small CPUs. Elsewhere (a GPU, NCHW memory, a stride) it is the
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


def bottleneck_pixels(xi: torch.Tensor, h: int, w: int, b1: torch.Tensor, w1_t: torch.Tensor, w2: torch.Tensor,
                      b2: torch.Tensor, w3_t: torch.Tensor, b3: torch.Tensor) -> torch.Tensor:
    """A residual bottleneck on one image's channels-last pixels ``xi`` ``(H*W, C)``, BN folded:
    ``xi + silu(conv3x3(silu(xi @ w1_t + b1), w2) + b2) @ w3_t + b3``, returned NCHW-shaped in
    channels-last memory. ``w2`` is a plain weight or one in oneDNN's layout. The dense blocks
    (:class:`FoldedBottleneck`) run it where it measures faster than their compiled form.

    Why so few calls, each a plain op or a NumPy view: inside the running network every Python
    statement costs several times what it costs in a loop on its own (docs/DESIGN.md, "The CPU
    path").
    """
    hw = h * w
    y = torch.from_numpy(_silu_(torch.addmm(b1, xi, w1_t)).numpy().reshape(1, h, w, -1).transpose(0, 3, 1, 2))
    if w2.is_mkldnn:  # a dense block's weight in oneDNN's layout, made once (FoldedConv.packed_weight)
        y = _conv_pointwise(y, w2, b2, _UNIT, _UNIT, _UNIT, 1, "swish", [], "")
    else:
        y = _silu_(torch.conv2d(y, w2, b2, 1, 1))  # channels-last map
    y = torch.addmm(b3, torch.from_numpy(y.numpy().transpose(0, 2, 3, 1).reshape(hw, -1)), w3_t).add_(xi)
    # NCHW shape, channels-last memory, made in NumPy (one torch call instead of two views)
    return torch.from_numpy(y.numpy().reshape(1, h, w, xi.shape[1]).transpose(0, 3, 1, 2))


class FoldedBottleneck(nn.Module):
    """An un-gated :class:`~dynprune.layers.Bottleneck` for inference: its three layers as
    :class:`FoldedConv`. For one float32 image in channels-last memory on the CPU, the block runs
    as one call of whichever is faster: the compiled block of the compact path on every channel
    (:class:`~dynprune.kernels.cpu_blocks.DenseBlockKernel`, where a C compiler works)
    or :func:`bottleneck_pixels` on cached weight views, the 3x3 on oneDNN. Each block measures
    both on its first frames of each input size (:class:`FormTrials`) and keeps the faster one,
    so the dense network is the fastest dense form found whatever the CPU. Anything else (a batch, a GPU, half
    precision) runs the three layers and the add as the block does.
    """

    def __init__(self, block: Bottleneck) -> None:
        super().__init__()
        if block.gated:
            raise ValueError("FoldedBottleneck is the inference form of an un-gated block")
        self.c, self.h1, self.h2 = block.c, block.h1, block.h2
        self.cv1, self.cv2, self.cv3 = (c if isinstance(c, FoldedConv) else FoldedConv(c)
                                        for c in (block.cv1, block.cv2, block.cv3))
        self._weights: Optional[Tuple[torch.Tensor, ...]] = None
        self.allow_compiled = True  # may the compiled block run (False: always bottleneck_pixels)
        self._kernel = None  # the compiled block, made on the first call (False: cannot be had)
        self._forms = FormTrials()  # per input size: 0 bottleneck_pixels, 1 the compiled block

    def _apply(self, fn, recurse: bool = True):
        self._weights = self._kernel = None  # views or copies of the old tensors: remade on the next call
        self._forms.clear()
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        # a oneDNN weight and the compiled block's pointers cannot be copied; remade on use
        state["_weights"], state["_kernel"], state["_forms"] = None, None, FormTrials(self._forms.frames)
        return state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = self._weights
        if weights is None:
            weights = self._weights = self._pixel_weights(x.shape)
        nhwc = image_pixels(x) if weights else None
        if nhwc is None:
            return x + self.cv3(self.cv2(self.cv1(x)))
        h, w, c = nhwc.shape
        form = self._forms.chosen.get((h, w))
        if form is None:  # the first frames of this input size: time both forms
            kernel = self._compiled_kernel()
            forms = (lambda: bottleneck_pixels(torch.from_numpy(nhwc.reshape(h * w, c)), h, w, *weights),)
            if kernel is not None:
                forms += (lambda: compiled_forward(kernel, x, h, w, c)[0],)
            return self._forms.run((h, w), forms)
        if form:
            return compiled_forward(self._kernel, x, h, w, c)[0]
        return bottleneck_pixels(torch.from_numpy(nhwc.reshape(h * w, c)), h, w, *weights)

    def _compiled_kernel(self):
        """The compiled block (:class:`~dynprune.kernels.cpu_blocks.DenseBlockKernel`), or ``None``
        where ``allow_compiled`` is off or no C compiler works."""
        if self._kernel is None:
            self._kernel = False
            if self.allow_compiled:
                lib = compiled_library()
                if lib is not None:
                    self._kernel = DenseBlockKernel(
                        lib, w1=_array(self.cv1.weight.view(self.h1, self.c)), b1=_array(self.cv1.bias),
                        w2=_array(self.cv2.weight), b2=_array(self.cv2.bias),
                        w3=_array(self.cv3.weight.view(self.c, self.h2)), b3=_array(self.cv3.bias))
        return self._kernel or None

    def _pixel_weights(self, input_size: Tuple[int, ...]) -> Tuple[torch.Tensor, ...]:
        """The arguments of :func:`bottleneck_pixels` after the pixels: views of the layers'
        weights, the 3x3's in oneDNN's layout where ``cv2.prepack`` is set; empty where the weights
        are not float32 on the CPU (the layers then run as they are)."""
        cv1, cv2, cv3 = self.cv1, self.cv2, self.cv3
        if cv1.weight.device.type != "cpu" or cv1.weight.dtype != torch.float32:
            return ()
        w2 = cv2.packed_weight((1, self.h1, *input_size[2:])) if cv2.prepack else False
        return (cv1.bias, cv1.weight.view(self.h1, self.c).t(), cv2.weight if w2 is False else w2, cv2.bias,
                cv3.weight.view(self.c, self.h2).t(), cv3.bias)


def _array(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().contiguous().numpy()


def fold_bottlenecks(model: nn.Module) -> nn.Module:
    """In place: every un-gated :class:`~dynprune.layers.Bottleneck` becomes a
    :class:`FoldedBottleneck` (BatchNorm folded; no change in output)."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, Bottleneck) and not child.gated:
                setattr(module, name, FoldedBottleneck(child))
    return model
