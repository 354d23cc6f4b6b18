"""Box decoding and NMS: the detector's raw outputs to boxes in model pixels (letterbox.py maps
them to image pixels)."""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import batched_nms, nms


def make_anchor_points(
    imgsz: Tuple[int, int], strides: Sequence[int], device: torch.device, dtype: torch.dtype
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Cell centres ``(A, 2)`` in input pixels and the stride of each ``(A,)``, level by level."""
    points, stride_list = [], []
    h, w = imgsz
    for s in strides:
        ys = (torch.arange(h // s, device=device, dtype=dtype) + 0.5) * s
        xs = (torch.arange(w // s, device=device, dtype=dtype) + 0.5) * s
        gy, gx = torch.meshgrid(ys, xs, indexing="ij")
        points.append(torch.stack((gx, gy), -1).reshape(-1, 2))
        stride_list.append(torch.full((points[-1].shape[0],), float(s), device=device, dtype=dtype))
    return torch.cat(points), torch.cat(stride_list)


def decode_ltrb(reg: torch.Tensor, points: torch.Tensor, strides: torch.Tensor) -> torch.Tensor:
    """Distances to the four sides (softplus, in strides) -> ``xyxy`` boxes in input pixels.

    Anchor-free regression as in FCOS (Tian et al., ICCV 2019, Sec. 3.1).
    """
    ltrb = F.softplus(reg) * strides[:, None]
    return torch.cat((points - ltrb[..., :2], points + ltrb[..., 2:]), -1)


def postprocess(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    conf: float = 0.25,
    iou: float = 0.6,
    max_det: int = 100,
    pre_nms: int = 1000,
) -> List[Dict[str, torch.Tensor]]:
    """Per image: top scores above ``conf`` -> class-wise NMS -> at most ``max_det`` boxes.

    ``boxes`` is ``(B, A, 4)`` xyxy, ``scores`` ``(B, A, C)`` probabilities. Float32 CPU tensors go
    through :func:`detections_numpy` (the same detections, a dozen calls instead of about forty);
    anything else (a GPU, half precision) through the same steps in torch.
    """
    on_numpy = (boxes.device.type == "cpu" and boxes.dtype == scores.dtype == torch.float32
                and not (boxes.requires_grad or scores.requires_grad))
    out = []
    for b in range(boxes.shape[0]):
        if on_numpy:
            bx, top_s, label = (torch.from_numpy(a) for a in detections_numpy(
                boxes[b].numpy(), scores[b].numpy(), conf, iou, max_det, pre_nms))
            out.append({"boxes": bx, "scores": top_s, "labels": label})
        else:
            out.append(_detections_torch(boxes[b], scores[b], conf, iou, max_det, pre_nms))
    return out


def _detections_torch(boxes: torch.Tensor, scores: torch.Tensor, conf: float, iou: float, max_det: int,
                      pre_nms: int) -> Dict[str, torch.Tensor]:
    """One image's detections in torch ops, for tensors on a GPU or in other dtypes."""
    num_classes = scores.shape[-1]
    s = scores.reshape(-1)
    top_s, top_i = s.topk(min(pre_nms, s.numel()))
    keep = top_s > conf
    top_s, top_i = top_s[keep], top_i[keep]
    anchor, label = top_i // num_classes, top_i % num_classes
    bx = boxes[anchor]
    kept = batched_nms(bx.float(), top_s.float(), label, iou)[:max_det]
    return {"boxes": bx[kept], "scores": top_s[kept], "labels": label[kept]}


def detections_numpy(
    boxes: np.ndarray,
    scores: np.ndarray,
    conf: float = 0.25,
    iou: float = 0.6,
    max_det: int = 100,
    pre_nms: int = 1000,
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`postprocess` for one image held in NumPy: ``boxes (A, 4)`` xyxy and ``scores (A, C)``
    -> ``(boxes (N, 4), scores (N,), labels (N,))``, the same detections in the same order as its
    torch steps give.

    The CPU path of :func:`postprocess` (serving, validation). It filters by ``conf`` before ranking,
    and all of it runs as a dozen NumPy calls and one call of torchvision's NMS kernel, where the
    torch steps make about forty calls. That matters right after a network has run, when each call
    finds cold caches (docs/DESIGN.md, "The CPU path")."""
    num_classes = scores.shape[-1]
    flat = scores.reshape(-1)
    index = np.flatnonzero(flat > conf)
    if index.size > pre_nms:  # the pre_nms best of those above conf, as topk-then-filter keeps
        index = index[np.argpartition(-flat[index], pre_nms - 1)[:pre_nms]]
    if index.size == 0:
        return np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64)
    top = flat[index].astype(np.float32)
    anchor, label = np.divmod(index, num_classes)
    picked = boxes[anchor].astype(np.float32)
    if num_classes == 1:  # one class: batched NMS is plain NMS
        kept = nms(torch.from_numpy(picked), torch.from_numpy(top), iou)
    else:
        kept = batched_nms(torch.from_numpy(picked), torch.from_numpy(top), torch.from_numpy(label), iou)
    kept = kept[:max_det].numpy()
    return picked[kept], top[kept], label[kept]


def detections_fixed(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    conf: float = 0.25,
    iou: float = 0.6,
    max_det: int = 100,
    pre_nms: int = 1000,
    nms_keep=None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """One image's detections with fixed shapes, for a CUDA graph: ``boxes (A, 4)`` xyxy and ``scores
    (A, C)`` -> ``(dets (max_det, 6), count (1,) int32)``, each row ``x1, y1, x2, y2, score, label``, the
    first ``count`` rows the detections in :func:`postprocess`'s order, the rest zeros.

    The same detections as :func:`postprocess` whenever at most ``pre_nms`` scores pass ``conf`` (then
    both rank the same candidates): a fixed top-``pre_nms`` of the scores, the valid ones (above
    ``conf``) a prefix of it, class-wise greedy NMS as torchvision's ``batched_nms`` does it (boxes
    of each class offset apart), and the kept rows scattered into place by their rank. No step
    reads a value back to the host (``conf`` may be a 0-dim tensor on the device, so that a captured
    graph reads its current value). ``nms_keep(boxes, count, iou)`` gives the keep flags:
    :func:`~dynprune.kernels.nms.greedy_nms_triton` on a GPU, its torchvision reference elsewhere
    (the default)."""
    if nms_keep is None:
        from dynprune.kernels.nms import greedy_nms_reference, greedy_nms_triton

        nms_keep = greedy_nms_triton if boxes.is_cuda else greedy_nms_reference
    num_classes = scores.shape[-1]
    flat = scores.reshape(-1)
    top_s, top_i = flat.topk(min(pre_nms, flat.numel()))
    valid = top_s > conf
    count = valid.sum(dtype=torch.int32).reshape(1)
    anchor, label = top_i // num_classes, top_i % num_classes
    bx = boxes[anchor].float()
    # batched_nms's trick: each class's boxes moved apart by more than any box spans
    shifted = bx + (label.to(bx.dtype) * (bx.max() + 1))[:, None] if num_classes > 1 else bx
    keep = nms_keep(shifted, count, iou) & valid
    rank = keep.to(torch.int32).cumsum(0) - 1
    slot = torch.where(keep & (rank < max_det), rank, torch.full_like(rank, max_det)).long()
    rows = torch.cat((bx, top_s.float()[:, None], label.to(torch.float32)[:, None]), 1)
    dets = torch.zeros(max_det + 1, 6, dtype=torch.float32, device=boxes.device)
    dets.index_copy_(0, slot, rows)  # the dropped candidates all land on the spare last row
    return dets[:max_det], keep.sum(dtype=torch.int32).clamp(max=max_det).reshape(1)
