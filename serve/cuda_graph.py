"""One CUDA graph per input shape for a network that never syncs with the host.

At batch 1 a small detector on a GPU is bound by kernel launches (docs/DESIGN.md, "Numbers to
know"): on the H100 the nano detector is about 90-120 kernels of 2-10 us each
("The GPU path"). Replaying them from a graph removes the host's launch cost per
kernel. The dynamic network qualifies because its kept counts and index lists never leave
the device (kernels/gate_index.py), so one capture serves every frame, whatever it keeps.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional, Tuple

import torch

log = logging.getLogger("dynprune.serve")


class GraphedForward:
    """``forward(x)`` replayed from a CUDA graph captured on the first call for ``x``'s shape.

    Off the GPU, or once a capture has failed (the failure is logged with its reason), it
    calls ``forward`` directly. Outputs are copied out of the graph's static buffers, so the
    caller may keep them across calls.
    """

    def __init__(self, forward: Callable[[torch.Tensor], Tuple[torch.Tensor, ...]], enabled: bool = True,
                 warmup: int = 3, input_in_place: bool = False) -> None:
        self.forward = forward
        self.enabled = enabled
        self.warmup = warmup
        # the graph reads the caller's input tensor itself (it must stay the same tensor), no copy of it
        self.input_in_place = input_in_place
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.static_x: Optional[torch.Tensor] = None
        self.static_out: Tuple[torch.Tensor, ...] = ()

    @property
    def active(self) -> bool:
        return self.graph is not None

    def __call__(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        if not self.enabled or x.device.type != "cuda":
            return self.forward(x)
        if self.static_x is None or self.static_x.shape != x.shape or self.static_x.dtype != x.dtype:
            self._capture(x)
            if not self.enabled:
                return self.forward(x)
        if x.data_ptr() != self.static_x.data_ptr():
            self.static_x.copy_(x)
        self.graph.replay()
        return tuple(t.clone() for t in self.static_out)

    def _capture(self, x: torch.Tensor) -> None:
        try:
            self.static_x = x if self.input_in_place else x.clone()
            side = torch.cuda.Stream(x.device)
            side.wait_stream(torch.cuda.current_stream(x.device))
            with torch.cuda.stream(side):  # warm-up: compiles the Triton kernels, fills the allocator
                for _ in range(self.warmup):
                    self.forward(self.static_x)
            torch.cuda.current_stream(x.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = self.forward(self.static_x)
            self.graph, self.static_out = graph, tuple(out)
            log.info("CUDA graph captured for input %s %s", tuple(x.shape), x.dtype)
        except Exception as exc:  # a capture failure must not stop a camera stream: run eager
            log.warning("CUDA graph capture failed (%s: %s); running the network eagerly", type(exc).__name__, exc)
            self.enabled, self.graph, self.static_x, self.static_out = False, None, None, ()
