"""Warm: oneDNN's prepacked stride-2 3x3 (fused SiLU) against stride2_prototype.c with and without
the NumPy copy into a zero-bordered input (BENCHMARKS.md, session 15). Build the prototype first (see its header).

    python benchmarks/results/cpu_session15/stride2_prototype.py /tmp/s2.so
"""

# ruff: noqa: B023, E501  (a record script: each closure runs in its own loop turn)
import ctypes
import sys
import time

import numpy as np
import torch

torch.set_num_threads(2)
lib = ctypes.CDLL(sys.argv[1])
P = ctypes.c_void_p
L = ctypes.c_long
lib.conv_s2.argtypes = [P, L, L, L, P, L, P, P, L]
op = torch.ops.mkldnn._convolution_pointwise
for cin, cout, h in [(16, 32, 160), (32, 64, 80), (64, 128, 40), (128, 256, 20)]:
    w = torch.randn(cout, cin, 3, 3) / (3 * cin**0.5)
    b = torch.randn(cout)
    wp = (
        torch.ops.mkldnn._reorder_convolution_weight(w, [1, 1], [2, 2], [1, 1], 1, [1, cin, h, h])
        if hasattr(torch.ops.mkldnn, "_reorder_convolution_weight")
        else torch._C._nn.mkldnn_reorder_conv2d_weight(w, [1, 1], [2, 2], [1, 1], 1, [1, cin, h, h])
    )
    x = torch.randn(1, cin, h, h).contiguous(memory_format=torch.channels_last)
    xn = x.permute(0, 2, 3, 1).numpy()[0]
    xp = np.zeros((h + 2, h + 2, cin), np.float32)
    wt = np.ascontiguousarray(w.permute(2, 3, 1, 0).reshape(9, cin, cout).numpy())
    out = np.empty((h // 2, h // 2, cout), np.float32)

    def one():
        return op(x, wp, b, [1, 1], [2, 2], [1, 1], 1, "swish", [], "")

    def c():
        xp[1:-1, 1:-1] = xn
        lib.conv_s2(xp.ctypes.data, h, h, cin, wt.ctypes.data, cout, b.numpy().ctypes.data, out.ctypes.data, cout)

    def c_nopad():
        lib.conv_s2(xp.ctypes.data, h, h, cin, wt.ctypes.data, cout, b.numpy().ctypes.data, out.ctypes.data, cout)

    for _ in range(20):
        one()
        c()
    ts = [0, 0, 0]
    n = 200
    for _ in range(n):
        for k, f in enumerate((one, c, c_nopad)):
            t0 = time.perf_counter()
            f()
            ts[k] += time.perf_counter() - t0
    print(cin, cout, h, [round(t / n * 1e6, 1) for t in ts], "us: oneDNN prepacked, C with pad copy, C without")
