"""The built-in synthetic one-class dataset and video (no downloads, deterministic by seed).

The class is a *ring* (an annulus of any colour). Scenes vary a lot in difficulty from one
image to the next, because per-frame complexity is what dynamic pruning exploits: from an
empty plain background to many small rings among filled discs (the hard negative: a ring
without its hole), rectangles, triangles and lines over textured backgrounds.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import List, Tuple

import numpy as np

CLASS_NAME = "ring"
GENERATOR_VERSION = 3


def _color(rng: np.random.Generator) -> Tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(0, 256, 3))


def _background(rng: np.random.Generator, w: int, h: int, clutter: float) -> np.ndarray:
    import cv2

    kind = rng.choice(["plain", "gradient", "noise"], p=[1 - clutter * 0.8, clutter * 0.4, clutter * 0.4])
    base = np.array(_color(rng), dtype=np.float32)
    if kind == "plain":
        return np.broadcast_to(base, (h, w, 3)).astype(np.uint8).copy()
    if kind == "gradient":
        other = np.array(_color(rng), dtype=np.float32)
        t = np.linspace(0, 1, w, dtype=np.float32)[None, :, None]
        return np.broadcast_to(base * (1 - t) + other * t, (h, w, 3)).astype(np.uint8).copy()
    noise = rng.normal(0, 40 * clutter + 5, (h // 8 + 1, w // 8 + 1, 3)).astype(np.float32)
    noise = cv2.resize(noise, (w, h), interpolation=cv2.INTER_CUBIC)
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def _distractor(rng: np.random.Generator, img: np.ndarray, max_size: int) -> None:
    import cv2

    h, w = img.shape[:2]
    c = _color(rng)
    x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
    s = int(rng.integers(4, max(5, max_size)))
    kind = rng.integers(0, 4)
    if kind == 0:  # filled disc: looks like a ring without its hole
        cv2.circle(img, (x, y), s // 2, c, -1, cv2.LINE_AA)
    elif kind == 1:
        cv2.rectangle(img, (x, y), (x + s, y + int(s * rng.uniform(0.3, 1.5))), c, -1)
    elif kind == 2:
        pts = np.array([[x, y], [x + s, y + int(rng.integers(-s, s))], [x + int(rng.integers(-s, s)), y + s]])
        cv2.fillPoly(img, [pts.astype(np.int32)], c, cv2.LINE_AA)
    else:
        cv2.line(img, (x, y), (x + int(rng.integers(-2 * s, 2 * s)), y + int(rng.integers(-2 * s, 2 * s))), c,
                 int(rng.integers(1, 5)), cv2.LINE_AA)


def _draw_ring(img: np.ndarray, cx: float, cy: float, r: float, thick: float, color) -> List[float]:
    import cv2

    shift = 4  # sub-pixel drawing
    f = 1 << shift
    radius = r - thick / 2
    cv2.circle(img, (int(cx * f), int(cy * f)), int(radius * f), color, max(1, int(round(thick))), cv2.LINE_AA, shift)
    return [cx - r, cy - r, cx + r, cy + r]


def render_scene(
    rng: np.random.Generator, width: int = 320, height: int = 320, difficulty: float | None = None
) -> Tuple[np.ndarray, np.ndarray]:
    """One scene: a ``(H, W, 3)`` uint8 BGR image and its ring boxes ``(n, 4)`` xyxy."""
    d = float(rng.uniform(0, 1)) if difficulty is None else difficulty
    img = _background(rng, width, height, clutter=d)
    for _ in range(int(rng.integers(0, 2 + 30 * d))):
        _distractor(rng, img, max_size=int(12 + 50 * d))
    # Easy frames hold 0-2 large rings, hard frames up to ~10 small ones.
    n = int(rng.integers(0, 3 + int(8 * d)))
    boxes: List[List[float]] = []
    f = height / 320  # radii are designed for 320-pixel scenes
    max_r = min((20 + 80 * (1 - d)) * f, min(width, height) / 2 - 1)
    min_r = min((12 + 13 * (1 - d)) * f, max_r)  # >= 24 px across at 320: >= 15 px after a 256 letterbox
    for _ in range(n):
        for _attempt in range(10):
            r = float(rng.uniform(min_r, max_r))
            cx, cy = float(rng.uniform(r, width - r)), float(rng.uniform(r, height - r))
            if all(abs(cx - (b[0] + b[2]) / 2) > (r + (b[2] - b[0]) / 2) * 0.8
                   or abs(cy - (b[1] + b[3]) / 2) > (r + (b[3] - b[1]) / 2) * 0.8 for b in boxes):
                boxes.append(_draw_ring(img, cx, cy, r, max(2.0, r * rng.uniform(0.25, 0.45)), _color(rng)))
                break
    return img, np.array(boxes, dtype=np.float32).reshape(-1, 4)


def write_synthetic(root: str, n_train: int = 800, n_val: int = 200, seed: int = 0, size: int = 320) -> str:
    """Write an Ultralytics-layout dataset under ``root``; return the path of its data.yaml."""
    import cv2

    root_p = Path(root)
    for split, n, offset in (("train", n_train, 0), ("val", n_val, 10_000_000)):
        (root_p / "images" / split).mkdir(parents=True, exist_ok=True)
        (root_p / "labels" / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            rng = np.random.default_rng([seed, offset + i])
            # Image sizes vary a little so that the letterbox is exercised.
            w = int(size * rng.choice([1.0, 1.25, 0.75]))
            img, boxes = render_scene(rng, w, size)
            stem = f"{split}_{i:05d}"
            cv2.imwrite(str(root_p / "images" / split / f"{stem}.jpg"), img, [cv2.IMWRITE_JPEG_QUALITY, 95])
            lines = []
            for x1, y1, x2, y2 in boxes:
                lines.append(f"0 {(x1 + x2) / 2 / w:.6f} {(y1 + y2) / 2 / size:.6f} {(x2 - x1) / w:.6f} "
                             f"{(y2 - y1) / size:.6f}")
            (root_p / "labels" / split / f"{stem}.txt").write_text("\n".join(lines) + ("\n" if lines else ""))
    yaml_path = root_p / "data.yaml"
    yaml_path.write_text(f"path: .\ntrain: images/train\nval: images/val\nnames: ['{CLASS_NAME}']\n")
    return str(yaml_path)


def ensure_synthetic(cache_dir: str, n_train: int = 800, n_val: int = 200, seed: int = 0, size: int = 320) -> str:
    """The synthetic dataset's data.yaml, generated once into ``cache_dir`` and reused."""
    params = {"n_train": n_train, "n_val": n_val, "seed": seed, "size": size, "version": GENERATOR_VERSION}
    root = Path(cache_dir) / f"synthetic-s{seed}-n{n_train}-{size}"
    marker = root / "params.json"
    if marker.is_file() and json.loads(marker.read_text()) == params:
        return str(root / "data.yaml")
    if int(os.environ.get("RANK", "0")) > 0:  # under torchrun, rank 0 writes it; the others wait
        for _ in range(1200):
            time.sleep(0.5)
            if marker.is_file() and json.loads(marker.read_text()) == params:
                return str(root / "data.yaml")
        raise RuntimeError(f"{root}: rank 0 did not finish writing the synthetic dataset in 10 minutes")
    path = write_synthetic(str(root), n_train, n_val, seed, size)
    marker.write_text(json.dumps(params))  # written last: a half-written set is regenerated
    return path


def write_synthetic_video(path: str, frames: int = 300, size: int = 320, fps: int = 30, seed: int = 1) -> str:
    """A video of rings drifting over a scene whose clutter rises and falls over time.

    Calm stretches and busy stretches alternate, so a dynamic engine's keep ratio (and
    speed) should visibly follow the content.
    """
    import cv2

    rng = np.random.default_rng(seed)
    w = int(size * 4 / 3)
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, size))
    if not writer.isOpened():
        raise RuntimeError(f"OpenCV cannot write {path} (no mp4v encoder in this build)")
    scene_len = max(10, frames // 6)
    for t in range(frames):
        if t % scene_len == 0:
            difficulty = float((t // scene_len) % 2) * 0.8 + rng.uniform(0, 0.2)
            scene_seed = int(rng.integers(0, 2**31))
        local = np.random.default_rng(scene_seed)
        img, _ = render_scene(local, w, size, difficulty)
        # Drift: shift the whole scene a little each frame.
        shift = (t % scene_len) * 2
        img = np.roll(img, shift, axis=1)
        writer.write(img)
    writer.release()
    return path
