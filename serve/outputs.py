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


# Containers OpenCV's VideoWriter writes with a codec every build has.
VIDEO_CODECS = {".mp4": "mp4v", ".m4v": "mp4v", ".mov": "mp4v", ".avi": "MJPG", ".mkv": "mp4v"}


def check_outputs(opts) -> None:
    """Refuse output paths that cannot work before the first frame is read (``opts``: ServeOptions)."""
    for flag, path in (("--save", opts.save), ("--json", None if opts.json == "-" else opts.json)):
        if not path:
            continue
        parent = os.path.dirname(os.path.abspath(path))
        if os.path.isdir(path):
            raise ValueError(f"{flag} {path}: is a folder; give a file name")
        if not os.path.isdir(parent):
            raise ValueError(f"{flag} {path}: the folder {parent} does not exist; create it first")
    if opts.save and os.path.splitext(opts.save)[1].lower() not in VIDEO_CODECS:
        raise ValueError(f"--save {opts.save}: unknown video type; end the name in one of "
                         f"{', '.join(sorted(VIDEO_CODECS))} (e.g. out.mp4)")


def quiet_stdout() -> None:
    """After the reader of stdout went away (``| head``): send the rest nowhere, so that Python's
    final flush does not print a second error."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


class JsonLines:
    """One JSON object per frame, to a file or stdout (``-``)."""

    def __init__(self, target: str) -> None:
        self.fh: IO = sys.stdout if target == "-" else open(target, "w")
        self.broken = False

    def write(self, record: dict) -> bool:
        """Write one record; ``False`` once the reader of a pipe has gone (``| head``)."""
        if self.broken:
            return False
        try:
            self.fh.write(json.dumps(record) + "\n")
            self.fh.flush()
        except BrokenPipeError:
            self.broken = True
            if self.fh is sys.stdout:
                quiet_stdout()
            return False
        return True

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
            codec = VIDEO_CODECS.get(os.path.splitext(self.path)[1].lower(), "mp4v")
            self.writer = cv2.VideoWriter(self.path, cv2.VideoWriter_fourcc(*codec), self.fps, (w, h))
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
