"""In the network, each compact 3x3 run twice on the same tensors: the first call's time against the
second's (BENCHMARKS.md, session 15; "3x3" is both calls, "again" the second). Measured on the step +
PyTorch products path, before the fused block (which does not call bottleneck_pixels).

    python benchmarks/results/cpu_session15/first_call_penalty.py gates.pt ../shared/datasets/raccoon
"""

import collections
import sys
import time

sys.path.insert(0, "benchmarks")
import torch  # noqa: E402
from cpu_dynamic import frames_from  # noqa: E402

import dynprune.compact as C  # noqa: E402
from dynprune.checkpoint import model_from_checkpoint  # noqa: E402
from dynprune.compact import CompactBottleneck, CompactDetector  # noqa: E402
from dynprune.fusion import _silu_  # noqa: E402

torch.set_num_threads(2)
T = collections.defaultdict(float)
cur = [None]


def timed_bp(xi, h, w, b1, w1_t, w2, b2, w3_t, b3):
    hw = h * w
    n = cur[0]
    t0 = time.perf_counter()
    y = torch.from_numpy(_silu_(torch.addmm(b1, xi, w1_t)).numpy().reshape(1, h, w, -1).transpose(0, 3, 1, 2))
    t1 = time.perf_counter()
    y0 = y
    y = _silu_(torch.conv2d(y, w2, b2, 1, 1))
    t2 = time.perf_counter()
    _silu_(torch.conv2d(y0, w2, b2, 1, 1))
    t2b = time.perf_counter()
    T[(n, "3x3again")] += t2b - t2
    t2 = time.perf_counter()
    y = torch.addmm(b3, torch.from_numpy(y.numpy().transpose(0, 2, 3, 1).reshape(hw, -1)), w3_t).add_(xi)
    out = torch.from_numpy(y.numpy().reshape(1, h, w, xi.shape[1]).transpose(0, 3, 1, 2))
    t3 = time.perf_counter()
    T[(n, "cv1")] += t1 - t0
    T[(n, "3x3")] += t2 - t1
    T[(n, "cv3")] += t3 - t2
    T[(n, "shape")] = (xi.shape[1], w1_t.shape[1], w2.shape[0], h)
    return out


C.bottleneck_pixels = timed_bp
model, _ = model_from_checkpoint(sys.argv[1])
model.eval()
det = CompactDetector(model).eval()
blocks = [m for m in det.modules() if isinstance(m, CompactBottleneck)]
for i, b in enumerate(blocks):
    orig = b.forward

    def fw(x, i=i, orig=orig, b=b):
        cur[0] = i
        t0 = time.perf_counter()
        y = orig(x)
        T[(i, "block")] += time.perf_counter() - t0
        return y

    b.forward = fw
    b.profile = True
frames = frames_from(sys.argv[2], 320, 40)
with torch.inference_mode():
    for f in frames[:5]:
        det(f)
    for k in list(T):
        T[k] = 0.0 if not isinstance(T[k], tuple) else T[k]
    for b in blocks:
        b._gate_ms[0] = 0.0
    for _ in range(3):
        for f in frames:
            det(f)
n = 3 * len(frames)
tot = collections.defaultdict(float)
for i, b in enumerate(blocks):
    g = b._gate_ms[0] * 1e3 / n
    parts = [T[(i, k)] * 1e6 / n for k in ("cv1", "3x3", "cv3", "block", "3x3again")]
    print(
        i,
        T[(i, "shape")],
        f"gate {g:6.1f} cv1 {parts[0]:6.1f} 3x3 {parts[1]:6.1f} cv3 {parts[2]:6.1f} block {parts[3]:6.1f} again {parts[4]:6.1f}",  # noqa: E501
    )
    for k, v in zip(("gate", "cv1", "3x3", "cv3", "block"), [g] + parts):
        tot[k] += v
print({k: round(v) for k, v in tot.items()})
