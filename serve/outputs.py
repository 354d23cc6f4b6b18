"""Outputs of ``dynprune serve``: JSON lines, an annotated video, a window."""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import IO, Optional

import numpy as np

from dynprune.report import draw_boxes

log = logging.getLogger("dynprune.serve")


def annotate(image: np.ndarray, result, names, fps: Optional[float] = None) -> np.ndarray:
    import cv2

    out = draw_boxes(image, result.boxes, result.scores)
    text = f"{result.engine}"
    if fps:
        text += f"  {fps:.1f} FPS"
    if result.keep_ratio is not None:
        text += f"  keep {result.keep_ratio:.2f}"
    cv2.putText(out, text, (8, 22), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 3, cv2.LINE_AA)
    cv2.putText(out, text, (8, 22), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (255, 255, 255), 1, cv2.LINE_AA)
    return out


def detection_record(frame, result, names) -> dict:
    return {
        "frame": frame.index, "name": frame.name, "time": frame.timestamp, "engine": result.engine,
        "latency_ms": round(result.total_ms, 3), "keep_ratio": result.keep_ratio,
        "timings_ms": {k: round(v, 3) for k, v in result.timings.items()},
        "detections": [{"box": [round(float(v), 2) for v in b], "score": round(float(s), 4),
                        "class": names[int(c)]} for b, s, c in zip(result.boxes, result.scores, result.labels)],
    }


class JsonLines:
    """One JSON object per frame, to a file or stdout (``-``)."""

    def __init__(self, target: str) -> None:
        self.fh: IO = sys.stdout if target == "-" else open(target, "w")

    def write(self, record: dict) -> None:
        self.fh.write(json.dumps(record) + "\n")
        self.fh.flush()

    def close(self) -> None:
        if self.fh is not sys.stdout:
            self.fh.close()


class VideoOutput:
    """Annotated frames to a video file; opened at the first frame's size, finalised on close."""

    def __init__(self, path: str, fps: float = 30.0) -> None:
        self.path, self.fps, self.writer = path, fps, None

    def write(self, image: np.ndarray) -> None:
        import cv2

        if self.writer is None:
            h, w = image.shape[:2]
            self.writer = cv2.VideoWriter(self.path, cv2.VideoWriter_fourcc(*"mp4v"), self.fps, (w, h))
            if not self.writer.isOpened():
                raise RuntimeError(f"{self.path}: OpenCV cannot write this video")
        self.writer.write(image)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.release()


class Window:
    """An OpenCV window; refuses clearly when there is no display or OpenCV has no GUI."""

    def __init__(self, title: str = "dynprune") -> None:
        import cv2

        if not os.environ.get("DISPLAY") and sys.platform.startswith("linux"):
            raise RuntimeError("--show needs a display (DISPLAY is not set); use --http to watch in a browser")
        try:
            cv2.namedWindow(title, cv2.WINDOW_NORMAL)
        except cv2.error as e:
            raise RuntimeError(f"--show: this OpenCV has no GUI support ({e.err}); use --http instead") from e
        self.title = title

    def show(self, image: np.ndarray) -> bool:
        import cv2

        cv2.imshow(self.title, image)
        return (cv2.waitKey(1) & 0xFF) not in (ord("q"), 27)

    def close(self) -> None:
        import cv2

        cv2.destroyWindow(self.title)
