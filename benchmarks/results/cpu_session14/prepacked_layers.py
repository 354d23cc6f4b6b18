"""3x3 layers: ``conv2d`` + ``silu_`` against oneDNN's convolution on a weight made once, SiLU fused.

    python benchmarks/results/cpu_session14/prepacked_layers.py            # the dense layers
    python benchmarks/results/cpu_session14/prepacked_layers.py --compact  # the raccoon gates' compact shapes

Two threads, channels-last input, warm; the two forms alternate call by call (both orders), 400 calls
each; median microseconds.
"""

from __future__ import annotations

import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

DENSE = [(256, 256, 10, 1), (128, 128, 20, 1), (64, 64, 40, 1), (32, 32, 80, 1), (128, 64, 20, 2)]
COMPACT = [(16, 16, 80, 1), (32, 32, 40, 1), (24, 16, 40, 1), (72, 64, 20, 1), (48, 56, 20, 1), (112, 128, 10, 1),
           (32, 48, 40, 1), (32, 24, 20, 1), (32, 24, 10, 1)]


def time_layer(c_out: int, c_in: int, size: int, stride: int) -> np.ndarray:
    """Median microseconds of both forms of one layer."""
    x = torch.randn(1, c_in, size * stride, size * stride).contiguous(memory_format=torch.channels_last)
    w = torch.randn(c_out, c_in, 3, 3).contiguous(memory_format=torch.channels_last)
    b = torch.randn(c_out)
    with torch.inference_mode():
        packed = torch._C._nn.mkldnn_reorder_conv2d_weight(w.to_mkldnn(), [1, 1], [stride] * 2, [1, 1], 1,
                                                           list(x.shape))
        forms = [lambda: F.silu(F.conv2d(x, w, b, stride, 1), inplace=True),
                 lambda: torch.ops.mkldnn._convolution_pointwise(x, packed, b, [1, 1], [stride] * 2, [1, 1], 1,
                                                                 "swish", [], "")]
        for _ in range(20):
            for f in forms:
                f()
        times = [[], []]
        for r in range(400):
            for j in ((0, 1) if r % 2 else (1, 0)):
                t0 = time.perf_counter()
                forms[j]()
                times[j].append(time.perf_counter() - t0)
    return np.array([np.median(t) * 1e6 for t in times])


def main() -> None:
    torch.set_num_threads(2)
    shapes = COMPACT if "--compact" in sys.argv else DENSE
    total = np.zeros(2)
    print(f"{'out':>5}{'in':>5}{'map':>5}{'stride':>7}{'conv2d+silu_':>14}{'made once':>11}")
    for c_out, c_in, size, stride in shapes:
        med = time_layer(c_out, c_in, size, stride)
        total += med
        print(f"{c_out:>5}{c_in:>5}{size:>5}{stride:>7}{med[0]:>14.1f}{med[1]:>11.1f}")
    print(f"{'all':>22}{total[0]:>14.1f}{total[1]:>11.1f}")


if __name__ == "__main__":
    main()
