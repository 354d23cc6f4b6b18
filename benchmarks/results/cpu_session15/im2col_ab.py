"""The nine compact 3x3 shapes of the raccoon gates, warm: oneDNN's convolution against an im2col copy
(NumPy) and one matrix product (BENCHMARKS.md, session 15).

    python benchmarks/results/cpu_session15/im2col_ab.py
"""

import time

import numpy as np
import torch

torch.set_num_threads(2)
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


def conv_path(y, w2, b2):
    return torch.conv2d(y, w2, b2, 1, 1)


def make_im2col(h, w, c):
    pad = np.zeros((h + 2, w + 2, c), np.float32)
    s = pad.strides
    view = np.lib.stride_tricks.as_strided(pad, (h, w, 3, 3, c), (s[0], s[1], s[0], s[1], s[2]))
    cols = np.empty((h * w, 9 * c), np.float32)
    cols5 = cols.reshape(h, w, 3, 3, c)

    def f(ynp):
        pad[1:-1, 1:-1] = ynp
        np.copyto(cols5, view)
        return torch.from_numpy(cols)

    return f


for kin, kout, hw in shapes:
    buf = np.random.randn(kout, 3, 3, kin).astype(np.float32)  # OHWI as the C step writes
    w2 = torch.from_numpy(buf.transpose(0, 3, 1, 2))
    wmat = torch.from_numpy(buf.reshape(kout, 9 * kin)).T  # (9*kin, kout) view
    b2 = torch.randn(kout)
    ynp = np.random.randn(hw, hw, kin).astype(np.float32)
    y = torch.from_numpy(ynp.transpose(2, 0, 1)[None])  # NCHW shape channels-last
    im = make_im2col(hw, hw, kin)
    ref = conv_path(y, w2, b2).permute(0, 2, 3, 1).reshape(hw * hw, kout)
    got = torch.addmm(b2, im(ynp), wmat)
    assert torch.allclose(ref, got, atol=1e-3), (ref - got).abs().max()
    ta = tb = tc = 0.0
    n = 300
    for _ in range(n):
        t0 = time.perf_counter()
        conv_path(y, w2, b2)
        t1 = time.perf_counter()
        cols = im(ynp)
        t2 = time.perf_counter()
        torch.addmm(b2, cols, wmat)
        t3 = time.perf_counter()
        ta += t1 - t0
        tb += t2 - t1
        tc += t3 - t2
    print(
        f"{kin:4d}->{kout:4d} @{hw}x{hw}: conv2d {ta / n * 1e6:7.1f} us  im2col {tb / n * 1e6:6.1f} + gemm {tc / n * 1e6:6.1f} = {(tb + tc) / n * 1e6:7.1f}"  # noqa: E501
    )
