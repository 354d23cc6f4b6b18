"""Latency measurement: warm-up, then percentiles of wall time (device-synchronised)."""

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
