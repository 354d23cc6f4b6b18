# Demo gate settings (dynprune/demo.py) with N epochs on a given dense model: python demo_gate_epochs.py EPOCHS:SEED ...
# The paths are the session-11 demo run folder (/tmp/ci3/runs/demo); point them at your own run.
import sys
import time

import torch

from dynprune.data import load_dataset
from dynprune.train.engine import TrainConfig
from dynprune.train.gate import train_gates

torch.set_num_threads(2)
dense_w = "/tmp/ci3/runs/demo/dense/best.pt"
spec = load_dataset("/tmp/ci3/runs/demo/data/synthetic-s0-n480-320/data.yaml")
for epochs, seed in [(int(a.split(':')[0]), int(a.split(':')[1])) for a in sys.argv[1:]]:
    t = time.time()
    cfg = TrainConfig(epochs=epochs, batch=16, imgsz=256, lr=1e-3, workers=1, out=f"/tmp/s11/dg_{epochs}_{seed}",
                      warmup_epochs=0.5, mosaic=0.0, seed=seed, extra={"dense": dense_w})
    train_gates(dense_w, spec, cfg, keep=0.5, method="manidp", group=1, threshold_every=10)
    print("DONE", epochs, seed, round(time.time() - t), flush=True)
