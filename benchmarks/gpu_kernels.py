"""GPU benchmark of the Triton gather convolutions and the whole dynamic network (issue 4).

    python benchmarks/gpu_kernels.py --json gpu.json            # on a CUDA machine

1. Per layer, for the nano detector's real gated layer shapes at 320 and 640, batch 1, fp16:
   cuDNN dense convolution vs the Triton gather convolution at keep 1.0, 0.75, 0.5, 0.25
   (kept input and output channels both at that ratio), each checked against the float64
   PyTorch reference (relative error) before it is timed.
2. Whole network at 640 (and 320), fp16, batch 1, gates included: dense eager, dense in a
   CUDA graph, dynamic eager, dynamic in a CUDA graph, at a mean keep ratio near --keep.
Timing: triton.testing.do_bench (CUDA events, median), warm-up excluded; inputs are random
(never zeros). Prints a table and writes JSON. Method notes: benchmarks/GPU_NOTES.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial

import torch


def layer_shapes(imgsz: int):
    from dynprune.config import config_for
    from dynprune.model import build_detector

    model = build_detector(config_for("nano"))
    hw = []
    hooks = [b.register_forward_hook(lambda m, i, o: hw.append(o.shape[-2:])) for b in model.blocks]
    with torch.no_grad():
        model(torch.zeros(1, 3, imgsz, imgsz))
    for h in hooks:
        h.remove()
    for b, (h, w) in zip(model.blocks, hw):
        yield {"c": b.c, "h1": b.h1, "h2": b.h2, "H": int(h), "W": int(w)}


def rel_err(out, ref):
    return float((out.double() - ref).norm() / ref.norm().clamp_min(1e-30))


def bench_layers(imgsz: int, keeps, dtype):
    import triton.testing

    from dynprune.kernels.gather_conv import gather_conv2d_triton
    from dynprune.kernels.reference import gather_conv2d_padded

    rows = []
    for s in layer_shapes(imgsz):
        cin, cout, k, h, w = s["h1"], s["h2"], 3, s["H"], s["W"]
        x = torch.randn(1, cin, h, w, device="cuda", dtype=dtype)
        wt = (torch.randn(cout, cin, k, k, device="cuda") / (cin * 9) ** 0.5).to(dtype)
        bias = torch.randn(cout, device="cuda", dtype=dtype)
        dense_ms = triton.testing.do_bench(partial(torch.nn.functional.conv2d, x, wt, bias, padding=1),
                                           return_mode="median")
        row = {"imgsz": imgsz, "layer": f"3x3 {cin}->{cout} @{h}x{w}", "cudnn_ms": dense_ms}
        for keep in keeps:
            n_in, n_out = max(1, round(cin * keep)), max(1, round(cout * keep))
            ii = torch.randperm(cin, device="cuda").to(torch.int32)[None]
            oi = torch.randperm(cout, device="cuda").to(torch.int32)[None]
            ic = torch.tensor([n_in], device="cuda", dtype=torch.int32)
            oc = torch.tensor([n_out], device="cuda", dtype=torch.int32)
            out = torch.full((1, cout, h, w), float("nan"), device="cuda", dtype=dtype)
            gather_conv2d_triton(x, wt, bias, ii, ic, oi, oc, padding=1, out=out)
            ref = gather_conv2d_padded(x.double().cpu(), wt.double().cpu(), bias.double().cpu(), ii.cpu(), ic.cpu(),
                                       oi.cpu(), oc.cpu(), padding=1)
            err = rel_err(out[0, :n_out].cpu(), ref[0, :n_out])
            ms = triton.testing.do_bench(
                partial(gather_conv2d_triton, x, wt, bias, ii, ic, oi, oc, padding=1, out=out), return_mode="median")
            row[f"triton_{keep}_ms"] = ms
            row[f"triton_{keep}_relerr"] = err
        rows.append(row)
    return rows


def gated_nano(keep: float, imgsz: int, group: int):
    sys.path.insert(0, "benchmarks")
    from cpu_dynamic import synthetic_gated

    return synthetic_gated(keep, imgsz, group)


def graph_ms(fn, x):
    import triton.testing

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn(x)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn(x)
    return triton.testing.do_bench(g.replay, return_mode="median")


def bench_network(imgsz: int, keep: float, group: int, dtype):
    import triton.testing

    from dynprune.compact import CompactDetector
    from dynprune.fusion import fuse_conv_bn

    dense, gated = gated_nano(keep, imgsz, group)
    dense = fuse_conv_bn(dense).cuda().to(dtype)
    dyn = CompactDetector(gated.cuda(), backend="triton", device="cuda").to(dtype)
    x = torch.rand(1, 3, imgsz, imgsz, device="cuda", dtype=dtype)
    with torch.no_grad():
        dyn(x)
        kept = dyn.kept_counts()[0].float().cpu()
        widths = torch.tensor([[b.h1, b.h2] for b in dyn.blocks], dtype=torch.float32)
        row = {"imgsz": imgsz, "keep_mean": float((kept / widths).mean()),
               "dense_eager_ms": triton.testing.do_bench(lambda: dense(x), return_mode="median"),
               "dense_graph_ms": graph_ms(dense, x),
               "dynamic_eager_ms": triton.testing.do_bench(lambda: dyn(x), return_mode="median"),
               "dynamic_graph_ms": graph_ms(dyn, x)}
    row["speedup_graph"] = row["dense_graph_ms"] / row["dynamic_graph_ms"]
    return row


def ceilings() -> dict:
    """The device's two ceilings, measured once (device METHOD): copy bandwidth and fp16 matmul rate."""
    import triton.testing

    src = torch.randn(256 * 2**20, device="cuda", dtype=torch.float16)  # 512 MiB
    dst = torch.empty_like(src)
    copy_ms = triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median")
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    mm_ms = triton.testing.do_bench(lambda: a @ b, return_mode="median")
    empty = torch.empty(1, device="cuda")
    launch_ms = triton.testing.do_bench(lambda: empty.add_(1), return_mode="median")
    return {"copy_TBps": 2 * src.numel() * 2 / copy_ms / 1e9, "fp16_matmul_TFLOPs": 2 * 8192**3 / mm_ms / 1e9,
            "tiny_kernel_us": launch_ms * 1e3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keep", type=float, default=0.5)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--dtype", default="fp16", choices=["fp16", "fp32"])
    ap.add_argument("--json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu_kernels.py needs a CUDA GPU")
    dtype = torch.float16 if args.dtype == "fp16" else torch.float32
    keeps = (1.0, 0.75, 0.5, 0.25)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "dtype": args.dtype,
              "layers": [], "network": []}
    result["ceilings"] = ceilings()
    print("ceilings:", {k: round(v, 2) for k, v in result["ceilings"].items()})
    for imgsz in (320, 640):
        result["layers"] += bench_layers(imgsz, keeps, dtype)
        result["network"].append(bench_network(imgsz, args.keep, args.group, dtype))
    print(f"{result['device']}, {args.dtype}, batch 1")
    print(f"{'size':>5} {'layer':<26}{'cuDNN':>8}" + "".join(f"{'k=' + str(k):>9}" for k in keeps) + "   max rel err")
    for r in result["layers"]:
        errs = max(r[f"triton_{k}_relerr"] for k in keeps)
        print(f"{r['imgsz']:>5} {r['layer']:<26}{r['cudnn_ms']:>8.4f}"
              + "".join(f"{r[f'triton_{k}_ms']:>9.4f}" for k in keeps) + f"   {errs:.1e}")
    print(f"\n{'size':>5}{'keep':>6}{'dense':>9}{'dense+graph':>13}{'dyn':>9}{'dyn+graph':>11}{'speed-up':>10}")
    for r in result["network"]:
        print(f"{r['imgsz']:>5}{r['keep_mean']:>6.2f}{r['dense_eager_ms']:>9.3f}{r['dense_graph_ms']:>13.3f}"
              f"{r['dynamic_eager_ms']:>9.3f}{r['dynamic_graph_ms']:>11.3f}{r['speedup_graph']:>9.2f}x")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
