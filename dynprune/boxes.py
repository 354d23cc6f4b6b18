"""Box decoding, NMS and the letterbox transform between image and model pixels."""

from __future__ import annotations

from dataclasses import dataclass
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
    finds cold caches: on the raccoon bundle, a frame's post-processing took 0.33-0.59 ms in the
    pipeline against 0.12 ms warm (BENCHMARKS.md)."""
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
        b = boxes.astype(np.float32)  # a copy
        b[:, 0::2] = ((b[:, 0::2] - self.pad_x) / self.scale).clip(0, self.width)
        b[:, 1::2] = ((b[:, 1::2] - self.pad_y) / self.scale).clip(0, self.height)
        return b

    def to_model(self, boxes: np.ndarray) -> np.ndarray:
        b = boxes.astype(np.float32).copy()
        b[:, [0, 2]] = b[:, [0, 2]] * self.scale + self.pad_x
        b[:, [1, 3]] = b[:, [1, 3]] * self.scale + self.pad_y
        return b


def letterbox(image: np.ndarray, size: int, color: int = 114) -> Tuple[np.ndarray, Letterbox]:
    """Resize keeping the aspect ratio and pad to ``size x size`` (HWC uint8 in, out)."""
    import cv2

    fitted, (nh, nw) = _fit(image.shape[0], image.shape[1], size)
    if (nh, nw) != image.shape[:2]:
        image = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_LINEAR)
    out = np.full((size, size, 3), color, dtype=np.uint8)
    out[int(fitted.pad_y) : int(fitted.pad_y) + nh, int(fitted.pad_x) : int(fitted.pad_x) + nw] = image
    return out, fitted


def _fit(h: int, w: int, size: int) -> Tuple[Letterbox, Tuple[int, int]]:
    """How an ``h x w`` image fits a ``size x size`` input: the transform and the resized ``(h, w)``."""
    scale = min(size / h, size / w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    pad_y, pad_x = (size - nh) // 2, (size - nw) // 2
    return Letterbox(scale, float(pad_x), float(pad_y), w, h), (nh, nw)


class LetterboxInput:
    """Letterbox and model input for a stream of frames, with its buffers kept between calls.

    ``__call__(image)`` gives ``(input (1, 3, S, S) float32 RGB in [0, 1], Letterbox)``, bit for bit
    :func:`~dynprune.data.dataset.to_tensor` of :func:`letterbox`'s image, but the canvas keeps its
    padding while the frame size stays the same, the resize writes straight into it, and the float
    input is one NumPy division into a kept buffer. Serving runs it once per frame, right after a
    network has left the caches cold; the input tensor is that buffer, so the next call overwrites
    it (use it before then).
    """

    def __init__(self, size: int, color: int = 114) -> None:
        self.size, self.color = size, color
        self._canvas = np.full((size, size, 3), color, dtype=np.uint8)
        self._input = np.empty((1, 3, size, size), dtype=np.float32)
        self._tensor = torch.from_numpy(self._input)
        self._frame_shape: Tuple[int, ...] = ()
        self._roi = self._canvas
        self._fitted = Letterbox(1.0, 0.0, 0.0, size, size)

    def __call__(self, image: np.ndarray) -> Tuple[torch.Tensor, Letterbox]:
        import cv2

        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            from dynprune.data.dataset import to_tensor

            boxed, fitted = letterbox(image, self.size, self.color)  # (and its error for bad input)
            return to_tensor(boxed), fitted
        if image.shape != self._frame_shape:  # a new frame size: new padding
            self._fitted, (nh, nw) = _fit(image.shape[0], image.shape[1], self.size)
            pad_y, pad_x = int(self._fitted.pad_y), int(self._fitted.pad_x)
            self._canvas.fill(self.color)
            self._roi = self._canvas[pad_y : pad_y + nh, pad_x : pad_x + nw]
            self._frame_shape = image.shape
        roi = self._roi
        if roi.shape != image.shape:
            resized = cv2.resize(image, (roi.shape[1], roi.shape[0]), dst=roi, interpolation=cv2.INTER_LINEAR)
            if resized is not roi:  # OpenCV made its own array after all
                roi[...] = resized
        else:
            roi[...] = image
        np.divide(self._canvas[:, :, ::-1].transpose(2, 0, 1), np.float32(255), out=self._input[0])  # BGR -> RGB
        return self._tensor, self._fitted

