"""Detection loss with a per-image value, which ManiDP uses as the instance complexity.

Assignment: FCOS (Tian et al., ICCV 2019, Sec. 3.2-3.3): a cell is positive for a box that
contains it, lies within ``radius`` strides of the box centre (centre sampling, FCOS v2),
and whose level's size range holds the box; ambiguous cells take the smallest box; a box
with no such cell takes the nearest cell of a level whose range holds it.
Classification: Quality Focal Loss (Li et al., "Generalized Focal Loss", NeurIPS 2020,
Eq. 5) with the IoU of the predicted box as the soft target. Box: GIoU loss
(Rezatofighi et al., CVPR 2019).
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from torchvision.ops import generalized_box_iou_loss

from dynprune.config import STRIDES


def elementwise_iou(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    lt = torch.max(a[:, :2], b[:, :2])
    rb = torch.min(a[:, 2:], b[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(1)
    area_a = (a[:, 2:] - a[:, :2]).clamp(min=0).prod(1)
    area_b = (b[:, 2:] - b[:, :2]).clamp(min=0).prod(1)
    return inter / (area_a + area_b - inter + eps)


class DetectionLoss:
    """Callable returning ``(per_image_loss (B,), parts)``; the training loss is its mean."""

    def __init__(self, num_classes: int, radius: float = 2.5, box_weight: float = 2.0, qfl_beta: float = 2.0):
        self.num_classes = num_classes
        self.radius = radius
        self.box_weight = box_weight
        self.qfl_beta = qfl_beta

    def size_range(self, strides: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per-cell [lo, hi] of the largest side distance a level is responsible for."""
        lo = torch.where(strides == STRIDES[0], torch.zeros_like(strides), 4 * strides)
        hi = torch.where(strides == STRIDES[-1], torch.full_like(strides, float("inf")), 8 * strides)
        return lo, hi

    @torch.no_grad()
    def assign(
        self, gt: torch.Tensor, points: torch.Tensor, strides: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Return ``(positive (A,) bool, gt_index (A,) long)`` for one image's boxes ``(n, 4)``."""
        n, a = gt.shape[0], points.shape[0]
        px, py = points[:, 0][None], points[:, 1][None]
        ltrb = torch.stack((px - gt[:, 0:1], py - gt[:, 1:2], gt[:, 2:3] - px, gt[:, 3:4] - py), -1)
        inside = ltrb.min(-1).values > 0
        cx, cy = (gt[:, 0:1] + gt[:, 2:3]) / 2, (gt[:, 1:2] + gt[:, 3:4]) / 2
        near = ((px - cx).abs() < self.radius * strides) & ((py - cy).abs() < self.radius * strides)
        lo, hi = self.size_range(strides)
        side = ltrb.max(-1).values
        cand = inside & near & (side >= lo) & (side <= hi)
        # A box's size as a level sees it at its centre: half its longer side.
        half = (torch.max(gt[:, 2] - gt[:, 0], gt[:, 3] - gt[:, 1]) / 2)[:, None]
        level_ok = (half >= lo) & (half <= hi)
        lonely = ~cand.any(1)
        if lonely.any():
            dist = (px - cx) ** 2 + (py - cy) ** 2 + (~level_ok).float() * 1e12
            nearest = dist[lonely].argmin(1)
            cand[lonely.nonzero()[:, 0], nearest] = True
        area = ((gt[:, 2] - gt[:, 0]) * (gt[:, 3] - gt[:, 1]))[:, None].expand(n, a)
        cost = torch.where(cand, area, torch.full_like(area, float("inf")))
        gt_index = cost.argmin(0)
        return cand.any(0), gt_index

    def __call__(
        self,
        boxes: torch.Tensor,
        logits: torch.Tensor,
        targets: List[torch.Tensor],
        points: torch.Tensor,
        strides: torch.Tensor,
    ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        bsz = boxes.shape[0]
        cls_sum = boxes.new_zeros(bsz)
        box_sum = boxes.new_zeros(bsz)
        num_pos = 0
        logits = logits.float()
        boxes = boxes.float()
        for b in range(bsz):
            t = targets[b].to(boxes.device)
            target = torch.zeros_like(logits[b])
            if len(t):
                pos, gt_index = self.assign(t[:, 1:5].float(), points.float(), strides.float())
                if pos.any():
                    gt_boxes = t[gt_index[pos], 1:5].float()
                    pred = boxes[b, pos]
                    box_sum[b] = generalized_box_iou_loss(pred, gt_boxes, reduction="sum")
                    iou = elementwise_iou(pred.detach(), gt_boxes).clamp(0, 1)
                    target[pos, t[gt_index[pos], 0].long()] = iou
                    num_pos += int(pos.sum())
            prob = logits[b].sigmoid()
            qfl = F.binary_cross_entropy_with_logits(logits[b], target, reduction="none")
            cls_sum[b] = (qfl * (prob - target).abs().pow(self.qfl_beta)).sum()
        norm = max(1.0, num_pos / bsz)
        per_image = (cls_sum + self.box_weight * box_sum) / norm
        parts = {"cls": cls_sum.mean().detach() / norm, "box": box_sum.mean().detach() / norm}
        return per_image, parts
