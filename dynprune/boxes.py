"""Box decoding, NMS and the letterbox transform between image and model pixels."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import batched_nms


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

    ``boxes`` is ``(B, A, 4)`` xyxy, ``scores`` ``(B, A, C)`` probabilities.
    """
    out = []
    num_classes = scores.shape[-1]
    for b in range(boxes.shape[0]):
        s = scores[b].reshape(-1)
        k = min(pre_nms, s.numel())
        top_s, top_i = s.topk(k)
        keep = top_s > conf
        top_s, top_i = top_s[keep], top_i[keep]
        anchor, label = top_i // num_classes, top_i % num_classes
        bx = boxes[b, anchor]
        kept = batched_nms(bx.float(), top_s.float(), label, iou)[:max_det]
        out.append({"boxes": bx[kept], "scores": top_s[kept], "labels": label[kept]})
    return out


@dataclass
class Letterbox:
    """How an image was fitted into the model input: ``model = image * scale + pad``."""

    scale: float
    pad_x: float
    pad_y: float
    width: int  # original image size
    height: int

    def to_image(self, boxes: np.ndarray) -> np.ndarray:
        """Model-pixel ``xyxy`` boxes -> original-image pixels, clipped to the image."""
        b = boxes.astype(np.float32).copy()
        b[:, [0, 2]] = (b[:, [0, 2]] - self.pad_x) / self.scale
        b[:, [1, 3]] = (b[:, [1, 3]] - self.pad_y) / self.scale
        b[:, [0, 2]] = b[:, [0, 2]].clip(0, self.width)
        b[:, [1, 3]] = b[:, [1, 3]].clip(0, self.height)
        return b

    def to_model(self, boxes: np.ndarray) -> np.ndarray:
        b = boxes.astype(np.float32).copy()
        b[:, [0, 2]] = b[:, [0, 2]] * self.scale + self.pad_x
        b[:, [1, 3]] = b[:, [1, 3]] * self.scale + self.pad_y
        return b


def letterbox(image: np.ndarray, size: int, color: int = 114) -> Tuple[np.ndarray, Letterbox]:
    """Resize keeping the aspect ratio and pad to ``size x size`` (HWC uint8 in, out)."""
    import cv2

    h, w = image.shape[:2]
    scale = min(size / h, size / w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    if (nh, nw) != (h, w):
        image = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_LINEAR)
    pad_y, pad_x = (size - nh) // 2, (size - nw) // 2
    out = np.full((size, size, 3), color, dtype=np.uint8)
    out[pad_y : pad_y + nh, pad_x : pad_x + nw] = image
    return out, Letterbox(scale, float(pad_x), float(pad_y), w, h)
