"""ONNX Runtime CPU latency (batch 1) of dense / statically pruned checkpoints.

    python benchmarks/static_latency.py runs/dense/best.pt runs/prune/best.pt --json ort.json

Each checkpoint is exported to ONNX (BN folded, static shape) and timed in ONNX Runtime on
random letterbox-sized inputs: median and p95 of --iters runs after a warm-up. Prints a
table with parameters, GFLOPs and the checkpoint's recorded AP.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--json")
    args = ap.parse_args()
    import onnxruntime as ort

    from dynprune.checkpoint import model_from_checkpoint
    from dynprune.export import export_onnx
    from dynprune.flops import count_flops, count_parameters

    rows = []
    for path in args.checkpoints:
        model, ckpt = model_from_checkpoint(path)
        imgsz = ckpt["imgsz"]
        with tempfile.TemporaryDirectory() as tmp:
            onnx_path = export_onnx(model, str(Path(tmp) / "m.onnx"), imgsz)
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = args.threads
            sess = ort.InferenceSession(onnx_path, opts, providers=["CPUExecutionProvider"])
            x = np.random.default_rng(0).random((1, 3, imgsz, imgsz), dtype=np.float32)
            for _ in range(10):
                sess.run(None, {"images": x})
            times = []
            for _ in range(args.iters):
                t0 = time.perf_counter()
                sess.run(None, {"images": x})
                times.append((time.perf_counter() - t0) * 1e3)
        m = ckpt.get("metrics") or {}
        rows.append({"checkpoint": path, "kind": ckpt.get("kind"), "imgsz": imgsz,
                     "params_m": count_parameters(model) / 1e6, "gflops": count_flops(model, imgsz) / 1e9,
                     "ap50": m.get("ap50"), "ap50_95": m.get("ap50_95"), "ort_p50_ms": float(np.median(times)),
                     "ort_p95_ms": float(np.percentile(times, 95))})
    print(f"{'checkpoint':<48}{'params M':>9}{'GFLOPs':>8}{'AP50':>8}{'AP50-95':>9}{'ORT ms':>8}")
    for r in rows:
        ap50 = f"{r['ap50']:.4f}" if r["ap50"] is not None else "-"
        ap = f"{r['ap50_95']:.4f}" if r["ap50_95"] is not None else "-"
        print(f"{r['checkpoint'][-48:]:<48}{r['params_m']:>9.3f}{r['gflops']:>8.3f}{ap50:>8}{ap:>9}"
              f"{r['ort_p50_ms']:>8.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
