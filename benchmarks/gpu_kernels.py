"""GPU benchmark of the Triton gather convolutions and the whole dynamic network (issue 4).

    python benchmarks/gpu_kernels.py --json gpu.json            # on a CUDA machine

1. Per layer, for the nano detector's real gated layer shapes at 320 and 640, batch 1, fp16:
   cuDNN dense convolution vs the Triton gather convolution at keep 1.0, 0.75, 0.5, 0.25
   (kept input and output channels both at that ratio), each checked against the float64
   PyTorch reference (relative error) before it is timed.
2. Whole network at 640 (and 320), fp16, batch 1, gates included: dense eager, dense in a
   CUDA graph, dynamic eager, dynamic in a CUDA graph, at a mean keep ratio near --keep.
Timing: triton.testing.do_bench (CUDA events, median), warm-up excluded; inputs are random
(never zeros). Prints a table and writes JSON. Why the kernels look as they do: docs/DESIGN.md, "The GPU path".
"""

from __future__ import annotations

import argparse
import contextlib
import copy
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


def capture(fn, calls: int = 1) -> torch.cuda.CUDAGraph:
    """``calls`` calls of ``fn()`` in one CUDA graph, after three warm-up calls on a side stream."""
    from dynprune.timing import capture_graph

    return capture_graph(fn, calls, warmup=3)


def graph_per_call_ms(fn, calls: int = 20) -> float:
    """GPU time of one call: ``calls`` calls captured in one CUDA graph, replays timed with events
    (``triton.testing.do_bench``, median). Timing eager calls one by one measures the host's launch
    path instead (Triton's Python launcher costs ~10 us a call, PyTorch's conv dispatch ~20 us):
    every layer of this detector is shorter than that on an H100."""
    import triton.testing

    return triton.testing.do_bench(capture(fn, calls).replay, return_mode="median") / calls


def layer_name(s):
    return f"{s['k']}x{s['k']} {s['cin']}->{s['cout']} @{s['H']}x{s['W']}"


def layer_inputs(s, keep, dtype, layout="oihw", nhwc=True, run=1):
    """One layer's tensors at ``keep``; ``run`` > 1: the input list is whole aligned groups of
    ``run`` channels in random order, as group gates keep them."""
    from dynprune.kernels.gather_conv import with_layout

    cin, cout, k, h, w = s["cin"], s["cout"], s["k"], s["H"], s["W"]
    x = torch.randn(1, cin, h, w, device="cuda", dtype=dtype)
    if nhwc:
        x = x.contiguous(memory_format=torch.channels_last)
    wt = with_layout((torch.randn(cout, cin, k, k, device="cuda") / (cin * k * k) ** 0.5).to(dtype), layout)
    bias = torch.randn(cout, device="cuda", dtype=dtype)
    n_in, n_out = max(1, round(cin * keep)), max(1, round(cout * keep))
    if run > 1:
        groups = torch.randperm(cin // run, device="cuda")
        ii = (groups[:, None] * run + torch.arange(run, device="cuda")).flatten().to(torch.int32)[None]
    else:
        ii = torch.randperm(cin, device="cuda").to(torch.int32)[None]
    oi = torch.randperm(cout, device="cuda").to(torch.int32)[None]
    ic = torch.tensor([n_in], device="cuda", dtype=torch.int32)
    oc = torch.tensor([n_out], device="cuda", dtype=torch.int32)
    return x, wt, bias, ii, ic, oi, oc, n_out


def conv_shapes(imgsz: int):
    """The distinct 3x3 (h1 -> h2) and 1x1-in (c -> h1) convolutions of the gated blocks."""
    shapes = [{"cin": s["h1"], "cout": s["h2"], "k": 3, "H": s["H"], "W": s["W"]} for s in layer_shapes(imgsz)]
    shapes += [{"cin": s["c"], "cout": s["h1"], "k": 1, "H": s["H"], "W": s["W"]} for s in layer_shapes(imgsz)]
    return list({layer_name(s): s for s in shapes}.values())


def reference_for(s, inputs):
    from dynprune.kernels.reference import gather_conv2d_padded

    x, wt, bias, ii, ic, oi, oc, n_out = inputs
    ref = gather_conv2d_padded(x.double().cpu(), wt.double().cpu(), bias.double().cpu(), ii.cpu(), ic.cpu(),
                               oi.cpu(), oc.cpu(), padding=s["k"] // 2)
    return ref[0, :n_out]


def check_and_time(s, inputs, ref, dtype, cfg):
    from dynprune.kernels.gather_conv import empty_like_layout, gather_conv2d_triton

    x, wt, bias, ii, ic, oi, oc, n_out = inputs
    out = empty_like_layout(x, (1, s["cout"], s["H"], s["W"])).fill_(float("nan"))
    run = partial(gather_conv2d_triton, x, wt, bias, ii, ic, oi, oc, padding=s["k"] // 2, out=out, **cfg)
    run()
    return graph_per_call_ms(run), rel_err(out[0, :n_out].cpu(), ref)


def tuned_layer(inputs, s, run, listed: bool = True):
    """The layer's fastest correct Triton tile at the SMs in use (``dynprune tune``'s search): its ms
    and tile. ``listed`` False: all channels in and out, no kept lists (cuDNN not a candidate)."""
    from dynprune.kernels import conv_tiles
    from dynprune.kernels.gather_conv import gather_conv2d_triton

    x, wt, bias, ii, ic, oi, oc, n_out = inputs
    lists = (ii, ic, oi, oc) if listed else (None, None, None, None)
    with conv_tiles.record_calls() as calls:
        gather_conv2d_triton(x, wt, bias, *lists, padding=s["k"] // 2, in_run=run if listed else 1,
                             tile=None if listed else conv_tiles.default_tile(s["cout"], s["cin"], s["k"],
                                                                              s["H"] * s["W"]))

    def triton_only(key):
        return [t for t in conv_tiles.candidate_tiles(key) if not conv_tiles.is_cudnn(t)]

    [tuned] = conv_tiles.tune_calls(calls, candidates=triton_only)
    return tuned.ms, tuned.tile


def dense_triton_ms(s, dtype) -> float:
    """The Triton kernel with no kept lists at all (every channel, the shape's default tile): set
    against cuDNN it says what the kernel costs per FLOP apart from gathering."""
    from dynprune.kernels.conv_tiles import default_tile
    from dynprune.kernels.gather_conv import gather_conv2d_triton, weight_layout_for

    x, wt, bias, *_ = layer_inputs(s, 1.0, dtype, weight_layout_for(s["k"]))
    tile = default_tile(s["cout"], s["cin"], s["k"], s["H"] * s["W"])
    return graph_per_call_ms(partial(gather_conv2d_triton, x, wt, bias, None, None, None, None,
                                     padding=s["k"] // 2, tile=tile))


def bench_layers(imgsz: int, keeps, dtype, tune: bool = False):
    """cuDNN (the faster of NCHW and NHWC) against the Triton kernel as the runtime runs it:
    NHWC activations, weights in the runtime's layout, the shape's default tiles; ``tune``: also
    each layer's fastest tile at the SMs in use, with kept lists in runs of 8."""
    from dynprune.kernels.conv_tiles import default_tiles_only
    from dynprune.kernels.gather_conv import weight_layout_for

    rows = []
    for s in conv_shapes(imgsz):
        cudnn = []
        for nhwc in (False, True):
            x, wt, bias, *_ = layer_inputs(s, 1.0, dtype, "ohwi" if nhwc else "oihw", nhwc)
            cudnn.append(graph_per_call_ms(partial(torch.nn.functional.conv2d, x, wt, bias, padding=s["k"] // 2)))
        row = {"imgsz": imgsz, "layer": layer_name(s), "cudnn_nchw_ms": cudnn[0], "cudnn_nhwc_ms": cudnn[1],
               "cudnn_ms": min(cudnn), "triton_dense_ms": dense_triton_ms(s, dtype)}
        if tune:
            dense_inputs = layer_inputs(s, 1.0, dtype, weight_layout_for(s["k"]))
            row["triton_dense_tuned_ms"], row["triton_dense_tile"] = tuned_layer(dense_inputs, s, 1, listed=False)
        for keep in keeps:
            with default_tiles_only():
                inputs = layer_inputs(s, keep, dtype, weight_layout_for(s["k"]))
                row[f"triton_{keep}_ms"], row[f"triton_{keep}_relerr"] = check_and_time(
                    s, inputs, reference_for(s, inputs), dtype, {})
                # the same keep as group-8 gates give it: the kernel reads the list a run at a time
                inputs = layer_inputs(s, keep, dtype, weight_layout_for(s["k"]), run=8)
                row[f"triton_{keep}_r8_ms"], row[f"triton_{keep}_r8_relerr"] = check_and_time(
                    s, inputs, reference_for(s, inputs), dtype, {"in_run": 8})
            if tune:
                row[f"triton_{keep}_r8_tuned_ms"], row[f"triton_{keep}_r8_tile"] = tuned_layer(inputs, s, 8)
        rows.append(row)
    return rows


SWEEP = [dict(block_m=bm, block_n=bn, block_k=bk, num_warps=nw, num_stages=ns)
         for bm, bn, bk, nw, ns in [(64, 32, 32, 4, 3), (32, 32, 32, 4, 3), (32, 32, 64, 4, 3), (64, 64, 32, 4, 3),
                                    (128, 32, 32, 4, 3), (16, 32, 64, 4, 3), (64, 32, 32, 4, 2), (16, 16, 64, 2, 3),
                                    (32, 16, 64, 4, 3), (16, 64, 64, 4, 3), (32, 32, 128, 4, 3), (128, 64, 32, 4, 3),
                                    (64, 64, 64, 4, 3), (32, 64, 64, 4, 3), (64, 32, 64, 4, 3), (32, 32, 64, 4, 4),
                                    (64, 32, 64, 4, 4), (128, 64, 64, 8, 3)]]


def sweep(imgsz: int, dtype, keeps=(1.0, 0.5), run: int = 1):
    """Every block configuration and weight layout on every conv shape (NHWC activations, as the
    runtime runs them): what the defaults are chosen from. ``run`` 8: kept input lists of whole
    groups of 8 read a run at a time (``in_run``), OHWI weights only (the runtime's)."""
    from dynprune.kernels.gather_conv import WEIGHT_LAYOUTS, weight_layout_for

    rows = []
    for s in conv_shapes(imgsz):
        if run > 1 and s["k"] == 1:
            continue  # the runs sweep is for the 3x3 layers, where the time is
        for keep in keeps:
            mine = []
            inputs = layer_inputs(s, keep, dtype, weight_layout_for(s["k"]), run=run)
            default_ms = check_and_time(s, inputs, reference_for(s, inputs), dtype, {"in_run": run})[0]
            for layout in WEIGHT_LAYOUTS if run == 1 else (weight_layout_for(s["k"]),):
                inputs = layer_inputs(s, keep, dtype, layout, run=run)
                ref = reference_for(s, inputs)
                for cfg in SWEEP:
                    if run > 1 and cfg["block_k"] % run:
                        continue
                    try:
                        ms, err = check_and_time(s, inputs, ref, dtype, {**cfg, "in_run": run})
                    except Exception as exc:  # a configuration the GPU cannot hold (shared memory, registers)
                        print(f"  {layer_name(s)} {cfg}: {type(exc).__name__}", flush=True)
                        continue
                    mine.append({"layer": layer_name(s), "keep": keep, "layout": layout, "in_run": run, **cfg,
                                 "ms": ms, "relerr": err})
            best = min(mine, key=lambda r: r["ms"])
            worst_err = max(r["relerr"] for r in mine)
            print(f"sweep {layer_name(s):<24} keep {keep}: best {best['ms'] * 1e3:7.1f} us "
                  f"(conv_config's {default_ms * 1e3:7.1f}) with "
                  f"{ {k: best[k] for k in ('block_m', 'block_n', 'block_k', 'num_warps', 'num_stages', 'layout')} }"
                  f" worst err {worst_err:.1e}", flush=True)
            rows += mine
    return rows


def gated_nano(keep: float, imgsz: int, group: int):
    sys.path.insert(0, "benchmarks")
    from cpu_dynamic import synthetic_gated

    # keep_on="frames": thresholds that keep ``keep`` of each frame's channels on average, so the
    # network row is at the keep ratio the target names (ManiDP's mean rule lands elsewhere).
    return synthetic_gated(keep, imgsz, group, keep_on="frames")


@contextlib.contextmanager
def class_switch(cls: type, name: str, value):
    """Set one of the compact block's class-wide switches (``use_runs``, ``fuse_pool``) for the
    duration, then put the old value back, also on an error: a switch left off would change every
    later engine's measurement."""
    old = getattr(cls, name)
    setattr(cls, name, value)
    try:
        yield
    finally:
        setattr(cls, name, old)


def graph_ms(fn, x):
    """GPU time of one forward ``fn(x)`` replayed from a CUDA graph."""
    import triton.testing

    return triton.testing.do_bench(capture(lambda: fn(x)).replay, return_mode="median")


def profile_graphs(named_fns, x_by_name, replays: int = 20) -> dict:
    """GPU time per kernel name inside each model's CUDA graph (torch.profiler, CUPTI): where the
    time of a network goes, launch by launch."""
    from torch.profiler import ProfilerActivity, profile

    tables = {}
    for name, fn in named_fns.items():
        x = x_by_name[name]
        g = capture(lambda: fn(x))  # noqa: B023 (called before the loop moves on)
        g.replay()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(replays):
                g.replay()
            torch.cuda.synchronize()
        per_kernel = {}
        for ev in prof.events():
            if ev.device_type.name == "CUDA":
                k = ev.name[:60]
                n, us = per_kernel.get(k, (0, 0.0))
                per_kernel[k] = (n + 1, us + ev.time_range.elapsed_us() / replays)
        rows = sorted(per_kernel.items(), key=lambda kv: -kv[1][1])
        total = sum(us for _, (_, us) in rows)
        launches = sum(n for _, (n, _) in rows) / replays
        print(f"\n{name}: {launches:.0f} kernels per forward, {total:.1f} us of kernel time per forward")
        for k, (n, us) in rows[:14]:
            print(f"  {us:8.1f} us  {n / replays:5.0f}x  {k}")
        tables[name] = {"kernels": launches, "kernel_us": total, "top": [(k, n / replays, us) for k, (n, us) in rows]}
    return tables


def bench_network(imgsz: int, keep: float, group: int, dtype, batch: int = 1, profile: bool = False):
    import triton.testing

    from dynprune.compact import CompactDetector
    from dynprune.fusion import fuse_conv_bn

    dense, gated = gated_nano(keep, imgsz, group)
    dense = fuse_conv_bn(dense).cuda().to(dtype)
    dense_cl = copy.deepcopy(dense).to(memory_format=torch.channels_last)
    dyn = CompactDetector(gated.cuda(), backend="triton", device="cuda").to(dtype)
    x = torch.rand(batch, 3, imgsz, imgsz, device="cuda", dtype=dtype)
    with torch.no_grad():
        dyn(x)
        kept = dyn.kept_counts().float().cpu()
        widths = torch.tensor([[b.h1, b.h2] for b in dyn.blocks], dtype=torch.float32)
        row = {"imgsz": imgsz, "batch": batch, "keep_mean": float((kept / widths).mean()),
               "dense_eager_ms": triton.testing.do_bench(lambda: dense(x), return_mode="median"),
               "dense_graph_ms": graph_ms(dense, x),
               "dense_nhwc_graph_ms": graph_ms(dense_cl, x.contiguous(memory_format=torch.channels_last)),
               "dynamic_eager_ms": triton.testing.do_bench(lambda: dyn(x), return_mode="median"),
               "dynamic_graph_ms": graph_ms(dyn, x)}
        block_cls = type(dyn.blocks[0])
        if any(b.kept_run(b.gate1, b.h1) > 1 for b in dyn.blocks):  # what reading runs gains, same frame
            with class_switch(block_cls, "use_runs", False):
                row["dynamic_graph_no_runs_ms"] = graph_ms(dyn, x)
        with class_switch(block_cls, "fuse_pool", False):  # what pooling inside the gates' kernel gains
            row["dynamic_graph_pool_apart_ms"] = graph_ms(dyn, x)
    row["speedup_graph"] = min(row["dense_graph_ms"], row["dense_nhwc_graph_ms"]) / row["dynamic_graph_ms"]
    if profile:
        with torch.no_grad():
            xcl = x.contiguous(memory_format=torch.channels_last)
            row["profile"] = profile_graphs({"dense NHWC": dense_cl, "dynamic": dyn}, {"dense NHWC": xcl, "dynamic": x})
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
    ap.add_argument("--network-sizes", type=int, nargs="+", default=[320, 640],
                    help="image sizes of the whole-network rows")
    ap.add_argument("--batch", type=int, default=1, help="batch of the whole-network rows")
    ap.add_argument("--skip-layers", action="store_true", help="whole-network rows only")
    ap.add_argument("--layer-sizes", type=int, nargs="+", default=[320, 640], help="image sizes of the layer rows")
    ap.add_argument("--profile", action="store_true", help="kernel-by-kernel GPU time of each network graph")
    ap.add_argument("--tune", action="store_true",
                    help="layer rows: also each layer's fastest tile at the SMs in use (dynprune tune's search)")
    ap.add_argument("--sweep", action="store_true", help="time every block configuration per layer first")
    ap.add_argument("--sweep-run", type=int, default=1, help="the sweep's in_run (8: group-8 gates' kept lists)")
    ap.add_argument("--sms", type=int, help="run every kernel on at most N SMs (a CUDA green context; checked)")
    ap.add_argument("--json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu_kernels.py needs a CUDA GPU")
    from dynprune.sm_limit import SMLimitError, checked_limit

    try:
        limit, sm_check = checked_limit(args.sms, log=lambda line: print(line, flush=True))
    except SMLimitError as e:
        raise SystemExit(str(e)) from e
    dtype = torch.float16 if args.dtype == "fp16" else torch.float32
    keeps = (1.0, 0.75, 0.5, 0.25)
    from provenance import provenance

    result = {**provenance(), "device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "dtype": args.dtype, "layers": [], "network": []}
    result["sm_limit"] = sm_check
    with limit:  # every kernel, graph replays included, on the confined SMs
        result["ceilings"] = ceilings()
        print("ceilings:", {k: round(v, 2) for k, v in result["ceilings"].items()})
        for imgsz in args.network_sizes:
            result["network"].append(bench_network(imgsz, args.keep, args.group, dtype, args.batch, args.profile))
            print("network", result["network"][-1], flush=True)
        for imgsz in () if args.skip_layers else args.layer_sizes:
            result["layers"] += bench_layers(imgsz, keeps, dtype, args.tune)
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(result, fh, indent=2)
        if args.sweep:  # last: the longest part, and the tables above do not need it
            result["sweep"] = sweep(640, dtype, run=args.sweep_run)
            if args.json:
                with open(args.json, "w") as fh:
                    json.dump(result, fh, indent=2)
    print(f"{result['device']}, {args.dtype}, layers at batch 1, network at batch {args.batch}")
    print(f"{'size':>5} {'layer':<26}{'cuDNN':>8}" + "".join(f"{'k=' + str(k):>9}" for k in keeps) + "   max rel err")
    for r in result["layers"]:
        for tag, label in (("", ""), ("_r8", " runs of 8"), ("_r8_tuned", " tuned")):
            if f"triton_{keeps[0]}{tag}_ms" not in r:
                continue
            errs = max(r.get(f"triton_{k}{tag}_relerr", float("nan")) for k in keeps)
            print(f"{r['imgsz']:>5} {r['layer'] + label:<26}{r['cudnn_ms'] if not tag else float('nan'):>8.4f}"
                  + "".join(f"{r[f'triton_{k}{tag}_ms']:>9.4f}" for k in keeps) + f"   {errs:.1e}")
    print(f"\n{'size':>5} {'layer':<26}{'cuDNN':>8}{'Triton, no lists':>18}{'tuned':>8}")
    for r in result["layers"]:
        print(f"{r['imgsz']:>5} {r['layer']:<26}{r['cudnn_ms']:>8.4f}{r['triton_dense_ms']:>18.4f}"
              f"{r.get('triton_dense_tuned_ms', float('nan')):>8.4f}")
    print("(ms per call, GPU time: 20 calls in one CUDA graph)")
    print(f"\n{'size':>5}{'keep':>6}{'dense':>9}{'dense+graph':>13}{'nhwc+graph':>12}{'dyn':>9}{'dyn+graph':>11}"
          f"{'speed-up':>10}")
    for r in result["network"]:
        print(f"{r['imgsz']:>5}{r['keep_mean']:>6.2f}{r['dense_eager_ms']:>9.3f}{r['dense_graph_ms']:>13.3f}"
              f"{r['dense_nhwc_graph_ms']:>12.3f}{r['dynamic_eager_ms']:>9.3f}{r['dynamic_graph_ms']:>11.3f}"
              f"{r['speedup_graph']:>9.2f}x" + (f"   (runs off: dyn+graph {r['dynamic_graph_no_runs_ms']:.3f})"
                                                  if "dynamic_graph_no_runs_ms" in r else "")
              + f"   (pool apart: {r['dynamic_graph_pool_apart_ms']:.3f})")
    print("(speed-up: the faster dense graph over the dynamic graph, gates included)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
