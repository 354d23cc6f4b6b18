"""Fitting an image into the square model input (letterboxing) and back.

``model = image * scale + pad``: :func:`letterbox` resizes keeping the aspect ratio and pads;
:class:`Letterbox` maps boxes between model and image pixels; :class:`LetterboxInput` does the same
for a stream of frames with its buffers kept between calls. :func:`letterbox_tensor` and
:func:`boxes_to_image` are the same on a tensor where it lies (a GPU), with fixed shapes for a given
frame size, for a frame path that replays in a CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import numpy as np
import torch


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
    :func:`to_tensor` of :func:`letterbox`'s image, but the canvas keeps its
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


def to_tensor(image_bgr: np.ndarray) -> torch.Tensor:
    """A letterboxed BGR uint8 image -> the ``(1, 3, S, S)`` float input the models take."""
    return torch.from_numpy(np.ascontiguousarray(image_bgr[:, :, ::-1].transpose(2, 0, 1))).float().div_(255)[None]


def letterbox_tensor(frame: torch.Tensor, size: int, color: int = 114) -> Tuple[torch.Tensor, Letterbox]:
    """:class:`LetterboxInput` on a tensor, on the tensor's device: ``frame (H, W, 3)`` BGR uint8 ->
    ``((1, 3, S, S) float32 RGB in [0, 1], Letterbox)``.

    The resize is OpenCV's ``INTER_LINEAR``: bilinear on pixel centres without antialiasing, which
    ``F.interpolate(mode="bilinear", align_corners=False)`` computes too; its result is rounded to
    whole levels as OpenCV's uint8 output is, so the two differ by OpenCV's fixed-point rounding (at
    most a level, rarely). The padding is :func:`letterbox`'s, to the pixel."""
    import torch.nn.functional as F

    if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != torch.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 BGR frame, got {tuple(frame.shape)} {frame.dtype}")
    fitted, (nh, nw) = _fit(frame.shape[0], frame.shape[1], size)
    rgb = frame.flip(-1).permute(2, 0, 1)[None].float()  # BGR -> RGB, (1, 3, H, W)
    if (nh, nw) != tuple(frame.shape[:2]):
        rgb = F.interpolate(rgb, size=(nh, nw), mode="bilinear", align_corners=False).round_().clamp_(0, 255)
    out = torch.full((1, 3, size, size), float(color), dtype=torch.float32, device=frame.device)
    pad_y, pad_x = int(fitted.pad_y), int(fitted.pad_x)
    out[:, :, pad_y : pad_y + nh, pad_x : pad_x + nw] = rgb
    return out.div_(255), fitted


def boxes_to_image(boxes: torch.Tensor, fitted: Letterbox) -> torch.Tensor:
    """:meth:`Letterbox.to_image` on a tensor where it lies: model-pixel ``xyxy`` boxes ``(..., 4)`` ->
    image pixels, clipped to the image."""
    x = ((boxes[..., 0::2] - fitted.pad_x) / fitted.scale).clamp(0, fitted.width)
    y = ((boxes[..., 1::2] - fitted.pad_y) / fitted.scale).clamp(0, fitted.height)
    return torch.stack((x[..., 0], y[..., 0], x[..., 1], y[..., 1]), -1)
