"""The one-class detector: a small YOLO-style, anchor-free, single-stage network.

Backbone: stride-2 stem, four stages of (dense stride-2 conv + gateable bottlenecks).
Neck: FPN top-down (Lin et al., CVPR 2017, Sec. 3) with one gateable bottleneck per level.
Head: one 1x1 convolution per level predicting class logits and FCOS-style side distances
(Tian et al., ICCV 2019). Any number of classes works; one is the point.
"""

from __future__ import annotations

import math
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from dynprune.boxes import decode_ltrb, make_anchor_points, postprocess
from dynprune.config import STRIDES, DetectorConfig
from dynprune.layers import Bottleneck, ConvBNAct


class Detector(nn.Module):
    """Anchor-free detector. ``forward`` returns ``(boxes xyxy (B,A,4), logits (B,A,C))``."""

    def __init__(self, cfg: DetectorConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.strides = STRIDES
        hidden = iter(cfg.hidden) if cfg.hidden else None

        def block(c: int) -> Bottleneck:
            if hidden is not None:
                h1, h2 = next(hidden)
            else:
                h1 = h2 = max(1, round(c * cfg.expansion))
            return Bottleneck(c, h1, h2)

        self.stem = ConvBNAct(3, cfg.stem, 3, 2)
        stages = []
        c_prev = cfg.stem
        for c, d in zip(cfg.widths, cfg.depths):
            stages.append(nn.Sequential(ConvBNAct(c_prev, c, 3, 2), *[block(c) for _ in range(d)]))
            c_prev = c
        self.stages = nn.ModuleList(stages)
        n = cfg.neck
        self.lateral = nn.ModuleList([ConvBNAct(c, n, 1) for c in cfg.widths[1:]])
        self.fpn_blocks = nn.ModuleList([block(n) for _ in STRIDES])
        self.pred = nn.ModuleList([nn.Conv2d(n, cfg.num_classes + 4, 1) for _ in STRIDES])
        prior = 0.01  # focal-loss prior (Lin et al., ICCV 2017, Sec. 4.1)
        for p in self.pred:
            nn.init.normal_(p.weight, std=0.01)
            nn.init.zeros_(p.bias)
            p.bias.data[: cfg.num_classes] = -math.log((1 - prior) / prior)
        self._anchor_cache: Dict[Tuple, Tuple[torch.Tensor, torch.Tensor]] = {}
        if cfg.hidden and next(hidden, None) is not None:
            raise ValueError("config.hidden lists more blocks than the architecture has")

    # -- structure -------------------------------------------------------------------------
    @property
    def blocks(self) -> List[Bottleneck]:
        """Every bottleneck in execution order: the gateable, prunable units."""
        return [m for m in self.modules() if isinstance(m, Bottleneck)]

    @property
    def gated(self) -> bool:
        return any(b.gated for b in self.blocks)

    def add_gates(self, reduction: int | None = None, group: int | None = None) -> None:
        """Attach a ManiDP gate to both hidden layers of every block."""
        reduction = reduction or self.cfg.gate_reduction
        group = group or self.cfg.gate_group
        self.cfg.gate_reduction, self.cfg.gate_group = reduction, group
        for b in self.blocks:
            b.add_gates(reduction, group)

    # -- forward ---------------------------------------------------------------------------
    def features(self, x: torch.Tensor) -> List[torch.Tensor]:
        """The three neck outputs (strides 8, 16, 32) before prediction."""
        x = self.stem(x)
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        c3, c4, c5 = feats[1:]
        p5 = self.lateral[2](c5)
        p4 = self.lateral[1](c4) + F.interpolate(p5, scale_factor=2.0, mode="nearest")
        p3 = self.lateral[0](c3) + F.interpolate(p4, scale_factor=2.0, mode="nearest")
        return [blk(p) for blk, p in zip(self.fpn_blocks, (p3, p4, p5))]

    def head(self, feats: List[torch.Tensor], imgsz: Tuple[int, int]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per-level 1x1 predictions -> decoded boxes and class logits over all anchors."""
        outs = [p(f).flatten(2) for p, f in zip(self.pred, feats)]
        out = torch.cat(outs, 2).transpose(1, 2)  # (B, A, C+4)
        logits, reg = out[..., : self.cfg.num_classes], out[..., self.cfg.num_classes :]
        points, strides = self.anchors(imgsz, out.device, out.dtype)
        return decode_ltrb(reg, points, strides), logits

    def anchors(self, imgsz: Tuple[int, int], device: torch.device, dtype: torch.dtype):
        key = (imgsz, device, dtype)
        if key not in self._anchor_cache:
            self._anchor_cache[key] = make_anchor_points(imgsz, self.strides, device, dtype)
        return self._anchor_cache[key]

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        h, w = x.shape[-2:]
        # The export traces a fixed, already checked size; the check would only warn there.
        if not torch.jit.is_tracing() and (h % 32 or w % 32):
            raise ValueError(f"input size {h}x{w} is not a multiple of 32")
        return self.head(self.features(x), (h, w))

    @torch.no_grad()
    def predict(self, x: torch.Tensor, conf: float = 0.25, iou: float = 0.6, max_det: int = 100):
        """Boxes in input pixels after NMS, one dict per image."""
        boxes, logits = self(x)
        return postprocess(boxes, logits.sigmoid(), conf, iou, max_det)


def build_detector(cfg: DetectorConfig) -> Detector:
    """Build a detector from a config (see :data:`dynprune.config.SIZES`)."""
    return Detector(cfg)
