"""The fixed cost of one block call, compact against dense, on a 2x2 input (BENCHMARKS.md, session 13).

    python benchmarks/results/cpu_session13/block_floor.py

A 16-channel bottleneck whose gates keep every channel, warm, 2 threads: all call overhead, no arithmetic to
speak of. The dense block is the inference form ``DenseInference`` uses (three ``FoldedConv`` layers).
"""

from __future__ import annotations

import time

import torch

from dynprune.compact import CompactBottleneck
from dynprune.fusion import fuse_conv_bn, pointwise_as_matmul
from dynprune.layers import Bottleneck


def per_call_us(fn, calls: int = 20000) -> float:
    for _ in range(1000):
        fn()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls * 1e6


def main() -> None:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    gated = Bottleneck(16, 16, 16)
    gated.add_gates()
    gated.eval()
    for gate in (gated.gate1, gated.gate2):
        gate.mode = "threshold"
        gate.threshold.fill_(0.5)
    compact = CompactBottleneck(gated).eval()
    dense = pointwise_as_matmul(fuse_conv_bn(torch.nn.Sequential(Bottleneck(16, 16, 16).eval())))
    dense.to(memory_format=torch.channels_last)
    x = torch.randn(1, 16, 2, 2).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        compact(x)
        print(f"kept {compact.last_kept.tolist()}, compiled gate step: {compact._native is not None}")
        compact_us, dense_us = per_call_us(lambda: compact(x)), per_call_us(lambda: dense(x))
        print(f"compact block {compact_us:.1f} us, dense block {dense_us:.1f} us")


if __name__ == "__main__":
    main()
