"""Per compact block in the network: time, the gates' part of it, and the products' GFLOP/s on the kept
slots (BENCHMARKS.md, session 15).

    python benchmarks/results/cpu_session15/fused_parts.py gates.pt [threads]
"""

import collections
import sys
import time

sys.path.insert(0, "benchmarks")
import torch  # noqa: E402
from cpu_dynamic import frames_from  # noqa: E402

from dynprune.checkpoint import model_from_checkpoint  # noqa: E402
from dynprune.compact import CompactDetector  # noqa: E402

torch.set_num_threads(int(sys.argv[2]) if len(sys.argv) > 2 else 2)
model, _ = model_from_checkpoint(sys.argv[1])
model.eval()
det = CompactDetector(model).eval()
T = collections.defaultdict(float)
G = collections.defaultdict(float)
F = collections.defaultdict(float)
for i, b in enumerate(det.blocks):
    orig = b.forward

    def fw(x, i=i, orig=orig, b=b):
        t0 = time.perf_counter()
        y = orig(x)
        T[i] += time.perf_counter() - t0
        n1, n2 = b.last_kept[0]
        s1 = -(-n1 // 4) * 4
        s2 = -(-n2 // 8) * 8
        hw = x.shape[2] * x.shape[3]
        c = x.shape[1]
        F[i] += 2 * hw * (c * s1 + 9 * s1 * s2 + s2 * c)
        return y

    b.forward = fw
    b.profile = True
frames = frames_from(
    sys.argv[2] if len(sys.argv) > 2 and not sys.argv[2].isdigit() else "../shared/datasets/raccoon", 320, 40
)
with torch.inference_mode():
    for f in frames[:5]:
        det(f)
    T.clear()
    F.clear()
    for b in det.blocks:
        b.gate_ms = 0.0
    for _ in range(3):
        for f in frames:
            det(f)
n = 120
tt = tg = 0
for i, b in enumerate(det.blocks):
    t = T[i] / n * 1e6
    g = b.gate_ms / n * 1e3
    fl = F[i] / n
    tt += t
    tg += g
    print(
        f"block {i}: {t:6.1f} us  gates {g:5.1f}  products {t - g:6.1f} us  {fl / 1e6:5.1f} MFLOP  {fl / (t - g) / 1e3:6.1f} GFLOP/s"  # noqa: E501
    )
print(f"total {tt:.0f} us, gates {tg:.0f}")
