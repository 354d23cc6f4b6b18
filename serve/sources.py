"""Frame sources: one URI names any input, in the spirit of jetson-inference's videoSource.

    csi://0                      MIPI CSI camera on a Jetson (GStreamer nvarguscamerasrc)
    /dev/video0, v4l2://0, 0     V4L2 / USB camera
    video.mp4                    a video file (ends, or loops with loop=True)
    folder/, 'imgs/*.jpg'        a folder or glob of images, in sorted order
    rtsp://host/stream, http(s)://...   network streams
    'videotestsrc ! ... ! appsink'      a raw GStreamer pipeline

Live sources (cameras, streams) are read by a capture thread that keeps only the newest
frame, so a slow consumer never builds up lag; a dropped camera or stream is reopened with
exponential back-off and the loss is logged, never raised. Files are read frame by frame.
A source that cannot be opened at all fails at once, naming the URI and what was tried.
"""

from __future__ import annotations

import glob
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Tuple

import numpy as np

log = logging.getLogger("dynprune.serve")

VIDEO_EXTS = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg", ".h264", ".h265", ".ts")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


class SourceError(RuntimeError):
    """A source that cannot be opened; the message names the URI and what was tried."""


@dataclass
class Frame:
    image: np.ndarray  # BGR uint8
    index: int
    timestamp: float
    name: str = ""


def csi_pipeline(sensor: int, width: int = 1280, height: int = 720, fps: int = 30) -> str:
    """The nvarguscamerasrc pipeline for a Jetson CSI camera, ending in a non-blocking appsink."""
    return (f"nvarguscamerasrc sensor-id={sensor} ! video/x-raw(memory:NVMM), width={width}, height={height}, "
            f"framerate={fps}/1 ! nvvidconv ! video/x-raw, format=BGRx ! videoconvert ! video/x-raw, format=BGR ! "
            "appsink drop=true max-buffers=1")


def gstreamer_available() -> bool:
    import cv2

    info = cv2.getBuildInformation()
    for line in info.splitlines():
        if "GStreamer" in line:
            return "YES" in line
    return False


def _require_gstreamer(uri: str) -> None:
    if not gstreamer_available():
        raise SourceError(
            f"{uri}: needs GStreamer, but this OpenCV ({__import__('cv2').__version__}) was built without it "
            "(cv2.getBuildInformation() says 'GStreamer: NO'). On a Jetson use JetPack's system OpenCV: "
            "pip uninstall opencv-python opencv-python-headless, then use the system python3-opencv.")


class ImageFolderSource:
    """Images of a folder or glob, sorted, as frames; ``loop`` starts over at the end."""

    live = False

    def __init__(self, uri: str, loop: bool = False) -> None:
        self.uri = uri
        if os.path.isdir(uri):
            files = [str(p) for p in sorted(Path(uri).iterdir()) if p.suffix.lower() in IMAGE_EXTS]
        else:
            files = sorted(f for f in glob.glob(uri) if Path(f).suffix.lower() in IMAGE_EXTS)
        if not files:
            raise SourceError(f"{uri}: no images ({', '.join(IMAGE_EXTS)}) found")
        self.files, self.loop, self.pos, self.count = files, loop, 0, 0

    def read(self) -> Optional[Frame]:
        import cv2

        while True:
            if self.pos >= len(self.files):
                if not self.loop:
                    return None
                self.pos = 0
            path = self.files[self.pos]
            self.pos += 1
            img = cv2.imread(path)
            if img is None:
                log.warning("%s: unreadable image skipped", path)
                continue
            self.count += 1
            return Frame(img, self.count - 1, time.time(), os.path.basename(path))

    def close(self) -> None:
        pass


class CaptureSource:
    """An OpenCV ``VideoCapture`` source (file, camera, stream, GStreamer pipeline).

    ``opener`` returns an opened capture (or raises): the reconnect logic calls it again after
    a loss, waiting ``backoff`` seconds, doubled after every failed attempt up to ``max_backoff``.
    """

    def __init__(self, uri: str, opener: Callable[[], object], live: bool, loop: bool = False,
                 backoff: float = 0.5, max_backoff: float = 10.0, tried: str = "") -> None:
        self.uri, self.opener, self.live, self.loop = uri, opener, live, loop
        self.backoff0, self.max_backoff = backoff, max_backoff
        self.count = 0
        self.reconnects = 0
        self._cap = self._open_first(tried)
        self._stop = threading.Event()
        self._latest: Optional[Tuple[np.ndarray, float]] = None
        self._cond = threading.Condition()
        self._thread: Optional[threading.Thread] = None
        if live:
            self._thread = threading.Thread(target=self._grab_loop, name=f"capture {uri}", daemon=True)
            self._thread.start()

    def _open_first(self, tried: str):
        try:
            cap = self.opener()
        except Exception as e:
            raise SourceError(f"{self.uri}: cannot open ({tried or 'OpenCV VideoCapture'}): {e}") from e
        if cap is None or not cap.isOpened():
            raise SourceError(f"{self.uri}: cannot open (tried {tried or 'OpenCV VideoCapture'})")
        return cap

    def _reopen(self) -> None:
        """Reopen after a loss, with exponential back-off, until it works or we are closed."""
        delay = self.backoff0
        while not self._stop.is_set():
            log.warning("%s: source lost; reopening in %.1fs", self.uri, delay)
            if self._stop.wait(delay):
                return
            try:
                if self._cap is not None:
                    self._cap.release()
                cap = self.opener()
                if cap is not None and cap.isOpened():
                    self._cap = cap
                    self.reconnects += 1
                    log.warning("%s: source back after %d reconnect(s)", self.uri, self.reconnects)
                    return
            except Exception as e:  # a camera that is still unplugged, a stream still down
                log.warning("%s: reopen failed: %s", self.uri, e)
            delay = min(delay * 2, self.max_backoff)

    def _grab_loop(self) -> None:
        while not self._stop.is_set():
            ok, img = self._cap.read()
            if not ok or img is None:
                self._reopen()
                continue
            with self._cond:
                self._latest = (img, time.time())  # keep only the newest frame
                self._cond.notify_all()

    def read(self, timeout: float = 30.0) -> Optional[Frame]:
        if self.live:
            with self._cond:
                if not self._cond.wait_for(lambda: self._latest is not None or self._stop.is_set(), timeout):
                    log.warning("%s: no frame for %.0fs", self.uri, timeout)
                    return None
                if self._latest is None:
                    return None
                img, ts = self._latest
                self._latest = None
            self.count += 1
            return Frame(img, self.count - 1, ts)
        ok, img = self._cap.read()
        if not ok or img is None:
            if not self.loop:
                return None
            self._cap.release()
            self._cap = self.opener()
            ok, img = self._cap.read()
            if not ok:
                return None
        self.count += 1
        return Frame(img, self.count - 1, time.time())

    def close(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._cap is not None:
            self._cap.release()


def open_source(uri: str, loop: bool = False, width: int = 1280, height: int = 720, fps: int = 30):
    """Open any input by URI (see the module docstring); raises :class:`SourceError` at once if impossible."""
    import cv2

    s = str(uri).strip()
    if s.startswith("csi://"):
        sensor = s[len("csi://"):] or "0"
        if not sensor.isdigit():
            raise SourceError(f"{s}: expected csi://N with a sensor number")
        _require_gstreamer(s)
        pipe = csi_pipeline(int(sensor), width, height, fps)
        return CaptureSource(s, lambda: cv2.VideoCapture(pipe, cv2.CAP_GSTREAMER), live=True,
                             tried=f"GStreamer pipeline '{pipe}'")
    if s.startswith("v4l2://") or s.startswith("/dev/video") or s.isdigit():
        dev = s[len("v4l2://"):] if s.startswith("v4l2://") else s
        index = int(dev.replace("/dev/video", "")) if dev.replace("/dev/video", "").isdigit() else dev

        def open_v4l2():
            cap = cv2.VideoCapture(index, cv2.CAP_V4L2)
            cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)
            return cap

        return CaptureSource(s, open_v4l2, live=True, tried=f"V4L2 device {dev}")
    if s.startswith(("rtsp://", "rtmp://", "http://", "https://", "udp://")):
        return CaptureSource(s, lambda: cv2.VideoCapture(s, cv2.CAP_FFMPEG), live=True, tried="FFmpeg network stream")
    if "!" in s:
        _require_gstreamer(s)
        return CaptureSource(s, lambda: cv2.VideoCapture(s, cv2.CAP_GSTREAMER), live=True,
                             tried="raw GStreamer pipeline")
    if os.path.isdir(s) or any(ch in s for ch in "*?["):
        return ImageFolderSource(s, loop)
    if os.path.isfile(s):
        ext = Path(s).suffix.lower()
        if ext in IMAGE_EXTS:
            return ImageFolderSource(s, loop)
        if ext not in VIDEO_EXTS:
            log.info("%s: unknown extension; trying it as a video", s)
        return CaptureSource(s, lambda: cv2.VideoCapture(s), live=False, loop=loop, tried="a video file via OpenCV")
    raise SourceError(f"{s}: not a file, folder, glob, camera (csi://N, /dev/videoN, N), stream "
                      "(rtsp://, http://) or GStreamer pipeline")


def iterate(source, max_frames: Optional[int] = None) -> Iterator[Frame]:
    n = 0
    while max_frames is None or n < max_frames:
        frame = source.read()
        if frame is None:
            return
        n += 1
        yield frame
