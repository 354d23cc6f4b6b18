"""The gated 3x3 and 1x1 layers of the nano detector, once each on cuDNN and on the Triton gather
convolution, for Nsight Compute: why a kernel loses per FLOP where it does.

    ncu --nvtx --nvtx-include "profile/" --section SpeedOfLight --section Occupancy \\
        --section LaunchStats --section WarpStateStats --section MemoryWorkloadAnalysis \\
        --csv --page details python benchmarks/gpu_layer_profile.py --sms 8 > ncu-layers.csv

Warm-up calls (the Triton compile, cuDNN's choice) run first, outside the ``profile`` NVTX range,
so that Nsight Compute sees only one launch of each implementation per layer. ``--sms N`` runs
everything on a green context of N SMs (dynprune/sm_limit.py). Each launch is preceded by an NVTX
range naming the layer and implementation (``layer 3x3 64->64 @80x80 triton_default``; ``cudnn``;
``triton_runtime``: the tile the runtime picks, tuned where the cache has one), which the CSV's
``NVTX`` columns carry.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    from gpu_kernels import conv_shapes, layer_inputs, layer_name

    from dynprune.kernels import conv_tiles
    from dynprune.kernels.gather_conv import gather_conv2d_triton, weight_layout_for

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--imgsz", type=int, default=640)
    ap.add_argument("--keep", type=float, default=1.0)
    ap.add_argument("--sms", type=int, help="run on at most N SMs (a CUDA green context)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu_layer_profile.py needs a CUDA GPU")
    limit = contextlib.nullcontext()
    if args.sms:
        from dynprune.sm_limit import SMLimit

        limit = SMLimit(args.sms)
    with limit, torch.inference_mode():
        launches = []
        for s in conv_shapes(args.imgsz):
            pad = s["k"] // 2
            x, wt, bias, *_ = layer_inputs(s, 1.0, torch.float16, "ohwi", True)
            launches.append((f"{layer_name(s)} cudnn",
                             lambda x=x, wt=wt, bias=bias, pad=pad: torch.nn.functional.conv2d(x, wt, bias,
                                                                                              padding=pad)))
            inputs = layer_inputs(s, args.keep, torch.float16, weight_layout_for(s["k"]), run=8)
            x, wt, bias, ii, ic, oi, oc, _ = inputs
            default = conv_tiles.default_tile(s["cout"], s["cin"], s["k"], s["H"] * s["W"], 8)
            # the default tile, and the one the runtime picks (tuned where the cache has it)
            for tag, tile in (("triton_default", default), ("triton_runtime", {})):
                launches.append((f"{layer_name(s)} {tag}", lambda inputs=inputs, pad=pad, tile=tile:
                                 gather_conv2d_triton(*inputs[:7], padding=pad, in_run=8, tile=tile or None)))
        for _ in range(3):  # compile and choose outside the profiled range
            for _, fn in launches:
                fn()
        torch.cuda.synchronize()
        torch.cuda.nvtx.range_push("profile")
        for name, fn in launches:
            torch.cuda.nvtx.range_push(f"layer {name}")
            fn()
            torch.cuda.nvtx.range_pop()
        torch.cuda.nvtx.range_pop()
        torch.cuda.synchronize()
    print(f"{len(launches)} launches profiled: " + ", ".join(name for name, _ in launches))


if __name__ == "__main__":
    main()
