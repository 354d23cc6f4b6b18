"""A/B of reusing the gathered weights when a block keeps the last frame's channels: two CompactDetectors, one
with every block's last gather forgotten before each call (a pre-hook), the other with a no-op hook of the same
cost; frames from a video (consecutive) or a dataset (distinct); time_interleaved, both orders
(BENCHMARKS.md, session 15).

    python benchmarks/results/cpu_session15/reuse_ab.py runs/demo/bundle/dynamic.pt runs/demo/data/video.mp4 256
    python benchmarks/results/cpu_session15/reuse_ab.py g0.5.pt ../shared/datasets/raccoon 320
"""

import sys

import cv2
import numpy as np
import torch

sys.path.insert(0, "benchmarks")
from cpu_dynamic import frames_from, time_interleaved

from dynprune.boxes import letterbox
from dynprune.checkpoint import model_from_checkpoint
from dynprune.compact import CompactDetector

torch.set_num_threads(2)
gates, source, imgsz = sys.argv[1], sys.argv[2], int(sys.argv[3])
if source.endswith(".mp4"):
    cap = cv2.VideoCapture(source)
    frames = []
    while len(frames) < 120:
        ok, img = cap.read()
        if not ok:
            break
        canvas = letterbox(img[:, :, ::-1], imgsz)[0]
        frames.append(torch.from_numpy(np.ascontiguousarray(canvas.transpose(2, 0, 1)))[None].float() / 255)
else:
    frames = frames_from(source, imgsz, 40)
model, _ = model_from_checkpoint(gates)
A, B = CompactDetector(model).eval(), CompactDetector(model).eval()


def forget(m, inp):
    m._native.gathered[0] = -1


def keep(m, inp):
    m._native.gathered[1] += 0


with torch.inference_mode():
    A(frames[0])
    B(frames[0])
for blk in A.blocks:
    blk.register_forward_pre_hook(forget)
for blk in B.blocks:
    blk.register_forward_pre_hook(keep)
hits = np.zeros(len(B.blocks))
with torch.inference_mode():
    for f in frames:
        B(f)
        hits += [int(b._native.reused[0]) for b in B.blocks]
print("share of frames reusing the gather, per block:", np.round(hits / len(frames), 2).tolist())
gains = []
for i in range(4):
    order = [A, B] if i % 2 == 0 else [B, A]
    (t0, _), (t1, _) = time_interleaved(order, frames)
    ta, tb = (t0, t1) if order[0] is A else (t1, t0)
    gains.append(1 - tb / ta)
    print(f"gather every frame {ta:6.2f} ms   reuse {tb:6.2f} ms   {gains[-1] * 100:5.1f}% faster", flush=True)
print(f"mean {np.mean(gains) * 100:.1f}%")
