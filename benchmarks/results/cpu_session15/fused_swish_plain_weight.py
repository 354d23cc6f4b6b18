"""The nine compact 3x3 shapes, warm: conv2d + SiLU against oneDNN's _convolution_pointwise with the SiLU
fused, on the plain gathered weight (BENCHMARKS.md, session 15).

    python benchmarks/results/cpu_session15/fused_swish_plain_weight.py
"""

import time

import numpy as np
import torch
import torch.nn.functional as F

torch.set_num_threads(2)
op = torch.ops.mkldnn._convolution_pointwise
U = [1, 1]
shapes = [
    (16, 16, 80),
    (32, 32, 40),
    (64, 40, 40),
    (64, 64, 20),
    (64, 80, 20),
    (96, 144, 10),
    (24, 40, 40),
    (40, 32, 20),
    (64, 32, 10),
]
tot = [0.0, 0.0]
for kin, kout, hw in shapes:
    buf = np.random.randn(kout, 3, 3, kin).astype(np.float32)
    w2 = torch.from_numpy(buf.transpose(0, 3, 1, 2))
    b2 = torch.randn(kout)
    y = torch.from_numpy(np.random.randn(hw, hw, kin).astype(np.float32).transpose(2, 0, 1)[None])
    ref = F.silu(torch.conv2d(y, w2, b2, 1, 1))
    got = op(y, w2, b2, U, U, U, 1, "swish", [], "")
    err = (ref - got).abs().max().item()
    ta = tb = 0.0
    n = 300
    for _ in range(20):
        F.silu(torch.conv2d(y, w2, b2, 1, 1), inplace=True)
        op(y, w2, b2, U, U, U, 1, "swish", [], "")
    for _ in range(n):
        t0 = time.perf_counter()
        F.silu(torch.conv2d(y, w2, b2, 1, 1), inplace=True)
        t1 = time.perf_counter()
        op(y, w2, b2, U, U, U, 1, "swish", [], "")
        t2 = time.perf_counter()
        ta += t1 - t0
        tb += t2 - t1
    tot[0] += ta / n * 1e6
    tot[1] += tb / n * 1e6
    print(
        f"{kin:4d}->{kout:4d} @{hw}: conv2d+silu_ {ta / n * 1e6:7.1f}  fused plain-weight {tb / n * 1e6:7.1f}  err {err:.1e}  out stride {got.stride()}"  # noqa: E501
    )
print("total", [round(t) for t in tot])
