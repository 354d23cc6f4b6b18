"""Warm time of one compact 3x3 (oneDNN, conv2d on an OHWI-strided weight) against its output and input
width, in steps of 8 (BENCHMARKS.md, session 15).

    python benchmarks/results/cpu_session15/width_sweep.py
"""

import time

import numpy as np
import torch

torch.set_num_threads(2)


def tm(kin, kout, hw, n=200):
    buf = np.random.randn(kout, 3, 3, kin).astype(np.float32)
    w2 = torch.from_numpy(buf.transpose(0, 3, 1, 2))
    b2 = torch.randn(kout)
    y = torch.from_numpy(np.random.randn(hw, hw, kin).astype(np.float32).transpose(2, 0, 1)[None])
    for _ in range(20):
        torch.conv2d(y, w2, b2, 1, 1)
    t0 = time.perf_counter()
    for _ in range(n):
        torch.conv2d(y, w2, b2, 1, 1)
    return (time.perf_counter() - t0) / n * 1e6


for kin, hw in [(64, 20), (128, 10), (32, 40)]:
    for sweep in ("out", "in"):
        row = []
        for k in range(16, 161 if hw == 10 else 81, 8):
            t = tm(kin, k, hw) if sweep == "out" else tm(k, 64, hw)
            row.append(f"{k}:{t:.0f}")
        print(kin if sweep == "out" else "in", hw, sweep, " ".join(row))
