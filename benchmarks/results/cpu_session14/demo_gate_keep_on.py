"""The demo's gate stage again, on a finished demo's dense model, with ``--keep-on mean`` or ``frames``.

    python benchmarks/results/cpu_session14/demo_gate_keep_on.py runs/demo frames

Same settings as ``dynprune demo``'s stage 3 (8 epochs, group 1, thresholds every 10 steps, keep 0.5);
prints the last epoch's AP and the realised keep and FLOPs on the val images.
"""

from __future__ import annotations

import sys
import time

from dynprune.data import load_dataset
from dynprune.train.engine import TrainConfig
from dynprune.train.gate import train_gates


def main() -> None:
    root, keep_on = sys.argv[1], sys.argv[2]
    spec = load_dataset(f"{root}/data/synthetic-s0-n480-320/data.yaml")
    cfg = TrainConfig(epochs=8, batch=16, imgsz=256, lr=1e-3, workers=1, out=f"{root}/gate_{keep_on}",
                      warmup_epochs=0.5, mosaic=0.0, extra={"dense": f"{root}/dense/best.pt"})
    t0 = time.time()
    result = train_gates(f"{root}/dense/best.pt", spec, cfg, keep=0.5, method="manidp", group=1, threshold_every=10,
                         keep_on=keep_on)
    last = {k: result["last"].get(k) for k in ("ap50", "ap50_95", "keep_mean", "flops_mean")}
    print(keep_on, last, f"{time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
