"""Torch dataset over :class:`ImageRecord` s: letterboxed tensors and model-pixel targets."""

from __future__ import annotations

from typing import List, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

try:  # OpenCV's own thread pool only competes with PyTorch's on small images
    import cv2

    cv2.setNumThreads(1)
except ImportError:  # pragma: no cover - JetPack's OpenCV is used when present
    pass

from dynprune.data.records import ImageRecord
from dynprune.data.transforms import hsv_jitter, letterbox_boxes, random_affine, read_image


class DetectionDataset(Dataset):
    """Yields ``(image (3,S,S) float in [0,1], targets (n,5) [cls,x1,y1,x2,y2], index)``.

    Targets are in model-input pixels. With ``augment`` the image gets scale/translation
    jitter, a horizontal flip, HSV jitter and (with probability ``mosaic``) a 2x2 mosaic.
    An image that fails to decode at run time is replaced by another one, so an epoch
    never crashes on one bad file (the loader already counted such files when it read
    the dataset).
    """

    def __init__(
        self, records: Sequence[ImageRecord], imgsz: int, augment: bool = False, mosaic: float = 0.0, seed: int = 0
    ) -> None:
        self.records = list(records)
        self.imgsz = imgsz
        self.augment = augment
        self.mosaic = mosaic
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _load(self, index: int):
        for attempt in range(len(self.records)):
            rec = self.records[(index + attempt) % len(self.records)]
            img = read_image(rec.path)
            if img is not None:
                boxes = np.concatenate([rec.labels[:, None].astype(np.float32), rec.boxes], 1)
                return img, boxes
        raise RuntimeError("no image of this dataset can be decoded")

    def _augmented(self, index: int, rng: np.random.Generator):
        size = self.imgsz
        if rng.uniform() < self.mosaic:
            canvas = np.full((size, size, 3), 114, np.uint8)
            parts = []
            half = size // 2
            for k, i in enumerate([index] + list(rng.integers(0, len(self), 3))):
                img, t = self._load(int(i))
                tile, tb = random_affine(img, t[:, 1:], half, rng, scale=0.3)
                ox, oy = (k % 2) * half, (k // 2) * half
                canvas[oy : oy + half, ox : ox + half] = tile
                if len(tb):
                    keep = tb[:, 4] > 0
                    parts.append(np.concatenate([t[keep, :1], tb[keep, :4] + [ox, oy, ox, oy]], 1))
            img = canvas
            targets = np.concatenate(parts) if parts else np.zeros((0, 5), np.float32)
        else:
            img, t = self._load(index)
            img, tb = random_affine(img, t[:, 1:], size, rng)
            targets = np.concatenate([t[:, :1], tb[:, :4]], 1)[tb[:, 4] > 0] if len(tb) else np.zeros((0, 5))
        if rng.uniform() < 0.5:
            img = img[:, ::-1].copy()
            if len(targets):
                targets[:, [1, 3]] = size - targets[:, [3, 1]]
        hsv_jitter(img, rng)
        return img, targets.astype(np.float32)

    def __getitem__(self, index: int):
        if self.augment:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            img, targets = self._augmented(index, rng)
        else:
            img, t = self._load(index)
            img, boxes, _ = letterbox_boxes(img, t[:, 1:], self.imgsz)
            targets = np.concatenate([t[:, :1], boxes], 1).astype(np.float32)
        tensor = torch.from_numpy(np.ascontiguousarray(img[:, :, ::-1].transpose(2, 0, 1))).float().div_(255)
        return tensor, torch.from_numpy(targets), index


def collate(batch: List) -> tuple:
    images, targets, indices = zip(*batch)
    return torch.stack(images), list(targets), list(indices)
