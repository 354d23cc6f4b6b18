"""Session 12, dropped: cv1 + bias + SiLU as one AVX2 kernel in C against PyTorch's addmm + silu_.

    gcc -O3 -shared -fPIC -fopenmp -o libpw.so fused_cv1_prototype.c
    python fused_cv1_prototype_bench.py ./libpw.so          # T=1 for one thread
"""

import ctypes
import os
import sys
import time

import torch
import torch.nn.functional as F

torch.set_num_threads(int(os.environ.get("T", "2")))
lib = ctypes.CDLL(sys.argv[1])
pw_silu = lib.pw_silu
pw_silu.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                    ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]


def bench(fn, n=300):
    for _ in range(30):
        fn()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n * 1e6


SHAPES = [(6400, 32, 16), (1600, 64, 32), (1600, 64, 24), (1600, 64, 40), (400, 128, 64), (100, 256, 144),
          (6400, 32, 32), (1600, 64, 64), (100, 256, 256), (1603, 64, 20)]
for m, k, n in SHAPES:  # (pixels, input channels, kept outputs) of the nano blocks at 320 px
    x, w, b = torch.randn(m, k), torch.randn(n, k), torch.randn(n)
    npad = (n + 7) // 8 * 8
    wp = torch.zeros(k, npad)
    wp[:, :n] = w.T
    bp = torch.zeros(npad)
    bp[:n] = b
    out = torch.empty(m, n)
    with torch.inference_mode():
        ref = F.silu(torch.addmm(b, x, w.T))
        pw_silu(x.data_ptr(), m, k, k, wp.data_ptr(), bp.data_ptr(), n, npad, out.data_ptr())
        err = (out - ref).abs().max().item() / ref.abs().max().item()
        t_torch = bench(lambda: F.silu(torch.addmm(b, x, w.T), inplace=True))  # noqa: B023
        t_c = bench(lambda: pw_silu(x.data_ptr(), m, k, k, wp.data_ptr(), bp.data_ptr(), n, npad, out.data_ptr()))  # noqa: B023
    print(f"{m:5d} {k:4d} {n:4d}  torch {t_torch:7.1f} us  C {t_c:7.1f} us  {t_torch / t_c:.2f}x  rel. error {err:.1e}")
