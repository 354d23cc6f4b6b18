"""CPU benchmark: dense vs dynamic (compact, gates included) latency of the detector, batch 1.

    python benchmarks/cpu_dynamic.py --dense runs/dense/best.pt --gated runs/gate/best.pt --data synthetic
    python benchmarks/cpu_dynamic.py --keep 0.5            # untrained nano with gates set to keep ~50%

Frames are real validation images (so each frame keeps its own channel set); the network
runs from the letterboxed tensor to the decoded boxes (NMS excluded, the same for both).
Prints a table and writes JSON (--json).
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import torch

from dynprune.compact import CompactDetector, dense_inference_model
from dynprune.flops import CostModel


def synthetic_gated(keep: float, imgsz: int, group: int, keep_on: str = "mean", size: str = "nano"):
    """An untrained model of ``size`` with gates whose thresholds keep about ``keep`` of each layer
    (of the mean saliency with ``keep_on="mean"``, ManiDP's rule; of each frame with "frames")."""
    from dynprune.config import config_for
    from dynprune.gates import Gate, set_gate_mode
    from dynprune.manidp import SaliencyStats
    from dynprune.model import build_detector

    torch.manual_seed(0)
    dense = build_detector(config_for(size)).eval()
    gated = build_detector(config_for(size, gate_group=group)).eval()
    gated.load_state_dict(dense.state_dict())
    gated.add_gates(group=group)
    for g in (m for m in gated.modules() if isinstance(m, Gate)):
        g.fc2.weight.data.normal_(0, 0.3)
    set_gate_mode(gated, "threshold")
    stats = SaliencyStats(gated.blocks, keep_on=keep_on)
    with torch.no_grad():
        for _ in range(4):
            gated(torch.rand(4, 3, imgsz, imgsz))
            stats.update(gated.blocks)
    stats.apply_thresholds(keep)
    return dense, gated


def frames_from(data: str | None, imgsz: int, n: int):
    if data:
        from dynprune.data import load_dataset
        from dynprune.data.dataset import DetectionDataset

        spec = load_dataset(data)
        ds = DetectionDataset(spec.val[:n], imgsz)
        return [ds[i][0][None] for i in range(len(ds))]
    g = torch.Generator().manual_seed(0)
    return [torch.rand(1, 3, imgsz, imgsz, generator=g) * (i % 4 + 1) / 4 for i in range(n)]


def time_interleaved(fns, frames, repeats: int = 3):
    """``[(p50_ms, p95_ms)]`` per function, timed frame by frame in alternation, so that a
    slow spell of the machine (another process, clock changes) hits every model alike."""
    times = [[] for _ in fns]
    # inference_mode, as dynprune serve and bench run the engines: it skips autograd's version
    # counters, and the compact blocks make more (and smaller) tensors than the dense model
    # (measured here: dense 30.73 -> 30.32 ms, dynamic 20.50 -> 19.94 ms against no_grad)
    with torch.inference_mode():
        for f in frames[:10]:
            for fn in fns:
                fn(f)
        for r in range(repeats):
            for f in frames:
                order = range(len(fns)) if r % 2 == 0 else reversed(range(len(fns)))
                for j in order:
                    t0 = time.perf_counter()
                    fns[j](f)
                    times[j].append((time.perf_counter() - t0) * 1e3)
    return [(float(np.median(t)), float(np.percentile(t, 95))) for t in times]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dense")
    ap.add_argument("--gated")
    ap.add_argument("--data", help="dataset whose val images are the frames (default: random frames)")
    ap.add_argument("--imgsz", type=int, default=320)
    ap.add_argument("--keep", type=float, default=0.5, help="without checkpoints: keep ratio of the gates")
    ap.add_argument("--group", type=int, default=1)
    ap.add_argument("--frames", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.dense and args.gated:
        from dynprune.checkpoint import model_from_checkpoint

        dense, _ = model_from_checkpoint(args.dense)
        gated, _ = model_from_checkpoint(args.gated)
    else:
        dense, gated = synthetic_gated(args.keep, args.imgsz, args.group)
    frames = frames_from(args.data, args.imgsz, args.frames)
    fast_dense = dense_inference_model(dense)
    compact = CompactDetector(gated)
    cost = CostModel(gated, args.imgsz)
    widths = torch.tensor([[b.h1, b.h2] for b in gated.blocks], dtype=torch.float64)
    keeps, flops = [], []
    with torch.inference_mode():
        for f in frames:
            compact(f)
            k = compact.kept_counts()[0]
            keeps.append(float((k / widths).mean()))
            flops.append(cost.frame_flops(k.tolist()) / cost.dense)
    (d50, d95), (y50, y95) = time_interleaved([fast_dense, compact], frames)
    res = {"imgsz": args.imgsz, "threads": args.threads, "frames": len(frames), "torch": torch.__version__,
           "cpu": platform.processor() or platform.machine(), "keep_mean": float(np.mean(keeps)),
           "flops_fraction_mean": float(np.mean(flops)), "dense_p50_ms": d50, "dense_p95_ms": d95,
           "dynamic_p50_ms": y50, "dynamic_p95_ms": y95, "speedup": d50 / y50,
           "gated_fraction_of_flops": cost.gated_fraction}
    print(f"{'model':<10}{'p50 ms':>9}{'p95 ms':>9}{'keep':>7}{'FLOPs':>7}")
    print(f"{'dense':<10}{d50:>9.2f}{d95:>9.2f}{1.0:>7.2f}{1.0:>7.2f}")
    print(f"{'dynamic':<10}{y50:>9.2f}{y95:>9.2f}{res['keep_mean']:>7.2f}{res['flops_fraction_mean']:>7.2f}")
    print(f"speed-up {res['speedup']:.2f}x at mean keep {res['keep_mean']:.2f} "
          f"({args.imgsz} px, batch 1, {args.threads} threads, gates included)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=2)


if __name__ == "__main__":
    main()
