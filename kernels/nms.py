"""Greedy NMS with fixed shapes: one Triton launch over score-sorted candidates, so that a frame's
post-processing replays in a CUDA graph (docs/DESIGN.md, "The GPU path").

torchvision's NMS returns as many indices as survive, a data-dependent shape no CUDA graph can
hold. Here the candidates are a fixed number ``K`` of boxes sorted by score, the valid ones first
(those above the score threshold), and the result is a keep flag per candidate:

    keep[j] = valid[j] and no i < j with keep[i] and IoU(i, j) > iou_threshold

the greedy rule torchvision applies (same IoU formula, same strict ``>``), so the kept set is
torchvision's. One program walks the valid prefix in score order (its length is read on the
device, so the loop is as long as the frame's candidates, not ``K``), holding every candidate's
keep flag in registers. :func:`greedy_nms_reference` is the same rule through torchvision, for
the CPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torchvision.ops import nms


@triton.jit
def _greedy_nms(box_ptr, count_ptr, keep_ptr, K, iou_threshold, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    inside = offs < K
    x1 = tl.load(box_ptr + offs * 4 + 0, mask=inside, other=0.0)
    y1 = tl.load(box_ptr + offs * 4 + 1, mask=inside, other=0.0)
    x2 = tl.load(box_ptr + offs * 4 + 2, mask=inside, other=0.0)
    y2 = tl.load(box_ptr + offs * 4 + 3, mask=inside, other=0.0)
    area = (x2 - x1) * (y2 - y1)
    n = tl.load(count_ptr)
    keep = (offs < n).to(tl.int32)
    for i in range(0, n):
        kept_i = tl.sum(tl.where(offs == i, keep, 0), axis=0)
        bx1 = tl.load(box_ptr + i * 4 + 0)
        by1 = tl.load(box_ptr + i * 4 + 1)
        bx2 = tl.load(box_ptr + i * 4 + 2)
        by2 = tl.load(box_ptr + i * 4 + 3)
        w = tl.maximum(tl.minimum(x2, bx2) - tl.maximum(x1, bx1), 0.0)
        h = tl.maximum(tl.minimum(y2, by2) - tl.maximum(y1, by1), 0.0)
        inter = w * h
        iou = inter / (area + (bx2 - bx1) * (by2 - by1) - inter)
        suppress = (iou > iou_threshold) & (offs > i) & (kept_i > 0)
        keep = tl.where(suppress, 0, keep)
    tl.store(keep_ptr + offs, keep.to(tl.int8), mask=inside)


def greedy_nms_triton(boxes: torch.Tensor, count: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Keep flags ``(K,)`` bool for ``boxes (K, 4)`` xyxy sorted by score, of which the first ``count``
    (a one-element int32 tensor on the boxes' device) are valid. No host sync: ``count`` is read
    by the kernel."""
    boxes = boxes.float().contiguous()
    k = boxes.shape[0]
    keep = torch.empty(k, dtype=torch.int8, device=boxes.device)
    if k:
        _greedy_nms[(1,)](boxes, count.to(torch.int32), keep, k, float(iou_threshold),
                          BLOCK=max(16, triton.next_power_of_2(k)))
    return keep.bool()


def greedy_nms_reference(boxes: torch.Tensor, count: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """:func:`greedy_nms_triton` through torchvision's NMS (data-dependent shapes: the CPU path)."""
    n = int(count.reshape(-1)[0])
    keep = torch.zeros(boxes.shape[0], dtype=torch.bool, device=boxes.device)
    if n:
        # the candidates are sorted already: scores that fall with the index give torchvision the same order
        order = torch.arange(n, 0, -1, dtype=torch.float32, device=boxes.device)
        keep[nms(boxes[:n].float(), order, iou_threshold)] = True
    return keep
