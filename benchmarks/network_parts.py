"""Where a CPU engine's network time goes: the layers gates never touch against the bottlenecks.

    python benchmarks/network_parts.py BUNDLE --data D [--frames 40] [--repeats 3] --json OUT

For the bundle's static model (its PyTorch form, the one the hybrid engine shares its un-gated layers
with), its dynamic and its hybrid engine: milliseconds per frame in the un-gated layers (stem, the
four stride-2 convolutions, laterals, predictions), in the bottlenecks (compact ones with their gates
for the gated engines), and the rest (upsampling, additions, box decoding, layout), with each part's
GFLOPs. Real val frames (the gates' keep depends on them); the models take turns frame by frame.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Dict, List

from provenance import provenance


def parts(net) -> Dict[str, List]:
    """The modules of each part of a DenseInference or CompactDetector's network."""
    inner = net.net
    fixed = [inner.stem, *[st[0] for st in inner.stages], *inner.lateral, *inner.pred]
    blocks = [b for st in inner.stages for b in list(st)[1:]] + list(inner.fpn_blocks)
    return {"un-gated layers": fixed, "bottlenecks": blocks}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument("--data", required=True)
    ap.add_argument("--frames", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", required=True)
    args = ap.parse_args()

    import torch

    from dynprune.checkpoint import model_from_checkpoint
    from dynprune.compact import CompactDetector, DenseInference
    from dynprune.data import load_dataset
    from dynprune.data.transforms import read_image
    from dynprune.flops import CostModel
    from dynprune.letterbox import LetterboxInput

    torch.set_num_threads(args.threads)
    meta = json.loads((Path(args.bundle) / "metadata.json").read_text())
    imgsz = meta["imgsz"]
    letterbox = LetterboxInput(imgsz)
    frames = [letterbox(read_image(r.path))[0].clone() for r in load_dataset(args.data).val[: args.frames]]
    nets, costs = {}, {}
    for name in ("static", "dynamic", "hybrid"):
        if name in meta["engines"]:
            model, _ = model_from_checkpoint(str(Path(args.bundle) / meta["engines"][name]["file"]))
            nets[name] = CompactDetector(model, backend="cpu") if model.gated else DenseInference(model)
            costs[name] = CostModel(model, imgsz)
    clock: Dict[str, Dict[str, float]] = {n: {"total": 0.0} for n in nets}
    for name, net in nets.items():
        for part, modules in parts(net).items():
            clock[name][part] = 0.0
            for m in modules:
                m.register_forward_pre_hook(lambda mod, i: setattr(mod, "_t0", time.perf_counter()))
                m.register_forward_hook(lambda mod, i, o, n=name, p=part: clock[n].__setitem__(
                    p, clock[n][p] + time.perf_counter() - mod._t0))
    kept: Dict[str, List] = {n: [] for n in nets}
    with torch.inference_mode():
        for net in nets.values():
            for x in frames[:5]:
                net(x)
        for c in clock.values():
            for k in c:
                c[k] = 0.0
        for _ in range(args.repeats):
            for i, x in enumerate(frames):
                names = list(nets)
                for name in names[i % len(names):] + names[: i % len(names)]:
                    t0 = time.perf_counter()
                    nets[name](x)
                    clock[name]["total"] += time.perf_counter() - t0
                    if isinstance(nets[name], CompactDetector):
                        kept[name].append(nets[name].kept_counts()[0].tolist())
    n = args.repeats * len(frames)
    rows = []
    for name, c in clock.items():
        cost = costs[name]
        block_flops = sum(cost.block_dense)
        if kept[name]:  # the mean of each frame's FLOPs in the blocks, gates included
            block_flops = sum(cost.frame_flops(k) - (cost.dense - block_flops - cost.gates) for k in kept[name])
            block_flops /= len(kept[name])
        row = {"engine": name, "network_ms": 1e3 * c["total"] / n,
               "ungated_ms": 1e3 * c["un-gated layers"] / n, "bottlenecks_ms": 1e3 * c["bottlenecks"] / n,
               "ungated_gflops": (cost.dense - sum(cost.block_dense) - cost.gates) / 1e9,
               "bottlenecks_gflops": block_flops / 1e9}
        row["rest_ms"] = row["network_ms"] - row["ungated_ms"] - row["bottlenecks_ms"]
        rows.append(row)
        print(f"{name:8} network {row['network_ms']:.2f} ms: un-gated layers {row['ungated_ms']:.2f} ms "
              f"({row['ungated_gflops']:.3f} GFLOPs), bottlenecks {row['bottlenecks_ms']:.2f} ms "
              f"({row['bottlenecks_gflops']:.3f} GFLOPs), rest {row['rest_ms']:.2f} ms")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({
        **provenance(), "frames": len(frames), "repeats": args.repeats, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
