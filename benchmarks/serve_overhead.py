"""Serving overhead on the CPU: capture, pre-process and post-process as a share of frame time.

    python benchmarks/serve_overhead.py runs/demo/bundle --source runs/demo/data/video.mp4

For each engine of the bundle, every frame of the source is read (capture), letterboxed
(pre-process), run (network, gates included) and decoded + NMS'd + mapped back (post-process);
the table gives the mean of each stage and overhead = (capture + pre + post) / total.
Writes JSON with --json.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from dynprune.serve.bundle import load_bundle
from dynprune.serve.engines import load_engines
from dynprune.serve.sources import open_source


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle")
    ap.add_argument("--source", required=True)
    ap.add_argument("--frames", type=int, default=150)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bundle = load_bundle(args.bundle)
    engines = load_engines(bundle, list(bundle["engines"]), torch.device("cpu"))
    rows = []
    for name, eng in engines.items():
        src = open_source(args.source, loop=True)
        stages = {"capture": [], "preprocess": [], "gates": [], "network": [], "postprocess": []}
        with torch.inference_mode():
            for i in range(args.frames + 5):
                t0 = time.perf_counter()
                frame = src.read()
                cap_ms = (time.perf_counter() - t0) * 1e3
                r = eng(frame.image)
                if i < 5:
                    continue  # warm-up
                stages["capture"].append(cap_ms)
                for k, v in r.timings.items():
                    stages[k.replace("_ms", "")].append(v)
        src.close()
        mean = {k: float(np.mean(v)) for k, v in stages.items()}
        total = sum(mean.values())
        rows.append({"engine": name, **{f"{k}_ms": v for k, v in mean.items()}, "total_ms": total,
                     "overhead": (mean["capture"] + mean["preprocess"] + mean["postprocess"]) / total})
    print(f"{'engine':<9}{'capture':>9}{'pre':>8}{'gates':>8}{'network':>9}{'post':>8}{'total':>8}{'overhead':>10}")
    for r in rows:
        print(f"{r['engine']:<9}{r['capture_ms']:>9.2f}{r['preprocess_ms']:>8.2f}{r['gates_ms']:>8.2f}"
              f"{r['network_ms']:>9.2f}{r['postprocess_ms']:>8.2f}{r['total_ms']:>8.2f}{r['overhead']:>10.1%}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"bundle": args.bundle, "source": args.source, "imgsz": bundle["imgsz"], "rows": rows}, fh,
                      indent=2)


if __name__ == "__main__":
    main()
