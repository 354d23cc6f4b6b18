"""Latency measurement: warm-up, then percentiles of wall time (device-synchronised); and the GPU
time of short calls, replayed from a CUDA graph so that the GPU's time is measured, not the
host's launches."""

from __future__ import annotations

import time
from typing import Callable, Dict

import numpy as np
import torch


def measure_latency(
    fn: Callable[[], object], warmup: int = 5, iters: int = 30, device: str = "cpu"
) -> Dict[str, float]:
    """Median, p95 and mean milliseconds of ``fn()``; CUDA work is synchronised around each call."""
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    a = np.array(times)
    return {"p50_ms": float(np.median(a)), "p95_ms": float(np.percentile(a, 95)), "mean_ms": float(a.mean())}


def capture_graph(fn: Callable[[], object], calls: int = 1, warmup: int = 3) -> torch.cuda.CUDAGraph:
    """``calls`` calls of ``fn()`` in one CUDA graph, after ``warmup`` calls on a side stream (they
    compile kernels and fill the allocator, outside the capture)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return graph


def graph_ms(fn: Callable[[], object], calls: int = 20, replays: int = 15, warmup: int = 2) -> float:
    """GPU milliseconds of one ``fn()``: ``calls`` calls captured in one CUDA graph, replayed
    ``replays`` times on the current stream (a green context's, inside an SM limit), the median
    per call. Timing eager calls one by one would measure the host's launch path instead (a
    Triton launch costs microseconds of Python, more than a layer of the nano detector takes on
    a large GPU)."""
    graph = capture_graph(fn, calls, warmup)
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return float(np.median(times))
