"""Session 12: the inference layers before and after FoldedConv, interleaved in one process.

    git show f1a7ca0:dynprune/fusion.py > old_fusion.py
    python folded_conv_ab.py DENSE.pt GATED.pt RACCOON_DIR [repeats]
"""

import importlib.util
import sys
import time

import numpy as np
import torch

import dynprune.compact as compact
from dynprune.checkpoint import model_from_checkpoint
from dynprune.data import load_dataset
from dynprune.data.dataset import DetectionDataset

spec = importlib.util.spec_from_file_location("old_fusion", "old_fusion.py")
old = importlib.util.module_from_spec(spec)
spec.loader.exec_module(old)
torch.set_num_threads(2)
dense, _ = model_from_checkpoint(sys.argv[1])
gated, _ = model_from_checkpoint(sys.argv[2])
ds = DetectionDataset(load_dataset(sys.argv[3]).val[:40], 320)
frames = [ds[i][0][None] for i in range(len(ds))]
repeats = int(sys.argv[4]) if len(sys.argv) > 4 else 4

new_models = compact.DenseInference(dense), compact.CompactDetector(gated)
fuse, pointwise = compact.fuse_conv_bn, compact.pointwise_as_matmul
compact.fuse_conv_bn, compact.pointwise_as_matmul = old.fuse_conv_bn, old.pointwise_as_matmul
old_models = compact.DenseInference(dense), compact.CompactDetector(gated)
compact.fuse_conv_bn, compact.pointwise_as_matmul = fuse, pointwise

names = ["dense old", "dense new", "dynamic old", "dynamic new"]
models = [old_models[0], new_models[0], old_models[1], new_models[1]]
times = [[] for _ in models]
with torch.inference_mode():
    outs = [m(frames[0]) for m in models]
    print("max difference", (outs[0][1] - outs[1][1]).abs().max().item(), (outs[2][1] - outs[3][1]).abs().max().item())
    for f in frames[:10]:
        for m in models:
            m(f)
    for r in range(repeats):
        for f in frames:
            for j in range(4) if r % 2 == 0 else reversed(range(4)):
                t = time.perf_counter()
                models[j](f)
                times[j].append(time.perf_counter() - t)
med = [np.median(t) * 1e3 for t in times]
print(" ".join(f"{n} {m:.2f} ms" for n, m in zip(names, med)),
      f"| speed-up old {med[0] / med[2]:.3f}x new {med[1] / med[3]:.3f}x")
