"""Physical channel removal, and the zeroing that makes a full-size model behave like the slim one.

A hidden channel whose filter, BatchNorm weight and BatchNorm bias are zero outputs
SiLU(0) = 0, so the next convolution's matching input column contributes nothing: the
zeroed model and the slim model compute the same function (the tests check it).
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch

from dynprune.config import DetectorConfig
from dynprune.layers import Bottleneck
from dynprune.model import Detector

Keep = Sequence[Tuple[torch.Tensor, torch.Tensor]]


def _take_bn(dst: torch.nn.BatchNorm2d, src: torch.nn.BatchNorm2d, idx: torch.Tensor) -> None:
    for name in ("weight", "bias", "running_mean", "running_var"):
        getattr(dst, name).data.copy_(getattr(src, name).data[idx])


@torch.no_grad()
def slim_model(model: Detector, keep: Keep) -> Detector:
    """A new, smaller :class:`Detector` holding only the kept hidden channels of every block.

    It is an ordinary model: its config lists the hidden widths (``DetectorConfig.hidden``), so it
    loads from its checkpoint without any pruning code.
    """
    if model.gated:
        raise ValueError("static pruning works on dense models; prune the dense checkpoint")
    cfg = DetectorConfig.from_dict(model.cfg.to_dict())
    cfg.hidden = [[len(i1), len(i2)] for i1, i2 in keep]
    slim = Detector(cfg)
    src_state = model.state_dict()
    dst = slim.state_dict()
    block_names = {id(b): n for n, b in model.named_modules() if isinstance(b, Bottleneck)}
    handled = set()
    for b_src, b_dst, (i1, i2) in zip(model.blocks, slim.blocks, keep):
        prefix = block_names[id(b_src)]
        b_dst.cv1.conv.weight.copy_(b_src.cv1.conv.weight[i1])
        _take_bn(b_dst.cv1.bn, b_src.cv1.bn, i1)
        b_dst.cv2.conv.weight.copy_(b_src.cv2.conv.weight[i2][:, i1])
        _take_bn(b_dst.cv2.bn, b_src.cv2.bn, i2)
        b_dst.cv3.bn.load_state_dict(b_src.cv3.bn.state_dict())
        b_dst.cv3.conv.weight.copy_(b_src.cv3.conv.weight[:, i2])
        handled.update(k for k in dst if k.startswith(prefix + "."))
    rest = {k: v for k, v in src_state.items() if k not in handled}
    slim.load_state_dict({**slim.state_dict(), **rest}, strict=True)
    return slim.train(model.training)


def hidden_masks(model: Detector, keep: Keep) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """Boolean kept-masks per block from kept indices."""
    out = []
    for b, (i1, i2) in zip(model.blocks, keep):
        m1 = torch.zeros(b.h1, dtype=torch.bool)
        m2 = torch.zeros(b.h2, dtype=torch.bool)
        m1[i1] = True
        m2[i2] = True
        out.append((m1, m2))
    return out


@torch.no_grad()
def zero_filters(model: Detector, masks: Sequence[Tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Zero the filters and BatchNorm affine parameters of every channel whose mask is False."""
    for b, (m1, m2) in zip(model.blocks, masks):
        for layer, m in ((b.cv1, m1), (b.cv2, m2)):
            drop = (~m).to(layer.conv.weight.device)
            layer.conv.weight[drop] = 0
            layer.bn.weight[drop] = 0
            layer.bn.bias[drop] = 0
