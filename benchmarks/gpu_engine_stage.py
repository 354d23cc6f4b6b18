"""GPU: where the serving engines' network stage goes beyond the CUDA graph.

    python3 benchmarks/gpu_engine_stage.py --dense dense.pt --gated gates.pt --imgsz 320

Host clock around each piece, synchronised after every call (microseconds, mean of 300):
``network()`` as ``dynprune serve``/``bench`` time it, the graph replay with its output
copies, and the bare replay, for the dense and the dynamic engine. Prints one line each.
"""

from __future__ import annotations

import argparse
import time

import torch


def host_us(fn, n: int = 300) -> float:
    for _ in range(30):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dense", required=True)
    ap.add_argument("--gated", required=True)
    ap.add_argument("--imgsz", type=int, default=320)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu_engine_stage.py needs a CUDA GPU")
    from dynprune.serve.engines import DenseEngine, DynamicEngine

    dev = torch.device("cuda")
    engines = {"dense": DenseEngine(args.dense, dev), "dynamic": DynamicEngine(args.gated, dev)}
    x = torch.rand(1, 3, args.imgsz, args.imgsz, device=dev)
    with torch.inference_mode():
        for name, eng in engines.items():
            eng.network(x)  # captures the graph
            print(f"{name:<8} network() {host_us(lambda: eng.network(x)):7.1f} us   "  # noqa: B023
                  f"replay + output copies {host_us(lambda: eng.graphed(x.to(eng.dtype))):7.1f} us   "  # noqa: B023
                  f"replay {host_us(eng.graphed.graph.replay):7.1f} us")


if __name__ == "__main__":
    main()
