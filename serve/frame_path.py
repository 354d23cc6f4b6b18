"""The whole frame on the GPU: a BGR uint8 frame in, detections in image pixels out, as one CUDA
graph per frame size, with one small read-back per frame.

On a GPU the network of the nano detector takes a fraction of a millisecond, and a frame served
through the host (OpenCV letterboxing, a copy, NMS with host syncs, ``.cpu()`` copies) is mostly
host work (docs/DESIGN.md, "The GPU path"). Here the frame goes into a pinned buffer and to the
device in one non-blocking copy on a second stream (two buffers: the next frame, where the caller
has it, uploads while this one runs); an integrated GPU (a Jetson) reads the pinned frame in place,
no copy, where a check at the first frame of a size shows it can. Letterboxing
(:func:`~dynprune.letterbox.letterbox_tensor`), the network, decoding, a fixed pre-NMS top-k and
greedy NMS with fixed shapes (:func:`~dynprune.boxes.detections_fixed`), and the boxes' way back to
image pixels all run on the device and replay from one graph per frame size
(:class:`~dynprune.serve.cuda_graph.GraphedForward`: a frame of a new size captures a new one, the
old ones are kept; a failed capture runs the same steps eagerly, logged). The host reads one packed
tensor: the detections, their count and the network's extras (a gated network's kept channels).
Stage times come from CUDA events read after that read-back, so timing adds no sync; ``network_ms``
is then the device's whole frame (letterboxing, network, NMS: one graph).

The same steps run eagerly on CPU tensors, which is how the tests check them without a GPU; CPU
serving keeps its own path (:class:`~dynprune.serve.engines.Engine`).
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import torch

from dynprune.boxes import detections_fixed
from dynprune.letterbox import boxes_to_image, letterbox_tensor
from dynprune.serve.cuda_graph import GraphedForward

log = logging.getLogger("dynprune.serve")


class _CudaArray:
    """``__cuda_array_interface__`` over a pinned host tensor's memory, for ``torch.as_tensor(..., device)``."""

    def __init__(self, host: torch.Tensor) -> None:
        self.__cuda_array_interface__ = {"shape": tuple(host.shape), "typestr": "|u1",
                                         "data": (host.data_ptr(), False), "version": 2, "strides": None}


#: ``network(x (1, 3, S, S) float32) -> (boxes (1, A, 4) xyxy model pixels, scores (1, A, C), extras or None)``
Network = Callable[[torch.Tensor], Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]]


class DeviceFramePath:
    """``path(image) -> (dets (n, 6) float32 NumPy [x1, y1, x2, y2, score, label] in image pixels,
    extras (NumPy or None), timings in ms)`` for BGR uint8 ``(H, W, 3)`` frames."""

    def __init__(self, network: Network, imgsz: int, device: torch.device, conf: float = 0.25, iou: float = 0.6,
                 max_det: int = 100, pre_nms: int = 1000, cuda_graph: bool = True, color: int = 114) -> None:
        self.network, self.imgsz, self.device = network, imgsz, device
        self.conf, self.iou, self.max_det, self.pre_nms, self.color = conf, iou, max_det, pre_nms, color
        self.cuda = device.type == "cuda"
        self.cuda_graph = cuda_graph and self.cuda
        self.graphs: Dict[Tuple[int, ...], GraphedForward] = {}  # one per frame size, kept: cameras switch back
        self._shape: Tuple[int, ...] = ()
        self._pinned: list = []
        self._on_device: list = []
        self._copied: list = []
        self._slot = 0
        self._ahead: Optional[tuple] = None  # (the next frame, its slot, its upload's event)
        self._copy_stream = torch.cuda.Stream(device) if self.cuda else None
        # An integrated GPU (a Jetson) shares the host's memory: it reads the pinned frame where it lies
        self.zero_copy = self.cuda and bool(getattr(torch.cuda.get_device_properties(device), "is_integrated", False))
        self._mapped: Dict[Tuple[int, ...], Tuple[torch.Tensor, torch.Tensor]] = {}
        self._events = [torch.cuda.Event(enable_timing=True) for _ in range(3)] if self.cuda else []
        self._conf = torch.tensor(float(conf), device=device)

    def _frame(self, frame: torch.Tensor) -> Tuple[torch.Tensor]:
        """Every device step of one frame, packed into one float32 vector (graph-capturable)."""
        x, fitted = letterbox_tensor(frame, self.imgsz, self.color)
        boxes, scores, extras = self.network(x)
        dets, count = detections_fixed(boxes[0], scores[0], self._conf, self.iou, self.max_det, self.pre_nms)
        dets = torch.cat((boxes_to_image(dets[:, :4], fitted), dets[:, 4:]), 1)
        parts = [count.float(), dets.reshape(-1)]
        if extras is not None:
            parts.append(extras.float().reshape(-1))
        return (torch.cat(parts),)

    def _stage(self, image: np.ndarray) -> Tuple[int, torch.cuda.Event]:
        """Start ``image``'s upload on the copy stream into the next of two buffers; ``(slot, done event)``."""
        if self._shape != image.shape:  # two pinned host buffers and two device buffers per frame size
            self._pinned = [torch.empty(image.shape, dtype=torch.uint8).pin_memory() for _ in range(2)]
            self._on_device = [torch.empty(image.shape, dtype=torch.uint8, device=self.device) for _ in range(2)]
            self._copied = [None, None]
            self._shape, self._slot = image.shape, 0
        slot = self._slot = 1 - self._slot
        if self._copied[slot] is not None:
            self._copied[slot].synchronize()  # the copy out of this pinned buffer two frames ago (long done)
        np.copyto(self._pinned[slot].numpy(), image)
        done = torch.cuda.Event()
        with torch.cuda.stream(self._copy_stream):
            self._on_device[slot].copy_(self._pinned[slot], non_blocking=True)
            done.record()
        self._copied[slot] = done
        return slot, done

    def _mapped_view(self, shape: Tuple[int, ...]) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """A pinned host buffer and a CUDA tensor over the same memory (the device pointer of pinned
        memory is its host pointer under unified addressing), checked once; None, logged, where the
        GPU cannot read it so (the frame is then copied)."""
        if shape not in self._mapped:
            try:
                host = torch.empty(shape, dtype=torch.uint8).pin_memory()
                host.numpy()[...] = np.arange(host.numel(), dtype=np.uint64).reshape(shape) % 251
                view = torch.as_tensor(_CudaArray(host), device=self.device)
                if not torch.equal(view.cpu(), host):
                    raise RuntimeError("the GPU read other values than the host wrote")
                self._mapped[shape] = (host, view)
            except Exception as exc:  # an older torch, a driver without mapped memory: copy instead
                log.warning("frames copied to the GPU: reading pinned memory in place failed (%s: %s)",
                            type(exc).__name__, exc)
                self.zero_copy = False
                return None
        return self._mapped[shape]

    def _upload(self, image: np.ndarray) -> torch.Tensor:
        if not self.cuda:
            return torch.from_numpy(np.ascontiguousarray(image))
        mapped = self._mapped_view(image.shape) if self.zero_copy else None
        if mapped is not None:  # the previous frame's graph is done (its read-back waited): overwrite
            np.copyto(mapped[0].numpy(), image)
            return mapped[1]
        staged, self._ahead = self._ahead, None
        if staged is not None and staged[0] is image:  # uploaded while the previous frame ran
            slot, done = staged[1], staged[2]
        else:
            slot, done = self._stage(image)
        torch.cuda.current_stream(self.device).wait_event(done)
        return self._on_device[slot]

    def set_conf(self, conf: float) -> None:
        """The score threshold, read on the device inside the graph (bench lowers it for AP)."""
        if conf != self.conf:
            self.conf = conf
            self._conf.fill_(conf)

    @torch.inference_mode()
    def __call__(self, image: np.ndarray, ahead: Optional[np.ndarray] = None,
                 ) -> Tuple[np.ndarray, Optional[np.ndarray], Dict[str, float]]:
        """Detections for ``image``; ``ahead``, the frame that comes next where the caller has it
        already, starts uploading while this one runs on the GPU."""
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an (H, W, 3) uint8 BGR frame, got {image.shape} {image.dtype}")
        ev = self._events
        t0 = time.perf_counter()
        frame = self._upload(image)
        t1 = time.perf_counter()
        if self.cuda:
            ev[0].record()
        graphed = self.graphs.get(image.shape)
        if graphed is None:
            graphed = self.graphs[image.shape] = GraphedForward(self._frame, enabled=self.cuda_graph,
                                                                 input_in_place=self.zero_copy)
        (packed,) = graphed(frame)
        if self.cuda:
            ev[1].record()
            if ahead is not None and ahead.ndim == 3 and ahead.dtype == np.uint8 and not self.zero_copy:
                self._ahead = (ahead, *self._stage(ahead))  # its copy overlaps this frame's graph
        t2 = time.perf_counter()
        host = packed.cpu().numpy()  # the one read-back of the frame (it waits for the GPU)
        if self.cuda:
            ev[2].record()
        t3 = time.perf_counter()
        n = int(host[0])
        dets = host[1 : 1 + 6 * self.max_det].reshape(self.max_det, 6)[:n].copy()
        extras = host[1 + 6 * self.max_det :] if host.size > 1 + 6 * self.max_det else None
        t4 = time.perf_counter()
        if self.cuda:  # the events are behind the read-back: reading them costs no wait
            ev[2].synchronize()
            device_ms, readback_ms = ev[0].elapsed_time(ev[1]), ev[1].elapsed_time(ev[2])
        else:
            device_ms, readback_ms = (t2 - t1) * 1e3, (t3 - t2) * 1e3
        # network_ms is the device's whole frame: letterboxing, network, decoding and NMS in one graph
        return dets, extras, {"preprocess_ms": (t1 - t0) * 1e3, "network_ms": device_ms,
                              "postprocess_ms": readback_ms + (t4 - t3) * 1e3}
