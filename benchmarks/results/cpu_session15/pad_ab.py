"""Kept-list padding A/B in the network (BENCHMARKS.md, session 15): two CompactDetectors whose blocks pad
gate 1 and gate 2 to PA and PB slots, time_interleaved, six passes in alternating order. Measured with the
step + PyTorch products path (the fused block reads the same pads; set ``blk.fused = False`` to repeat it).

    python benchmarks/results/cpu_session15/pad_ab.py gates.pt ../shared/datasets/raccoon 4,8 4,16
"""

import sys

import torch

sys.path.insert(0, "benchmarks")
from cpu_dynamic import frames_from, time_interleaved  # noqa: E402

from dynprune.checkpoint import model_from_checkpoint  # noqa: E402
from dynprune.compact import CompactDetector  # noqa: E402


def with_pad(det, pad):
    for b in det.blocks:
        b.pad_to = pad
        b._np = None
        b._native = None
        b._views = {}
    return det


gated, data, pa, pb = (
    sys.argv[1],
    sys.argv[2],
    tuple(map(int, sys.argv[3].split(","))),
    tuple(map(int, sys.argv[4].split(","))),
)
torch.set_num_threads(2)
frames = frames_from(data, 320, 40)
model, _ = model_from_checkpoint(gated)
A, B = with_pad(CompactDetector(model), pa), with_pad(CompactDetector(model), pb)
with torch.inference_mode():
    ya, yb = A(frames[0]), B(frames[0])
    print("max diff", max((u - v).abs().max().item() for u, v in zip(ya, yb)))
gains = []
for order in ((A, B), (B, A)) * 3:
    (t0, _), (t1, _) = time_interleaved(list(order), frames)
    ta, tb = (t0, t1) if order[0] is A else (t1, t0)
    gains.append(1 - tb / ta)
    print(f"pad {pa}: {ta:6.2f} ms   pad {pb}: {tb:6.2f} ms   {gains[-1] * 100:5.1f}% faster")
print(f"mean gain {sum(gains) / len(gains) * 100:.1f}%")
