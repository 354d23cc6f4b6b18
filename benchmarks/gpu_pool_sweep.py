"""GPU sweep of the fused pool-and-gates kernel's tiling (docs/DESIGN.md, "The GPU path").

    python3 benchmarks/gpu_pool_sweep.py --json pool_sweep.json      # on a CUDA machine

For the untrained nano detector with group-8 gates at keep ~0.5 (as ``gpu_kernels.py``), batch
1, fp16: the whole dynamic network in a CUDA graph with the pool apart (``fuse_pool = False``)
and fused, for each pooling tile (pixels x channels of one load) and cap on programs per image.
``--sms N``: on a green context of N SMs (dynprune/sm_limit.py), a Jetson's regime, where fewer
programs may win. Prints one line per setting and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[320, 640])
    ap.add_argument("--tiles", type=int, nargs="+", default=[2048, 4096, 8192])
    ap.add_argument("--programs", type=int, nargs="+", default=[8, 16, 32, 128])
    ap.add_argument("--sms", type=int, help="run on at most N SMs (a CUDA green context; checked)")
    ap.add_argument("--json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu_pool_sweep.py needs a CUDA GPU")
    sys.path.insert(0, "benchmarks")
    from gpu_kernels import class_switch, gated_nano, graph_ms
    from provenance import provenance

    import dynprune.kernels.gate_index as gate_index
    from dynprune.compact import CompactDetector
    from dynprune.kernels.triton_block import TritonBlock
    from dynprune.sm_limit import checked_limit

    defaults = gate_index.POOL_TILE, gate_index.POOL_PROGRAMS
    result = {}
    limit, sm_check = checked_limit(args.sms, log=lambda line: print(line, flush=True))
    try:
        with limit:  # every kernel, graph replays included, on the confined SMs
            for imgsz in args.sizes:
                _, gated = gated_nano(0.5, imgsz, 8)
                dyn = CompactDetector(gated.cuda(), backend="triton", device="cuda").to(torch.float16)
                x = torch.rand(1, 3, imgsz, imgsz, device="cuda", dtype=torch.float16)
                with torch.no_grad():
                    with class_switch(TritonBlock, "fuse_pool", False):
                        result[f"{imgsz} pool apart"] = graph_ms(dyn, x)
                    print(f"{imgsz} pool apart: {result[f'{imgsz} pool apart']:.4f} ms", flush=True)
                    for tile in args.tiles:
                        for progs in args.programs:
                            gate_index.POOL_TILE, gate_index.POOL_PROGRAMS = tile, progs
                            key = f"{imgsz} tile {tile} programs {progs}"
                            result[key] = graph_ms(dyn, x)
                            print(f"{key}: {result[key]:.4f} ms", flush=True)
    finally:
        gate_index.POOL_TILE, gate_index.POOL_PROGRAMS = defaults
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({**provenance(), "sm_limit": sm_check, "timings_ms": result}, fh, indent=1)


if __name__ == "__main__":
    main()
