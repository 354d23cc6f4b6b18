"""The board table: dense, static EFFP-50% and dynamic networks on a GPU confined to a Jetson's SMs.

    python benchmarks/board_emulation.py [--sms 8 16 0] [--sizes 320 640] [--models nano small]
        [--batches 1 4] [--keep 0.5] [--compile [MODE]] [--tune] --json OUT

For each SM count (0: the whole GPU; otherwise a CUDA green context of that many SMs, checked by
an fp16 matrix product's throughput, ``dynprune/sm_limit.py``), model, input size and batch: the
network alone in fp16, replayed from a CUDA graph, median GPU time (``triton.testing.do_bench``).
Engines: ``dense`` (the serving engine's form: BatchNorm folded, NHWC; with ``--compile`` also
``torch.compile`` of it where it compiles, the faster one counted and named by ``dense_form``),
``static`` (the same model slimmed to 50% of the FLOPs, EFFP's widths stood in for by L1 filter
norms: an untrained model's BatchNorm scales are all 1 and rank nothing; timing only),
``dynamic`` (gates with thresholds set to keep ``--keep`` of each frame's channels, the Triton
backend) and ``dynamic_keep1`` (the same kernels keeping every channel: a gain over dense this row
shares comes from fusing, not from skipping). The models are untrained: timings depend on shapes
and kept counts, not on weights.

``--tune``: before timing, the dynamic network's gather convolutions are tuned at that SM count
(``dynprune tune``'s search, kernels/conv_tiles.py; kept in the cache, so set
``DYNPRUNE_CACHE_DIR`` to keep a user's tables apart), and ``dynamic`` runs the tuned tiles; the
default tiles are timed as ``dynamic_default_tiles`` (and ``dynamic_keep1`` with tuned tiles).

Rows (``--json``): ``sms``, ``confined``, ``imgsz``, ``model``, ``batch``, ``engine`` (``dense``,
``static``, ``dynamic``, ``dynamic_keep1``; with ``--tune`` also ``dynamic_default_tiles``),
``network_ms_p50``, ``keep_mean``. ``--device cpu`` runs the same loops on the CPU (compiled
blocks, wall clock) as a smoke test of the script.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import provenance  # noqa: E402


def median_ms(fn, x, cuda: bool) -> float:
    """``fn(x)``'s median milliseconds: GPU time replayed from a CUDA graph (as ``gpu_kernels.py``
    times a network), or wall time on the CPU."""
    if cuda:
        from gpu_kernels import graph_ms

        return graph_ms(fn, x)
    for _ in range(3):
        fn(x)
    times = []
    for _ in range(10):
        t0 = time.perf_counter()
        fn(x)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def networks(size: str, imgsz: int, keep: float, group: int, device: torch.device, dtype,
             compile_mode: str | None):
    """``{engine: callable}`` and the dynamic network (for its kept counts)."""
    from cpu_dynamic import synthetic_gated

    from dynprune.compact import CompactDetector, dense_inference_model
    from dynprune.flops import CostModel
    from dynprune.gates import Gate
    from dynprune.pruning.importance import l1_norm
    from dynprune.pruning.select import select_widths
    from dynprune.pruning.surgery import slim_model

    dense, gated = synthetic_gated(keep, imgsz, group, keep_on="frames", size=size)
    keep_idx = select_widths(CostModel(dense, imgsz), l1_norm(dense), 0.5, None, 8)
    static = slim_model(dense, keep_idx)
    cuda = device.type == "cuda"
    fns = {}
    for name, model in (("dense", dense), ("static", static)):
        net = dense_inference_model(model).to(device=device, dtype=dtype)
        fns[name] = net
        if compile_mode and cuda and name == "dense":
            # compiled on its first call (inside the timing); main() drops the row if that fails
            fns["dense_compiled"] = torch.compile(net, mode=None if compile_mode == "default" else compile_mode)
    backend = "triton" if cuda else "cpu"
    dyn = CompactDetector(gated, backend=backend, device=device).to(dtype)
    fns["dynamic"] = dyn
    # the same kernels with every channel kept: whether a gain over dense comes from skipping or from fusing
    everything = copy.deepcopy(gated)
    for g in (m for m in everything.modules() if isinstance(m, Gate)):
        g.threshold.fill_(0.0)  # every channel with a positive saliency (the compiled CPU blocks run no "open")
    fns["dynamic_keep1"] = CompactDetector(everything, backend=backend, device=device).to(dtype)
    return fns, dyn


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sms", type=int, nargs="+", default=[8, 16, 0], help="SM counts; 0 is the whole GPU")
    ap.add_argument("--sizes", type=int, nargs="+", default=[320, 640])
    ap.add_argument("--models", nargs="+", default=["nano", "small"])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--keep", type=float, default=0.5)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--compile", nargs="?", const="max-autotune-no-cudagraphs", metavar="MODE",
                    help="also torch.compile the dense network (MODE: default, max-autotune-no-cudagraphs, ...; "
                         "the faster dense form counts)")
    ap.add_argument("--tune", action="store_true",
                    help="tune the dynamic network's kernel tiles at each SM count first (GPU only)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--json", required=True)
    args = ap.parse_args()

    from dynprune.sm_limit import SMLimitError, checked_limit

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("benchmarks/board_emulation.py: no CUDA GPU here (--device cpu runs a smoke test)")
    dtype = torch.float16 if cuda else torch.float32
    rows, checks = [], []
    for sms in args.sms:
        try:
            limit, check = checked_limit(sms if cuda else None, log=lambda line: print(line, flush=True))
        except SMLimitError as e:
            raise SystemExit(str(e)) from e
        confined = check is None or check["confined"]
        if check is not None:
            checks.append(check)
        with limit, torch.inference_mode():
            for size in args.models:
                for imgsz in args.sizes:
                    fns, dyn = networks(size, imgsz, args.keep, args.group, device, dtype, args.compile)
                    for batch in args.batches:
                        x = torch.rand(batch, 3, imgsz, imgsz, device=device, dtype=dtype)
                        x = x.contiguous(memory_format=torch.channels_last)
                        dyn(x)
                        kept = dyn.kept_counts().float().cpu()
                        widths = torch.tensor([[b.h1, b.h2] for b in dyn.blocks], dtype=torch.float32)
                        keep_mean = float((kept / widths).mean())
                        times = {}
                        if args.tune and cuda:
                            from dynprune.kernels import conv_tiles

                            with conv_tiles.default_tiles_only():
                                times["dynamic_default_tiles"] = median_ms(dyn, x, cuda)
                            conv_tiles.tune_network(lambda: dyn(x), device,  # noqa: B023 (called at once)
                                                    progress=lambda line: print("  tune " + line, flush=True))
                        for name, fn in fns.items():
                            try:
                                times[name] = median_ms(fn, x, cuda)
                            except Exception as exc:  # noqa: BLE001 - a compile failure costs the row
                                if name != "dense_compiled":
                                    raise
                                print(f"torch.compile of {size} failed: {type(exc).__name__}: {exc}"[:300],
                                      flush=True)
                        dense_form = "cudnn"
                        if "dense_compiled" in times:  # the faster dense form counts as dense
                            compiled = times.pop("dense_compiled")
                            if compiled < times["dense"]:
                                times["dense"], dense_form = compiled, f"torch.compile ({args.compile})"
                        gated_keep = ("dynamic", "dynamic_default_tiles")  # dynamic_keep1 keeps what is positive
                        for engine, ms in times.items():
                            rows.append({"sms": sms, "confined": confined, "imgsz": imgsz, "model": size,
                                         "batch": batch, "engine": engine, "network_ms_p50": ms,
                                         "keep_mean": keep_mean if engine in gated_keep else None,
                                         **({"dense_form": dense_form} if engine == "dense" else {})})
                        print(f"sms {sms or 'all'} {size} {imgsz} batch {batch}: "
                              + ", ".join(f"{k} {v:.3f} ms" for k, v in times.items())
                              + f" (keep {keep_mean:.2f}; dense/dynamic {times['dense'] / times['dynamic']:.2f}x, "
                              f"static/dynamic {times['static'] / times['dynamic']:.2f}x)", flush=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({
        **provenance(), "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
        "sm_checks": checks, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
