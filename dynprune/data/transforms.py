"""Image loading, letterbox and training augmentation (flip, HSV, scale jitter, mosaic)."""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from dynprune.letterbox import Letterbox, letterbox


def read_image(path: str) -> Optional[np.ndarray]:
    """BGR uint8 image, or ``None`` when the file cannot be decoded."""
    import cv2

    img = cv2.imread(path, cv2.IMREAD_COLOR)
    return img


def hsv_jitter(img: np.ndarray, rng: np.random.Generator, h: float = 0.015, s: float = 0.6, v: float = 0.4) -> None:
    """In-place HSV gain jitter, as in YOLOv5's ``augment_hsv``."""
    import cv2

    gains = rng.uniform(-1, 1, 3) * (h, s, v) + 1
    hue, sat, val = cv2.split(cv2.cvtColor(img, cv2.COLOR_BGR2HSV))
    x = np.arange(256, dtype=np.float32)
    lut_h = ((x * gains[0]) % 180).astype(np.uint8)
    lut_s = np.clip(x * gains[1], 0, 255).astype(np.uint8)
    lut_v = np.clip(x * gains[2], 0, 255).astype(np.uint8)
    merged = cv2.merge((cv2.LUT(hue, lut_h), cv2.LUT(sat, lut_s), cv2.LUT(val, lut_v)))
    cv2.cvtColor(merged, cv2.COLOR_HSV2BGR, dst=img)


def random_affine(
    img: np.ndarray, boxes: np.ndarray, size: int, rng: np.random.Generator, scale: float = 0.5, translate: float = 0.1
) -> Tuple[np.ndarray, np.ndarray]:
    """Letterbox-size output with random scale and translation; boxes follow and are clipped."""
    import cv2

    h, w = img.shape[:2]
    s = min(size / h, size / w) * rng.uniform(1 - scale, 1 + scale)
    tx = size / 2 - w * s / 2 + rng.uniform(-translate, translate) * size
    ty = size / 2 - h * s / 2 + rng.uniform(-translate, translate) * size
    m = np.array([[s, 0, tx], [0, s, ty]], dtype=np.float32)
    out = cv2.warpAffine(img, m, (size, size), borderValue=(114, 114, 114))
    if len(boxes):
        b = boxes.copy()
        b[:, [0, 2]] = b[:, [0, 2]] * s + tx
        b[:, [1, 3]] = b[:, [1, 3]] * s + ty
        area0 = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
        b = b.clip(0, size)
        area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
        # Drop boxes that left the frame or kept under 20% of their area (no longer identifiable).
        keep = (area > 4) & (area > 0.2 * area0)
        return out, np.concatenate([b, keep[:, None]], 1)
    return out, np.zeros((0, 5), dtype=np.float32)


def letterbox_boxes(img: np.ndarray, boxes: np.ndarray, size: int) -> Tuple[np.ndarray, np.ndarray, Letterbox]:
    out, lb = letterbox(img, size)
    return out, lb.to_model(boxes) if len(boxes) else boxes.reshape(0, 4), lb
