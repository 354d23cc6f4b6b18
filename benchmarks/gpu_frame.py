"""The whole frame against the network alone, per engine, at two input sizes (issue targets: end to
end at most 1.3x the network, and the dynamic engine keeping 90% of its network speed-up end to end).

    python benchmarks/gpu_frame.py BUNDLE --source FRAMES [--sizes 320 640] [--frames 40] --out DIR

For each size: the bundle with its input size set to it (the detector is fully convolutional;
every checkpoint is rewritten and the static ONNX exported again); ``dynprune bench`` of dense,
static and dynamic (the engines take turns), written whole to ``DIR/bench-raccoon-<size>.json``;
the same engines with the host frame path (OpenCV letterbox, NMS after a copy) for comparison; and
each network alone, replayed from its CUDA graph on one letterboxed frame, p50 of ``--iters`` calls
timed by CUDA events. Without a GPU (``--device cpu``) it runs the same steps as a smoke test.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Dict

from provenance import provenance


def bundle_at(bundle: str, size: int, out: Path) -> str:
    """A copy of ``bundle`` whose input size is ``size``."""
    from dynprune.checkpoint import load_checkpoint, save_atomic

    dst = out / f"bundle-{size}"
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(bundle, dst)
    meta = json.loads((dst / "metadata.json").read_text())
    for entry in meta["engines"].values():  # FLOPs grow with the pixels
        entry["gflops"] = entry["gflops"] * (size / meta["imgsz"]) ** 2
    meta["imgsz"] = size
    for name, entry in meta["engines"].items():
        ckpt = load_checkpoint(str(dst / entry["file"]))
        ckpt["imgsz"] = size
        save_atomic(ckpt, str(dst / entry["file"]))
        if name == "static":  # ONNX Runtime's model has a fixed input size
            from dynprune.checkpoint import model_from_checkpoint
            from dynprune.export import export_onnx

            export_onnx(model_from_checkpoint(ckpt)[0], str(dst / entry["onnx"]), size)
    (dst / "metadata.json").write_text(json.dumps(meta, indent=2))
    return str(dst)


def network_only_ms(engine, image, iters: int) -> float:
    """p50 of the engine's network alone (its CUDA graph on a GPU) on one letterboxed frame."""
    import numpy as np
    import torch

    x, _ = engine.input(image)
    x = x.to(engine.device)
    forward = getattr(engine, "graphed", None)  # the PyTorch engines; ONNX Runtime's (a CPU smoke run) has none
    arg = x.to(engine.dtype) if forward is not None else x
    forward = forward or engine.network
    times = []
    with torch.inference_mode():
        for _ in range(10):
            forward(arg)
        for _ in range(iters):
            if engine.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                forward(arg)
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                forward(arg)
                times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument("--source", required=True, help="frames: a folder of images or a video")
    ap.add_argument("--sizes", type=int, nargs="+", default=[320, 640])
    ap.add_argument("--frames", type=int, default=40)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--engines", nargs="+", default=["dense", "static", "dynamic"])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    import numpy as np
    import torch

    from dynprune.serve.bench import load_frames, measure_in_turns, run_bench
    from dynprune.serve.bundle import load_bundle
    from dynprune.serve.engines import load_engines

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    summary = []
    for size in args.sizes:
        bundle = bundle_at(args.bundle, size, out)
        result = run_bench(bundle, source=args.source, frames=args.frames, engines=args.engines,
                           out=str(out / f"bench-{size}"), device=args.device)
        engines = load_engines(load_bundle(bundle), args.engines, device)
        images, _, _ = load_frames(args.source, None, args.frames)
        network = {name: network_only_ms(e, images[0], args.iters) for name, e in engines.items()}
        for e in engines.values():
            e.frame_path = None  # the host path: OpenCV letterbox, the network, NMS after a copy
        host = measure_in_turns(engines, images)
        for row in result["rows"]:
            name = row["engine"]
            row["network_only_p50_ms"] = network[name]
            row["end_to_end_over_network"] = row["p50_ms"] / network[name]
            row["host_path_p50_ms"] = float(np.median(host[name]["lat"]))
        result.update(provenance(f"python benchmarks/gpu_frame.py BUNDLE --source FRAMES --sizes {size}"))
        result["gpu"] = torch.cuda.get_device_name(0) if device.type == "cuda" else "none"
        result["torch"] = torch.__version__
        (out / f"bench-raccoon-{size}.json").write_text(json.dumps(result, indent=1))
        rows: Dict[str, dict] = {r["engine"]: r for r in result["rows"]}
        for name, r in rows.items():
            summary.append((size, name, r["p50_ms"], r["network_only_p50_ms"], r["end_to_end_over_network"],
                            r["host_path_p50_ms"]))
        if "dense" in rows and "dynamic" in rows:
            e2e = rows["dense"]["p50_ms"] / rows["dynamic"]["p50_ms"]
            net = rows["dense"]["network_only_p50_ms"] / rows["dynamic"]["network_only_p50_ms"]
            print(f"{size}: dynamic over dense end to end {e2e:.2f}x, network alone {net:.2f}x "
                  f"({100 * e2e / net:.0f}% of it kept)")
    print(f"{'size':>5} {'engine':<8} {'frame p50 ms':>13} {'network ms':>11} {'ratio':>6} {'host path ms':>13}")
    for size, name, p50, net, ratio, host_ms in summary:
        print(f"{size:>5} {name:<8} {p50:>13.3f} {net:>11.3f} {ratio:>6.2f} {host_ms:>13.3f}")


if __name__ == "__main__":
    main()
